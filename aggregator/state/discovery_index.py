"""What Dynamo's discovery store says about the fleet: which worker instances exist, and their capacity.

An instance is one worker process serving one component endpoint, `(component, endpoint,
worker_id)`. While an instance entry exists the worker is alive: its ranks do not expire
however idle it is. A model card's `runtime_config` gives its capacity (total KV blocks,
request slots) and its data-parallel ranks, `start .. start + size - 1`, each one worker
series. Indexed by the whole key, which is all a deletion carries. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from fleet_protocol import RuntimeConfig


class Instance(NamedTuple):
    component: str
    endpoint: str
    worker_id: int


class Capacity(NamedTuple):
    total_kv_blocks: int | None  # per rank, as Dynamo's KvWorkerMonitor compares each rank's kv_used_blocks to it
    max_num_seqs: int | None


@dataclass(frozen=True, slots=True)
class ModelCardRanks:
    """A model card's ranks and their capacity."""

    ranks: range
    capacity: Capacity

    @classmethod
    def of(cls, config: RuntimeConfig) -> ModelCardRanks:
        start = config.data_parallel_start_rank
        return cls(range(start, start + config.data_parallel_size),
                   Capacity(config.total_kv_blocks, config.max_num_seqs))

    def capacity_of(self, rank: int) -> Capacity | None:
        return self.capacity if rank in self.ranks else None


class DiscoveryIndex:
    def __init__(self) -> None:
        self.instances: dict[str, Instance] = {}  # instance key -> its instance
        self.live: dict[Instance, int] = {}  # instance -> how many instance keys name it (normally 1)
        self._card_keys: dict[str, Instance] = {}  # model card key -> its instance
        self._cards: dict[Instance, dict[str, ModelCardRanks]] = {}  # the latest put last

    def put_instance(self, key: str, instance: Instance) -> Instance | None:
        """`key` names `instance` now; the instance it named before, if another."""
        previous = self.instances.get(key)
        if previous == instance:
            return None
        if previous is not None:
            self._unlive(previous)
        self.instances[key] = instance
        self.live[instance] = self.live.get(instance, 0) + 1
        return previous

    def delete_instance(self, key: str) -> Instance | None:
        """`key` is gone; its instance if no other key keeps it alive."""
        instance = self.instances.pop(key, None)
        if instance is None:
            return None
        return instance if self._unlive(instance) else None

    def _unlive(self, instance: Instance) -> bool:
        left = self.live[instance] - 1
        if left:
            self.live[instance] = left
            return False
        del self.live[instance]
        return True

    def put_card(self, key: str, instance: Instance, card: ModelCardRanks) -> Instance | None:
        """`key`'s model card is `card`, for `instance`; the instance it was for before, if another."""
        previous = self._card_keys.get(key)
        if previous is not None:
            self._forget_card(key, previous)
        self._card_keys[key] = instance
        self._cards.setdefault(instance, {})[key] = card
        return previous if previous != instance else None

    def delete_card(self, key: str) -> Instance | None:
        """`key`'s model card is gone; the instance it was for."""
        instance = self._card_keys.pop(key, None)
        if instance is not None:
            self._forget_card(key, instance)
        return instance

    def _forget_card(self, key: str, instance: Instance) -> None:
        cards = self._cards[instance]
        del cards[key]
        if not cards:
            del self._cards[instance]

    def card_of(self, instance: Instance) -> ModelCardRanks | None:
        """The capacity of `instance`: its model card put last (a LoRA adapter has a card of its own)."""
        cards = self._cards.get(instance)
        if not cards:
            return None
        return next(reversed(cards.values()))

    def __len__(self) -> int:
        return len(self.instances) + len(self._card_keys)
