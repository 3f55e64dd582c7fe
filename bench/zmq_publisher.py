"""ZMQ publisher process: one PUB socket per simulated worker, as Dynamo 1.x's default event plane has them.

`python -m bench.zmq_publisher KV_DIR --workers W --messages N [--first-id K]`

Binds W PUB sockets on loopback, registers each as an event channel in the file discovery
directory KV_DIR (as a worker does), says `ready`; on `go` sends the same kv_metrics
envelopes as `bench.publisher --kind active-load` in Dynamo's four-frame ZMQ framing, then
reports and removes its entries.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import zmq

import fleet_protocol as protocol

from .payloads import PUBLISHER_BASE, active_load_round_robin

HWM = 100_000  # Dynamo's own SNDHWM: a burst is queued, not dropped


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kv_dir")
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--messages", type=int, required=True)
    parser.add_argument("--marker", type=int, default=4000)
    parser.add_argument("--first-id", type=int, default=0)
    args = parser.parse_args()
    context = zmq.Context()
    sockets, paths = [], []
    scope = protocol.EventScope("endpoint", protocol.EndpointScope("dynamo", "backend", "generate"))
    for index in range(args.workers):
        socket = context.socket(zmq.PUB)
        socket.setsockopt(zmq.SNDHWM, HWM)
        socket.setsockopt(zmq.LINGER, 10_000)
        port = socket.bind_to_random_port("tcp://127.0.0.1")
        sockets.append(socket)
        publisher = PUBLISHER_BASE + args.first_id + index
        entry = protocol.EventChannelEntry(scope, protocol.KV_METRICS_TOPIC, publisher, protocol.ZmqTransport(
            protocol.ZmqConfig(f"tcp://127.0.0.1:{port}")))
        key = protocol.event_channel_key("dynamo", "backend", "generate", protocol.KV_METRICS_TOPIC, publisher)
        path = Path(args.kv_dir, "v1", "event_channels", protocol.file_name(key.split("/", 2)[2]))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(protocol.encode_discovery_entry(entry))
        paths.append(path)
    messages = []
    for body in active_load_round_robin(args.workers, args.messages, args.marker, args.first_id):
        envelope = protocol.decode_envelope(body, 1 << 20)
        messages.append((sockets[envelope.publisher_id - PUBLISHER_BASE - args.first_id],
                         protocol.encode_zmq_frames(envelope)))
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.time()
    for socket, frames in messages:
        socket.send_multipart(frames)
    for path in paths:
        os.unlink(path)
    for socket in sockets:
        socket.close()  # waits (LINGER) until what is queued is sent
    context.term()
    print(json.dumps({"started": started, "flushed": time.time(), "sent": len(messages)}), flush=True)


if __name__ == "__main__":
    main()
