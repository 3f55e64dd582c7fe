"""State: per-worker state and fleet statistics. Pure: no I/O, the clock passed in, nothing rendered."""
