"""Edges: where data enters and leaves the process (NATS, the JetStream journal, pull mode, HTTP)."""
