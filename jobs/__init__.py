"""Ray job entrypoints: ``python -m jobs.NAME --config configs/X.yaml key=value ...``."""
