"""The simulated engine's KV blocks by name: what each step stored and removed, for Dynamo 1.x's kv-events.

Pure, and it draws no random numbers, so it never changes a seeded run. A block's hash is
a function of what it holds: block `i` of shared prefix `p` is the same block on every
worker (as a system prompt's blocks are), a request's own blocks are named by the
request's number. The device tier holds exactly the blocks in use: a block is stored when
a running request starts using it and removed when none does (the simulation frees at
once rather than keeping an evictable cache), up to the engine's capacity. So the number
of blocks a consumer counts from the events is the `kv_used_blocks` of the same step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .engine import SimulatedEngine

_MASK = (1 << 64) - 1
_PREFIX_SALT = 0x5DEECE66D
_REQUEST_SALT = 0x2545F4914F6CDD1D
_TOKENS_SALT = 0x9E3779B97F4A7C15


def _mix(value: int) -> int:
    """splitmix64's finaliser: spreads any 64-bit value over all 64 bits."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)


def prefix_block_hash(prefix: int, index: int) -> int:
    return _mix(_mix(_PREFIX_SALT ^ prefix) ^ index)


def request_block_hash(serial: int, index: int) -> int:
    return _mix(_mix(_REQUEST_SALT ^ serial) ^ index)


def tokens_hash(block_hash: int) -> int:
    """The hash of a block's tokens alone (Dynamo sends both; the mock derives one from the other)."""
    return _mix(block_hash ^ _TOKENS_SALT)


@dataclass(frozen=True)
class StoredRun:
    """Consecutive blocks of one sequence stored together; `parent_hash` is the block before the first."""

    parent_hash: int | None
    block_hashes: tuple[int, ...]


@dataclass(frozen=True)
class BlockChanges:
    removed: tuple[int, ...]
    stored: tuple[StoredRun, ...]


@dataclass
class DeviceBlocks:
    """The blocks one engine's device tier holds, as its kv-events have described them."""

    capacity: int
    resident: set[int] = field(default_factory=set)
    # Hashes already computed: per prefix, and per running request (by its number), grown as it grows.
    _prefix_chains: dict[int, list[int]] = field(default_factory=dict)
    _request_chains: dict[int, list[int]] = field(default_factory=dict)

    def sequences(self, engine: SimulatedEngine) -> list[tuple[int | None, list[int]]]:
        """Every sequence of blocks in use, in a fixed order: (hash before its first block, its block hashes)."""
        block_size = engine.config.block_size
        found: list[tuple[int | None, list[int]]] = []
        for prefix in sorted({request.prefix for request in engine.running if request.prefix is not None}):
            chain = self._prefix_chains.get(prefix)
            if chain is None:
                chain = [prefix_block_hash(prefix, index) for index in range(engine.prefix_blocks(prefix))]
                self._prefix_chains[prefix] = chain
            found.append((None, chain))
        chains: dict[int, list[int]] = {}
        for request in engine.running:
            chain = self._request_chains.get(request.serial, [])
            wanted = request.blocks(block_size)
            if len(chain) < wanted:
                chain.extend(request_block_hash(request.serial, index) for index in range(len(chain), wanted))
            chains[request.serial] = chain
            parent = None
            if request.prefix is not None and request.prefix_blocks:
                parent = prefix_block_hash(request.prefix, request.prefix_blocks - 1)
            found.append((parent, chain[:wanted]))
        self._request_chains = chains
        return found

    def clear(self) -> None:
        self.resident.clear()

    def update(self, engine: SimulatedEngine) -> BlockChanges:
        """Bring `resident` to the engine's blocks in use; what was removed and stored to get there."""
        wanted = self.sequences(engine)
        in_use = {block for _, blocks in wanted for block in blocks}
        removed = tuple(sorted(self.resident - in_use))
        self.resident.difference_update(removed)
        room = self.capacity - len(self.resident)
        stored: list[StoredRun] = []
        for parent, blocks in wanted:
            run: list[int] = []
            run_parent = before = parent
            for block in blocks:
                if block not in self.resident and room > 0:
                    if not run:
                        run_parent = before
                    run.append(block)
                    self.resident.add(block)
                    room -= 1
                elif run:
                    stored.append(StoredRun(run_parent, tuple(run)))
                    run = []
                before = block
            if run:
                stored.append(StoredRun(run_parent, tuple(run)))
        return BlockChanges(removed, tuple(stored))
