"""fedsilo department client: site config, data, DP-SGD training, privacy ledger, ClientApp."""
