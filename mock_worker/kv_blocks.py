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
_REQUEST_BIT = 1 << 63
_INDEX_BITS = 24  # a sequence of up to 16M blocks
_TOKENS_SALT = 0x9E3779B97F4A7C15


def _mix(value: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit values, so distinct inputs never share a hash."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)


def prefix_block_hash(prefix: int, index: int) -> int:
    return _mix((prefix << _INDEX_BITS) | index)


def request_block_hash(serial: int, index: int) -> int:
    return _mix(_REQUEST_BIT | ((serial << _INDEX_BITS) & (_REQUEST_BIT - 1)) | index)


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


# A sequence of blocks: a shared prefix by its number, or a request's own blocks by the request's number.
ChainKey = tuple[str, int]


@dataclass
class DeviceBlocks:
    """The blocks one engine's device tier holds, as its kv-events have described them.

    Every sequence's resident blocks are its first ones (blocks are stored in order, and a
    sequence only grows), so the state is how many of each sequence are resident; a step
    costs what it changed, not what is in use.
    """

    capacity: int
    resident: set[int] = field(default_factory=set)
    _resident_counts: dict[ChainKey, int] = field(default_factory=dict)
    _hashes: dict[ChainKey, list[int]] = field(default_factory=dict)

    def _chain(self, key: ChainKey, length: int) -> list[int]:
        """The first `length` block hashes of a sequence (computed once, kept while it is resident)."""
        chain = self._hashes.setdefault(key, [])
        if len(chain) < length:
            kind, number = key
            make = prefix_block_hash if kind == "prefix" else request_block_hash
            chain.extend(make(number, index) for index in range(len(chain), length))
        return chain

    def sequences(self, engine: SimulatedEngine) -> list[tuple[ChainKey, int | None, int]]:
        """Every sequence in use, in a fixed order: (key, hash before its first block, its length in blocks)."""
        block_size = engine.config.block_size
        found: list[tuple[ChainKey, int | None, int]] = [
            (("prefix", prefix), None, engine.prefix_blocks(prefix))
            for prefix in sorted({request.prefix for request in engine.running if request.prefix is not None})]
        for request in engine.running:
            parent = None
            if request.prefix is not None and request.prefix_blocks:
                parent = self._chain(("prefix", request.prefix), request.prefix_blocks)[request.prefix_blocks - 1]
            found.append((("request", request.serial), parent, request.blocks(block_size)))
        return found

    def clear(self) -> None:
        self.resident.clear()
        self._resident_counts.clear()
        self._hashes.clear()

    def update(self, engine: SimulatedEngine) -> BlockChanges:
        """Bring `resident` to the engine's blocks in use (up to capacity); what was removed and stored."""
        wanted = self.sequences(engine)
        in_use = {key for key, _, _ in wanted}
        removed: list[int] = []
        for key in [key for key in self._resident_counts if key not in in_use]:
            removed.extend(self._hashes[key][:self._resident_counts.pop(key)])
            if key[0] == "request":
                del self._hashes[key]  # a request's number is never used again
        self.resident.difference_update(removed)
        room = self.capacity - len(self.resident)
        stored: list[StoredRun] = []
        for key, parent, length in wanted:
            have = self._resident_counts.get(key, 0)
            take = min(length - have, room)
            if take <= 0:
                continue
            chain = self._chain(key, have + take)
            run = chain[have:have + take]
            stored.append(StoredRun(chain[have - 1] if have else parent, tuple(run)))
            self.resident.update(run)
            self._resident_counts[key] = have + take
            room -= take
        return BlockChanges(tuple(removed), tuple(stored))
