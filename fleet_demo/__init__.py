"""The one-command demo: an embedded nats-server, the aggregator and mock workers in one process tree.

The one package that imports both sides of the wire."""
