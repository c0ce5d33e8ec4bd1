"""A job's series on one node in bounded memory, whatever the job's length.

Two tiers of compact ``array('d')`` columns (8 bytes a figure, no Python object per value):

- *recent*: every sample of the last ``recent_seconds`` (an hour at 2 s: 1,800 rows);
- *older*: one row per bucket of ``width`` seconds (first a minute). When it holds more than
  ``max_older`` rows, pairs of rows are merged and the width doubles: a job of any length keeps at
  most ``max_older`` older rows, each covering more time as the job goes on.

A row leaving *recent* joins the bucket being filled; how its figures combine is the column's kind:
``mean`` (rates, utilisation), ``max`` (memory: a downsampled peak stays a peak) or ``last``
(counters that only grow). Unknown figures are NaN and do not count in a mean.
"""

from __future__ import annotations

import math
from array import array
from typing import Iterable, Sequence

KINDS = ("mean", "max", "last")
NAN = float("nan")


class _Table:
    def __init__(self, width: int) -> None:
        self.t = array("d")
        self.cols = [array("d") for _ in range(width)]

    def __len__(self) -> int:
        return len(self.t)

    def append(self, t: float, values: Sequence[float]) -> None:
        self.t.append(t)
        for col, v in zip(self.cols, values):
            col.append(v)

    def pop_front(self) -> tuple[float, list[float]]:
        t = self.t.pop(0)
        return t, [col.pop(0) for col in self.cols]

    def nbytes(self) -> int:
        return sum(a.buffer_info()[1] * a.itemsize for a in (self.t, *self.cols))

    def rows(self, since: float) -> Iterable[list]:
        for i, t in enumerate(self.t):
            if t >= since:
                yield [t] + [None if math.isnan(c[i]) else c[i] for c in self.cols]


def combine(kind: str, values: Sequence[float]) -> float:
    known = [v for v in values if not math.isnan(v)]
    if not known:
        return NAN
    if kind == "mean":
        return sum(known) / len(known)
    if kind == "max":
        return max(known)
    return known[-1]


class History:
    """The series of one node: ``add`` a sample (a time and one figure per column), read ``rows``."""

    def __init__(self, columns: Sequence[tuple[str, str]], interval: float, recent_seconds: float = 3600.0,
                 width: float = 60.0, max_older: int = 1440) -> None:
        for name, kind in columns:
            if kind not in KINDS:
                raise ValueError(f"column {name}: kind {kind!r} is not one of {KINDS}")
        self.names = [n for n, _ in columns]
        self.kinds = [k for _, k in columns]
        self.interval = interval
        self.recent_rows = max(1, int(round(recent_seconds / interval)))
        self.width = width
        self.max_older = max_older
        self.recent = _Table(len(columns))
        self.older = _Table(len(columns))
        self._bucket: list[tuple[float, list[float]]] = []
        self._bucket_key: float | None = None

    def add(self, t: float, values: Sequence[float | None]) -> None:
        if len(values) != len(self.names):
            raise ValueError(f"{len(values)} figures for {len(self.names)} columns")
        self.recent.append(t, [NAN if v is None else float(v) for v in values])
        while len(self.recent) > self.recent_rows:
            self._to_older(*self.recent.pop_front())

    def _to_older(self, t: float, values: list[float]) -> None:
        key = math.floor(t / self.width)
        if self._bucket and key != self._bucket_key:
            self._flush()
        self._bucket_key = key
        self._bucket.append((t, values))

    def _flush(self) -> None:
        rows = self._bucket
        self._bucket = []
        columns = list(zip(*(v for _, v in rows)))
        self.older.append(rows[-1][0], [combine(k, c) for k, c in zip(self.kinds, columns)])
        if len(self.older) > self.max_older:
            self._halve()

    def _halve(self) -> None:
        """Merge the older rows pairwise: half as many, each twice as long."""
        old = self.older
        self.older = _Table(len(self.names))
        n = len(old)
        for i in range(0, n, 2):
            j = min(i + 1, n - 1)
            self.older.append(old.t[j], [combine(k, (c[i], c[j]) if j != i else (c[i],))
                                         for k, c in zip(self.kinds, old.cols)])
        self.width *= 2

    def rows(self, since: float = 0.0) -> list[list]:
        """Rows ``[t, figure…]`` from ``since`` on (epoch seconds), oldest first; None for unknown.
        The bucket being filled is included as one row."""
        out = list(self.older.rows(since))
        if self._bucket and self._bucket[-1][0] >= since:
            columns = list(zip(*(v for _, v in self._bucket)))
            values = [combine(k, c) for k, c in zip(self.kinds, columns)]
            out.append([self._bucket[-1][0]] + [None if math.isnan(v) else v for v in values])
        out.extend(self.recent.rows(since))
        return out

    def __len__(self) -> int:
        return len(self.older) + (1 if self._bucket else 0) + len(self.recent)

    def nbytes(self) -> int:
        """Bytes the figures take (arrays' allocated size; the bucket being filled is small)."""
        return self.recent.nbytes() + self.older.nbytes() + len(self._bucket) * (len(self.names) + 1) * 8

    def last(self) -> dict[str, float | None]:
        """The newest sample by column name (empty before the first)."""
        if not len(self.recent):
            return {}
        i = len(self.recent) - 1
        values = [c[i] for c in self.recent.cols]
        return {"t": self.recent.t[i], **{n: None if math.isnan(v) else v for n, v in zip(self.names, values)}}
