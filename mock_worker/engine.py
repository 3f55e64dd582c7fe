"""A simulated inference engine: requests arrive, wait, occupy slots and KV blocks, decode, finish.

Pure (no I/O, no clock): `step(dt)` advances simulated time, driven by a seeded
`random.Random`, so a seed reproduces a run exactly. The numbers behave like a
continuous-batching engine rather than noise: load follows a slow daily-like wave,
prompts share system-prompt prefixes that are cached (and evicted) so hit rates
emerge from reuse, and a full cache makes requests queue.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from fleet_protocol import ForwardPassMetrics, KvStats, WorkerStats


@dataclass(frozen=True)
class EngineConfig:
    total_slots: int = 64
    total_blocks: int = 4096
    block_size: int = 16  # tokens per KV block
    mean_arrival_rate: float = 6.0  # requests per second, averaged over the load wave
    load_wave_period: float = 120.0  # seconds
    load_wave_depth: float = 0.6  # 0 = flat, 1 = arrivals stop at the trough
    mean_unique_prompt_tokens: int = 384
    mean_output_tokens: int = 160
    decode_tokens_per_second: float = 40.0  # per running request
    prefixes: int = 12  # distinct shared system prompts
    prefix_tokens: tuple[int, int] = (256, 2048)
    prefix_share_probability: float = 0.8
    cached_prefixes: int = 6  # prefix-cache capacity, in prefixes (LRU)
    max_waiting: int = 512  # beyond, new requests are refused
    error_probability: float = 0.01  # a request fails mid-generation
    # Advertised only (Dynamo 1.x's runtime_config): the simulation does not chunk prefills.
    max_num_batched_tokens: int = 8192


@dataclass
class Request:
    prompt_tokens: int
    output_tokens: int
    prefix: int | None
    prefix_blocks: int
    generated: float = 0.0
    fails_at: float | None = None
    cached_tokens: int = 0  # prompt tokens found in the prefix cache on arrival
    serial: int = 0  # the engine's request number: names the request's KV blocks

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + int(self.generated)

    def blocks(self, block_size: int) -> int:
        """Blocks this request holds beyond its (shared) prefix."""
        own_tokens = self.prompt_tokens - self.prefix_blocks * block_size + self.generated
        return max(1, math.ceil(own_tokens / block_size))


@dataclass(frozen=True)
class HitRateSample:
    isl_blocks: int
    overlap_blocks: int


@dataclass(frozen=True)
class IterationStats:
    """One simulated step as one forward pass, in the terms of Dynamo 1.x's ForwardPassMetrics.

    Request counts describe the batch at the end of the step (prefill = admitted during it,
    decode = the other running requests), so they add up to the running requests. Prefill
    tokens are the work done during the step: every request admitted in it, including one
    that also finished in it.
    """

    prefill_requests: int
    prefill_tokens: int  # computed
    prefill_cached_tokens: int  # read from the prefix cache
    prefill_length_variance: float
    decode_requests: int
    decode_kv_tokens: int
    decode_kv_variance: float
    queued_requests: int
    queued_prefill_tokens: int
    queued_length_variance: float
    wall_time: float  # seconds; a model of the pass's cost, not measured

    @property
    def idle(self) -> bool:
        return self.prefill_requests == 0 and self.decode_requests == 0 and self.prefill_tokens == 0


def population_variance(values: list[int]) -> float:
    if not values:
        return 0.0
    mean = sum(values) / len(values)
    return sum((value - mean) ** 2 for value in values) / len(values)


# The cost model of a forward pass: a fixed overhead, per prefilled token, per decoding request.
PASS_OVERHEAD_S = 0.004
PREFILL_TOKEN_S = 2.5e-5
DECODE_REQUEST_S = 1.5e-4


@dataclass(frozen=True)
class Completion:
    prompt_tokens: int
    output_tokens: int
    latency: float
    error: str | None  # None for success


@dataclass
class SimulatedEngine:
    config: EngineConfig
    rng: random.Random
    phase: float = 0.0
    clock: float = 0.0
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    refused: int = 0
    _arrival_credit: float = 0.0
    _prefix_cache: OrderedDict = field(default_factory=OrderedDict)
    _prefix_lengths: list = field(default_factory=list)
    _hit_ema: float = 0.0
    _started: dict = field(default_factory=dict)
    # Counters of the prefill work done (Dynamo 1.x reports them per pass); they draw no random numbers.
    prefill_tokens_computed: int = 0
    prefill_tokens_cached: int = 0
    _requests_seen: int = 0
    _admitted: list = field(default_factory=list)  # requests admitted during the current step

    def __post_init__(self) -> None:
        low, high = self.config.prefix_tokens
        self._prefix_lengths = [self.rng.randint(low, high) for _ in range(self.config.prefixes)]
        self.phase = self.rng.uniform(0, 2 * math.pi)

    # -- state -------------------------------------------------------------------------

    def arrival_rate(self) -> float:
        c = self.config
        wave = math.sin(2 * math.pi * self.clock / c.load_wave_period + self.phase)
        return max(0.0, c.mean_arrival_rate * (1 + c.load_wave_depth * wave))

    def active_blocks(self) -> int:
        in_use_prefixes = {r.prefix for r in self.running if r.prefix is not None}
        prefix_blocks = sum(self.prefix_blocks(p) for p in in_use_prefixes)
        return prefix_blocks + sum(r.blocks(self.config.block_size) for r in self.running)

    def metrics(self, dp_rank: int | None = None) -> ForwardPassMetrics:
        c = self.config
        active = min(self.active_blocks(), c.total_blocks)
        return ForwardPassMetrics(
            worker_stats=WorkerStats(
                request_active_slots=len(self.running),
                request_total_slots=c.total_slots,
                num_requests_waiting=len(self.waiting),
                data_parallel_rank=dp_rank,
            ),
            kv_stats=KvStats(
                kv_active_blocks=active,
                kv_total_blocks=c.total_blocks,
                gpu_cache_usage_perc=round(active / c.total_blocks, 6),
                gpu_prefix_cache_hit_rate=round(self._hit_ema, 6),
            ),
        )

    # -- simulation --------------------------------------------------------------------

    def prefix_blocks(self, prefix: int) -> int:
        """KV blocks of shared prefix `prefix` (its whole blocks: a partial one is the request's own)."""
        return self._prefix_lengths[prefix] // self.config.block_size

    def iteration(self) -> IterationStats:
        """The last step as a forward pass (computed when asked: the legacy protocol never asks)."""
        admitted = self._admitted
        still_running = {id(request) for request in self.running}
        prefilling = sum(1 for request in admitted if id(request) in still_running)
        fresh = {id(request) for request in admitted}
        decoding = [request.context_tokens for request in self.running if id(request) not in fresh]
        computed = sum(request.prompt_tokens - request.cached_tokens for request in admitted)
        queued = [request.prompt_tokens for request in self.waiting]
        wall_time = 0.0
        if admitted or decoding:
            wall_time = PASS_OVERHEAD_S + PREFILL_TOKEN_S * computed + DECODE_REQUEST_S * len(decoding)
        return IterationStats(
            prefill_requests=prefilling,
            prefill_tokens=computed,
            prefill_cached_tokens=sum(request.cached_tokens for request in admitted),
            prefill_length_variance=population_variance([request.prompt_tokens for request in admitted]),
            decode_requests=len(decoding),
            decode_kv_tokens=sum(decoding),
            decode_kv_variance=population_variance(decoding),
            queued_requests=len(queued),
            queued_prefill_tokens=sum(queued),
            queued_length_variance=population_variance(queued),
            wall_time=round(wall_time, 6),
        )

    def _arrive(self) -> HitRateSample | None:
        c = self.config
        if len(self.waiting) >= c.max_waiting:
            self.refused += 1
            return None
        prefix = self.rng.randrange(c.prefixes) if self.rng.random() < c.prefix_share_probability else None
        unique = max(1, int(self.rng.expovariate(1 / c.mean_unique_prompt_tokens)))
        prefix_blocks = self.prefix_blocks(prefix) if prefix is not None else 0
        prompt = unique + prefix_blocks * c.block_size
        isl_blocks = math.ceil(prompt / c.block_size)
        overlap = 0
        if prefix is not None:
            if prefix in self._prefix_cache:
                overlap = prefix_blocks
                self._prefix_cache.move_to_end(prefix)
            else:
                self._prefix_cache[prefix] = True
                if len(self._prefix_cache) > c.cached_prefixes:
                    self._prefix_cache.popitem(last=False)
        output = max(1, int(self.rng.expovariate(1 / c.mean_output_tokens)))
        request = Request(prompt, output, prefix, prefix_blocks, cached_tokens=overlap * c.block_size,
                          serial=self._requests_seen)
        self._requests_seen += 1
        if self.rng.random() < c.error_probability:
            request.fails_at = self.rng.uniform(0, output)
        self._started[id(request)] = self.clock
        self.waiting.append(request)
        sample = HitRateSample(isl_blocks, overlap)
        ratio = overlap / isl_blocks if isl_blocks else 0.0
        self._hit_ema += 0.05 * (ratio - self._hit_ema)
        return sample

    def _admit(self) -> None:
        c = self.config
        while self.waiting and len(self.running) < c.total_slots:
            candidate = self.waiting[0]
            if self.active_blocks() + candidate.blocks(c.block_size) + candidate.prefix_blocks > c.total_blocks:
                break
            admitted = self.waiting.popleft()
            self.running.append(admitted)
            self._admitted.append(admitted)
            self.prefill_tokens_computed += admitted.prompt_tokens - admitted.cached_tokens
            self.prefill_tokens_cached += admitted.cached_tokens

    def step(self, dt: float) -> tuple[list[HitRateSample], list[Completion]]:
        """Advance `dt` seconds; the hit-rate samples of arrivals and the requests that ended."""
        samples: list[HitRateSample] = []
        self._admitted = []
        self._arrival_credit += self.arrival_rate() * dt
        # Poisson arrivals: draw exponential gaps until the interval's budget is spent.
        while True:
            gap = self.rng.expovariate(1.0)
            if gap > self._arrival_credit:
                break
            self._arrival_credit -= gap
            sample = self._arrive()
            if sample is not None:
                samples.append(sample)
        self._admit()
        done: list[Completion] = []
        still_running = []
        for request in self.running:
            request.generated += self.config.decode_tokens_per_second * dt
            failed = request.fails_at is not None and request.generated >= request.fails_at
            if failed or request.generated >= request.output_tokens:
                started = self._started.pop(id(request), self.clock)
                done.append(Completion(
                    request.prompt_tokens, int(min(request.generated, request.output_tokens)),
                    self.clock + dt - started, "generate" if failed else None,
                ))
            else:
                still_running.append(request)
        self.running = still_running
        self._admit()
        self.clock += dt
        return samples, done
