"""Messages the benchmark publishes: the same typed messages real workers send."""

from __future__ import annotations

from aggregator import protocol
from aggregator.protocol import ForwardPassMetrics, KvStats, LoadEvent, WorkerStats

SUBJECT = protocol.component_subject("dynamo", "backend", protocol.KV_METRICS)
WORKER_ID_BASE = 1 << 62


def load_event(worker: int, active: int) -> bytes:
    return protocol.encode(LoadEvent(
        worker_id=WORKER_ID_BASE + worker,
        data=ForwardPassMetrics(
            WorkerStats(request_active_slots=active % 64, request_total_slots=64, num_requests_waiting=active % 7),
            KvStats(kv_active_blocks=active, kv_total_blocks=4096, gpu_cache_usage_perc=active / 4096,
                    gpu_prefix_cache_hit_rate=0.25),
        ),
    ))


def round_robin(workers: int, messages: int, marker: int, first: int = 0) -> list[bytes]:
    """`messages` LoadEvents cycling over `workers` (ids from `first`); each worker's last one carries `marker`."""
    ids = range(first, first + workers)
    variants = [[load_event(w, v) for v in (100, 200, 300)] for w in ids]
    out = [variants[i % workers][(i // workers) % 3] for i in range(messages - workers)]
    out += [load_event(w, marker) for w in ids]
    return out


def exposition_body(worker: int, active: int = 100) -> bytes:
    """The per-worker KV series as Prometheus text, as a Pushgateway client would push them."""
    lines = []
    values = {
        "llm_kv_blocks_active": active, "llm_kv_blocks_total": 4096, "llm_requests_active_slots": active % 64,
        "llm_requests_total_slots": 64, "llm_requests_waiting": active % 7,
        "llm_gpu_cache_usage_ratio": active / 4096, "llm_gpu_prefix_cache_hit_ratio": 0.25,
    }
    labels = f'component="backend",endpoint="generate",worker_id="{WORKER_ID_BASE + worker}",dp_rank="0"'
    for name, value in values.items():
        lines.append(f"# TYPE {name} gauge\n{name}{{{labels}}} {value}")
    return ("\n".join(lines) + "\n").encode()
