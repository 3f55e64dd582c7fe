"""The worker-side library: publish a worker's load, GPU readings and metric snapshots over NATS.

It depends on `fleet_protocol` alone among this project's packages; install it with the
`worker` extra (`pip install 'llm-fleet-metrics[worker]'`), which brings no aggregator dependency.
"""
