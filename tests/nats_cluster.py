"""A real 3-node nats-server cluster on loopback, configured from deploy/nats-cluster/ (for the tests).

Each node runs its compose file (deploy/nats-cluster/nats-N.conf, which includes cluster.conf);
the command line moves its client, monitoring and route ports to free loopback ones and gives
it its own JetStream store directory, as tests/integration/test_stack.py does with deploy/nats-server.conf.
"""

from __future__ import annotations

import json
import shutil

from fleet_demo.nats_server import NatsServer, free_port

from .support import ROOT, http_get, wait_until

CONFIG = ROOT / "deploy" / "nats-cluster"


class NatsCluster:
    """Nodes routed to one another, JetStream on each; every node stopped by `stop()`."""

    def __init__(self, size: int = 3) -> None:
        route_ports = [free_port() for _ in range(size)]
        routes = ",".join(f"nats://127.0.0.1:{port}" for port in route_ports)
        self.monitor_ports = [free_port() for _ in range(size)]
        self.nodes = [
            NatsServer(jetstream=True, config=str(CONFIG / f"nats-{i + 1}.conf"),
                       extra_args=["-m", str(self.monitor_ports[i]), "--cluster", f"nats://127.0.0.1:{route_ports[i]}",
                                   "--routes", routes])
            for i in range(size)
        ]
        self.names = [f"nats-{i + 1}" for i in range(size)]  # server_name of each node's file

    @property
    def urls(self) -> str:
        """Every node's client URL, comma-separated (as --nats-url takes them)."""
        return ",".join(node.url for node in self.nodes)

    def monitor(self, index: int, path: str) -> dict:
        status, _, body = http_get(f"http://127.0.0.1:{self.monitor_ports[index]}{path}", timeout=2)
        assert status == 200, (self.names[index], path, status, body[:300])
        return json.loads(body)

    def alive(self) -> list[int]:
        return [i for i, node in enumerate(self.nodes) if node.process is not None and node.process.poll() is None]

    def start(self) -> NatsCluster:
        try:
            for node in self.nodes:
                node.start()
            # Ready: every node routed to the others, and the JetStream meta group has a leader they agree on.
            wait_until(lambda: all(self.monitor(i, "/routez")["num_routes"] >= len(self.nodes) - 1
                                   for i in range(len(self.nodes))), 20, what="routes between the nodes")
            wait_until(lambda: len({self.monitor(i, "/jsz").get("meta_cluster", {}).get("leader")
                                    for i in range(len(self.nodes))} - {None, ""}) == 1
                       and all(self.monitor(i, "/healthz")["status"] == "ok" for i in range(len(self.nodes))),
                       30, what="a JetStream meta leader")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
            if node.store_dir:
                shutil.rmtree(node.store_dir, ignore_errors=True)

    def node_of_client(self, name: str) -> int | None:
        """The node a client named `name` is connected to, if any."""
        for i in self.alive():
            if any(c.get("name") == name for c in self.monitor(i, "/connz")["connections"]):
                return i
        return None

    def kill(self, index: int) -> None:
        """SIGKILL one node: its sockets close at once, as when the process dies on a live host."""
        self.nodes[index].kill()
