"""Data: image pipelines (DALI, PIL fallback), latent caches and demo datasets."""
