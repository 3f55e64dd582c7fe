"""Benchmarks: `python -m bench` (see bench/README section in the top-level README)."""
