"""fedsilo coordination server: aggregation strategy, SecAgg+ wiring, reporting, ServerApp."""
