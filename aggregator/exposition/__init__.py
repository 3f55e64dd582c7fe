"""Exposition: the encoder and its render caches (owned here, keyed by worker, not by the state)."""
