"""What each subject brought, per source: received, accepted, rejected by reason, and the
last few rejected payloads (truncated), for the status page (`/`, `/api/v1/sources`).

The per-kind counts (state/ingest_counts.py) say *that* messages were rejected; this says on
which subject, what they looked like and when, so an operator can tell why a worker is not
on /metrics. Plain attributes without a lock, like the per-kind counts: only the event loop's
thread writes; the status page reads copies from its render thread.

Bounded: `max_subjects` per source, `RECENT_REJECTS` payloads per subject of at most
`PAYLOAD_BYTES` bytes each. A full source first lets go of the subjects silent for
`IDLE_SUBJECT_SECONDS` (pull mode names a subject per worker, and workers come and go), at
most once per `SWEEP_SECONDS`; what still does not fit is counted under `OTHER_SUBJECTS`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

MAX_SUBJECTS = 2_000  # per source; a real fleet has a few per component
RECENT_REJECTS = 5
PAYLOAD_BYTES = 256
DETAIL_CHARS = 300
OTHER_SUBJECTS = "(other subjects)"
IDLE_SUBJECT_SECONDS = 3600.0
SWEEP_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class RejectedPayload:
    at: float  # on the ingest clock (monotonic)
    reason: str  # a constant of aggregator.rejects
    detail: str  # the decoder's words, truncated to DETAIL_CHARS
    payload: bytes  # the first PAYLOAD_BYTES bytes, as received
    size: int  # the whole payload's size in bytes


class SubjectTally:
    """One subject of one source. `component` is the component the subject names (or the fixed one
    of a namespace-level subject), worked out once; None for OTHER_SUBJECTS."""

    __slots__ = ("accepted", "component", "kind", "last_rejects", "last_seen", "received", "rejected", "source",
                 "subject")

    def __init__(self, source: str, subject: str, kind: str, component: str | None) -> None:
        self.source = source
        self.subject = subject
        self.kind = kind
        self.component = component
        self.received = 0
        self.accepted = 0
        self.last_seen: float | None = None  # the last message, used or not
        self.rejected: dict[str, int] | None = None  # made at the first reject: most subjects never have one
        self.last_rejects: deque[RejectedPayload] | None = None

    def reject(self, reason: str, detail: str, payload: bytes, now: float) -> None:
        """Count a reject (the message was counted as received already) and keep its payload."""
        if self.rejected is None:
            self.rejected = {}
            self.last_rejects = deque(maxlen=RECENT_REJECTS)
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        assert self.last_rejects is not None
        self.last_rejects.append(RejectedPayload(now, reason, detail[:DETAIL_CHARS], bytes(payload[:PAYLOAD_BYTES]),
                                                 len(payload)))


class SourceSubjects:
    """The subjects of one source."""

    def __init__(self, source: str, max_subjects: int = MAX_SUBJECTS) -> None:
        self.source = source
        self.max_subjects = max_subjects
        self.tallies: dict[str, SubjectTally] = {}  # read directly by the hot path
        self._other: SubjectTally | None = None
        self._swept: float | None = None

    def of(self, subject: str, kind: str, component: str | None, now: float) -> SubjectTally:
        """The tally of `subject` (made on first use), or OTHER_SUBJECTS's while `max_subjects` are known."""
        tally = self.tallies.get(subject)
        if tally is not None:
            return tally
        if len(self.tallies) >= self.max_subjects:
            self._sweep(now)
        if len(self.tallies) < self.max_subjects:
            tally = self.tallies[subject] = SubjectTally(self.source, subject, kind, component)
            return tally
        if self._other is None:
            self._other = SubjectTally(self.source, OTHER_SUBJECTS, "", None)
        return self._other

    def _sweep(self, now: float) -> None:
        if self._swept is not None and now - self._swept < SWEEP_SECONDS:
            return
        self._swept = now
        idle_since = now - IDLE_SUBJECT_SECONDS
        for subject in [s for s, tally in self.tallies.items()
                        if tally.last_seen is None or tally.last_seen < idle_since]:
            del self.tallies[subject]  # in place: the feeds hold this dict

    def all(self) -> list[SubjectTally]:
        """Every subject seen, OTHER_SUBJECTS last; safe to call from another thread."""
        tallies = list(self.tallies.values())
        if self._other is not None:
            tallies.append(self._other)
        return tallies


class SubjectActivity:
    """Every source's subjects."""

    def __init__(self, max_subjects: int = MAX_SUBJECTS) -> None:
        self.max_subjects = max_subjects
        self._sources: dict[str, SourceSubjects] = {}

    def of(self, source: str) -> SourceSubjects:
        subjects = self._sources.get(source)
        if subjects is None:
            subjects = self._sources[source] = SourceSubjects(source, self.max_subjects)
        return subjects

    def all(self) -> list[SubjectTally]:
        """Every subject of every source; safe to call from another thread."""
        return [tally for subjects in list(self._sources.values()) for tally in subjects.all()]
