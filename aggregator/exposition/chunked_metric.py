"""A metric family whose series also come as pre-rendered lines (see encoder.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import cast

from prometheus_client.core import Metric


class ChunkedMetric(Metric):
    """A family whose sample lines also come pre-rendered, as byte chunks.

    A worker's GPU readings and component metrics are rendered once per reading, and its
    KV series once per scrape straight from the state; the encoder then writes the chunks
    instead of formatting each sample again. `samples` is complete as in any Metric, but
    built only when something reads it (prometheus_client's own encoders, tests), so a
    scrape creates no Sample objects for these families.
    """

    def __init__(self, name: str, documentation: str, typ: str, unit: str = "") -> None:
        # Set before Metric.__init__, which assigns `samples` through the property below.
        self._parts: list = []  # lists of Samples, or callables returning one
        self._flat: list = []
        self.chunks: list[bytes] | None = []
        super().__init__(name, documentation, typ, unit)

    @property
    def samples(self) -> list:
        if self._parts:
            flat = self._flat
            for part in self._parts:
                flat.extend(part() if callable(part) else part)
            self._parts = []
        return self._flat

    @samples.setter
    def samples(self, value: list) -> None:
        self._flat = value
        self._parts = []

    def add_chunk(self, samples, chunk: bytes | None) -> None:
        """`samples` (a list, or a callable making it) and their lines; None: no lines, go sample by sample."""
        self._parts.append(samples)
        if chunk is None or self.chunks is None:
            self.chunks = None
        else:
            self.chunks.append(chunk)

    def add_column(self, samples: Iterable[list] | Callable[[], list], chunks: Iterable[bytes | None]) -> None:
        """Many workers' parts at once (C-speed list building): their sample lists, or one callable
        making all of them, and one chunk each."""
        if callable(samples):
            self._parts.append(samples)
        else:
            self._parts.extend(samples)
        if self.chunks is not None:
            column = list(chunks)
            if None in column:
                self.chunks = None
            else:
                self.chunks.extend(cast(list[bytes], column))
