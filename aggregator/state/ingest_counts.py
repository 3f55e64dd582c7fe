"""What each source handed to ingest, by kind: received, accepted, and rejected by reason.

Plain integers without a lock, because only the event loop's thread counts: a
prometheus_client Counter takes a lock on every `inc()`, which cost a quarter of the
per-message ingest time. Kept per source ("nats", "journal", ...) so that a status page can
tell sources apart; `collectors/ingest_counts.py` exports them summed by kind.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class Incrementable(Protocol):
    def inc(self, amount: int = 1) -> None: ...


class Outcomes(Protocol):
    """Where one source counts its items of one kind (a `KindCounts`, or an edge's own metrics)."""

    @property
    def received(self) -> Incrementable: ...

    @property
    def accepted(self) -> Incrementable: ...

    def reject(self, reason: str) -> None: ...


class Tally:
    """A counter without a lock."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class KindCounts:
    """One source's messages of one kind."""

    __slots__ = ("accepted", "kind", "received", "rejected", "source")

    def __init__(self, source: str, kind: str, reasons: Iterable[str] = ()) -> None:
        self.source = source
        self.kind = kind
        self.received = Tally()
        self.accepted = Tally()
        # Reasons are the code's constants (aggregator.rejects), never input: this stays small.
        self.rejected: dict[str, Tally] = {reason: Tally() for reason in reasons}

    def reject(self, reason: str) -> None:
        tally = self.rejected.get(reason)
        if tally is None:
            tally = self.rejected[reason] = Tally()
        tally.value += 1


class IngestCounts:
    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], KindCounts] = {}

    def of(self, source: str, kind: str, reasons: Iterable[str] = ()) -> KindCounts:
        """The counts of `kind` from `source`, with a tally at 0 for each of `reasons`."""
        counts = self._counts.get((source, kind))
        if counts is None:
            counts = self._counts[(source, kind)] = KindCounts(source, kind)
        for reason in reasons:
            counts.rejected.setdefault(reason, Tally())
        return counts

    def all(self) -> list[KindCounts]:
        """Every (source, kind) counted so far; safe to call from another thread."""
        return list(self._counts.values())
