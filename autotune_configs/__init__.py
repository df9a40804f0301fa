"""Tuned Triton launch configs, one JSON file per GPU name (read with importlib.resources)."""
