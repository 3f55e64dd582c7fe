"""Workers' own metric families (MetricsRegistry snapshots) as fleet state: per worker, and fleet-wide.

A worker's families arrive already checked and rendered by the ingest side
(`aggregator.ingest.component_snapshots`); here they are data: a name, a type, a HELP, a
series count, and the series themselves, kept as their exposition lines (opaque bytes)
or, where no lines could be written, as the ingest side's sample objects. The index
keeps one type and HELP per name across the fleet and the series total. No I/O, no rendering.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aggregator.rejects import SERIES_LIMIT, TYPE_CONFLICT
from fleet_protocol import MessageRejected

Problem = tuple[str, str]  # (reason, detail) of one dropped family


@dataclass(slots=True)
class Family:
    name: str
    type: str
    documentation: str
    samples: list[Any] | None  # None once its series are kept as `chunk`
    count: int  # how many series
    chunk: bytes | None = None  # its series as exposition lines


def sample_names(name: str, typ: str) -> tuple[str, ...]:
    """The series names a family of this type writes."""
    if typ == "counter":
        return (name + "_total",)
    if typ == "histogram":
        return (name + "_bucket", name + "_sum", name + "_count")
    if typ == "summary":
        return (name, name + "_sum", name + "_count")
    return (name,)


@dataclass(slots=True)
class WorkerMetrics:
    """One worker's accepted families."""

    families: dict[str, Family] = field(default_factory=dict)
    # Set by seal() once the fleet has accepted the snapshot: the family names in order, the
    # families, and their lines (None: that family has samples only), so that a scrape can
    # transpose the rows of workers sending the same families at C speed.
    names: tuple[str, ...] = ()
    families_row: tuple[Family, ...] = ()
    chunks_row: tuple[bytes | None, ...] = ()

    @property
    def series(self) -> int:
        return sum(f.count for f in self.families.values())

    def seal(self) -> None:
        self.families_row = tuple(self.families.values())
        self.names = tuple(f.name for f in self.families_row)
        self.chunks_row = tuple(f.chunk for f in self.families_row)


@dataclass(slots=True)
class NameEntry:
    type: str
    documentation: str
    holders: int


class ComponentIndex:
    """Fleet-wide view of the workers' families: one type and HELP per name, and the series total.

    Families clash not only by name: a counter `x` owns the sample name `x_total`, so a gauge
    named `x_total` from another worker would write the same series name under two types.
    """

    def __init__(self, max_series: int = 100_000) -> None:
        self.max_series = max_series
        self.names: dict[str, NameEntry] = {}
        self.owners: dict[str, str] = {}  # sample name -> the family name that writes it
        self.series = 0

    def conflicts(self, family: Family, previous: WorkerMetrics | None) -> str | None:
        own = previous.families if previous is not None else {}
        owners = (self.owners.get(sample_name) for sample_name in sample_names(family.name, family.type))
        clashes = {owner for owner in owners if owner is not None and owner != family.name}
        entry = self.names.get(family.name)
        if entry is not None and entry.type != family.type:
            clashes.add(family.name)
        for name in clashes:
            mine = own.get(name)
            entry = self.names[name]
            if mine is not None and entry.holders == 1 and mine.type == entry.type:
                continue  # this worker is the only holder: it may change its own mind
            return f"{family.name!r} ({family.type}) clashes with {name!r} ({entry.type}) from other workers"
        return None

    def admit(self, new: WorkerMetrics, previous: WorkerMetrics | None) -> list[Problem]:
        """Drop the families of `new` that conflict; raise MessageRejected past the series total."""
        problems: list[Problem] = []
        for name in list(new.families):
            why = self.conflicts(new.families[name], previous)
            if why is not None:
                del new.families[name]
                problems.append((TYPE_CONFLICT, why))
        after = self.series - (previous.series if previous is not None else 0) + new.series
        if after > self.max_series:
            raise MessageRejected(SERIES_LIMIT, f"{new.series} series would take the total to {after} > "
                                                f"{self.max_series}")
        return problems

    def add(self, metrics: WorkerMetrics) -> None:
        for family in metrics.families.values():
            entry = self.names.get(family.name)
            if entry is None:
                self.names[family.name] = NameEntry(family.type, family.documentation, 1)
                for sample_name in sample_names(family.name, family.type):
                    self.owners[sample_name] = family.name
            else:
                entry.holders += 1
        self.series += metrics.series

    def remove(self, metrics: WorkerMetrics) -> None:
        for family in metrics.families.values():
            entry = self.names[family.name]
            entry.holders -= 1
            if entry.holders == 0:
                del self.names[family.name]
                for sample_name in sample_names(family.name, family.type):
                    if self.owners.get(sample_name) == family.name:
                        del self.owners[sample_name]
        self.series -= metrics.series
