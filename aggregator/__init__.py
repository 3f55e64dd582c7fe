"""The aggregator service (`python -m aggregator`), in layers that data flows through one way:

edges (NATS, HTTP) -> ingest (one pipeline) -> state (pure) <- collectors -> exposition.

The wire types come from `fleet_protocol`; nothing here imports the worker library.
"""

from fleet_protocol import __version__

__all__ = ["__version__"]
