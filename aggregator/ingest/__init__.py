"""Ingest: one pipeline from what an edge received to the fleet state, counted and logged in one place."""
