"""Local simulations: many departments on one machine with Flower's simulation engine (Ray)."""
