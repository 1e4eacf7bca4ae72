"""Config files: each exposes get_config() -> ml_collections.ConfigDict (see base.py)."""
