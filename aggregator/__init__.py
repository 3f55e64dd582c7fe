"""NATS-based metrics aggregation for LLM inference fleets.

The package holds both sides of the wire: the aggregator service (`python -m aggregator`)
and the worker-side publisher library (`aggregator.publisher`), which share
`aggregator.protocol`.
"""

__version__ = "0.1.0"
