"""What one simulated worker publishes in Dynamo 1.x's protocol, from its engines' state after each step.

Per dp_rank, after every step: the KV blocks the step stored and removed (kv-events, one
message per step, so that a consumer's block count is the step's `kv_used_blocks`), the load if it changed
(kv_metrics), and the step as one forward pass (forward-pass-metrics), or, for a step
that ran nothing, the rank marked idle so that Dynamo's heartbeat takes over. Each rank's
KV events start with `cleared`: whoever sees a source from its start can count exactly.
"""

from __future__ import annotations

from fleet_protocol import QueuedRequests, ScheduledRequests
from fleet_worker.discovery_entries import ModelCardValues
from fleet_worker.event_plane_worker import EventPlaneWorker
from fleet_worker.topic_publishers import removed_data, stored_data

from .engine import EngineConfig, IterationStats, SimulatedEngine
from .kv_blocks import DeviceBlocks, tokens_hash

MODEL_NAME = "mock-llm"


def model_card(config: EngineConfig, dp_ranks: int) -> ModelCardValues:
    """The model card a simulated worker registers: its engine's capacity, per data-parallel rank."""
    return ModelCardValues(MODEL_NAME, total_kv_blocks=config.total_blocks, max_num_seqs=config.total_slots,
                           max_num_batched_tokens=config.max_num_batched_tokens, data_parallel_size=dp_ranks,
                           kv_cache_block_size=config.block_size)


def forward_pass(stats: IterationStats) -> tuple[ScheduledRequests, QueuedRequests]:
    scheduled = ScheduledRequests(stats.prefill_requests, stats.prefill_tokens, stats.prefill_length_variance,
                                  stats.prefill_cached_tokens, stats.decode_requests, stats.decode_kv_tokens,
                                  stats.decode_kv_variance)
    # The simulation never preempts, so nothing waits to resume decoding.
    queued = QueuedRequests(stats.queued_requests, stats.queued_prefill_tokens, stats.queued_length_variance)
    return scheduled, queued


def used_blocks(engine: SimulatedEngine) -> int:
    """`kv_used_blocks`: the blocks in use, as the legacy protocol's `kv_active_blocks` reports them."""
    return min(engine.active_blocks(), engine.config.total_blocks)


class EngineEvents:
    """A simulated worker's 1.x publishers, fed by its engines (one per dp_rank)."""

    def __init__(self, publisher: EventPlaneWorker, engines: list[SimulatedEngine]) -> None:
        self.publisher = publisher
        self.engines = engines
        self.blocks = [DeviceBlocks(engine.config.total_blocks) for engine in engines]

    async def start(self) -> None:
        """Register the worker and start each rank's KV events from a known empty cache."""
        self.publisher.register()
        for rank, blocks in enumerate(self.blocks):
            blocks.clear()
            await self.publisher.kv_events[rank].cleared()

    async def stepped(self, rank: int) -> None:
        """Publish what the step that rank `rank`'s engine just took changed."""
        engine = self.engines[rank]
        changes = self.blocks[rank].update(engine)
        # One message per step, as an engine hands Dynamo its events a batch per step: frees first.
        batch = [removed_data(changes.removed)] if changes.removed else []
        batch += [stored_data([(block, tokens_hash(block)) for block in run.block_hashes], run.parent_hash)
                  for run in changes.stored]
        await self.publisher.kv_events[rank].publish(*batch)
        used = used_blocks(engine)
        # Every running request decodes: the blocks of decoding requests are all the blocks in use.
        await self.publisher.load.publish(rank, active_decode_blocks=used, kv_used_blocks=used)
        stats = engine.iteration()
        if stats.idle:
            self.publisher.forward_passes.idle(rank)
        else:
            scheduled, queued = forward_pass(stats)
            await self.publisher.forward_passes.publish(rank, stats.wall_time, scheduled, queued)

    def held_still(self, rank: int) -> None:
        """Rank `rank` took no step (a frozen engine): it runs no pass."""
        self.publisher.forward_passes.idle(rank)

    def close(self) -> None:
        self.publisher.close()
