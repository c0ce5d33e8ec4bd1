"""The series in bounded memory (:mod:`dxflow.metrics.history`): full resolution for the last hour,
coarser before, bounded bytes for any length of job, peaks kept as peaks."""

from __future__ import annotations

import math

import pytest

from dxflow import metrics
from dxflow.errors import UsageError
from dxflow.metrics.history import History
from dxflow.metrics.summary import columns


def test_the_last_hour_at_full_resolution_then_buckets():
    h = History([("cpu", "mean"), ("mem", "max"), ("count", "last")], interval=2.0)
    t0 = 1_000_000.0
    for i in range(3 * 1800):  # three hours at 2 s
        h.add(t0 + 2 * i, [float(i % 2), float(i), float(i)])
    rows = h.rows()
    recent = [r for r in rows if r[0] > t0 + 2 * (3 * 1800 - 1) - 3600]
    assert len(recent) == 1800 and all(b[0] - a[0] == 2.0 for a, b in zip(recent, recent[1:]))
    older = rows[:len(rows) - 1800]
    assert 110 <= len(older) <= 125  # two hours in one-minute buckets
    assert all(abs(r[1] - 0.5) < 0.05 for r in older)          # mean of 0,1,0,1…
    assert all(r[2] == r[3] for r in older)                     # max of a growing figure = its last
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)


def test_bytes_stay_bounded_for_any_job_length():
    cols = columns(8)  # the widest case worth a bound: 8 GPUs
    h = History(cols, interval=2.0)
    sizes = []
    t = 0.0
    for day in range(3):
        for _ in range(43200):  # a day at 2 s
            t += 2.0
            h.add(t, [1.0] * len(cols))
        sizes.append(h.nbytes())
    assert sizes[-1] < 10 * 2**20                     # under 10 MiB (issue #16's goal for a day)
    assert sizes[2] <= sizes[0] * 1.1                 # and it does not grow with the job's length
    assert len(h) <= 1800 + 1440 + 1


def test_halving_keeps_the_peak():
    h = History([("mem", "max")], interval=1.0, recent_seconds=10, width=1.0, max_older=4)
    for i in range(40):
        h.add(float(i), [100.0 if i == 3 else 1.0])
    assert max(r[1] for r in h.rows()) == 100.0
    assert h.width > 1.0


def test_unknown_figures_are_none_and_skipped_in_means():
    h = History([("a", "mean")], interval=1.0, recent_seconds=1, width=10.0)
    for i, v in enumerate([None, 2.0, None, 4.0]):
        h.add(float(i), [v])
    rows = h.rows()
    assert rows[0][1] == 2.0 or rows[0][1] == 3.0
    assert rows[-1][1] == 4.0
    h2 = History([("a", "mean")], interval=1.0)
    h2.add(0.0, [None])
    assert h2.rows() == [[0.0, None]]
    assert not any(isinstance(v, float) and math.isnan(v) for r in h.rows() for v in r)


def test_since_filters_rows():
    h = History([("a", "mean")], interval=1.0)
    for i in range(10):
        h.add(float(i), [float(i)])
    assert [r[0] for r in h.rows(since=7.0)] == [7.0, 8.0, 9.0]


def test_parse_since():
    assert metrics.parse_since("10m", now=1000.0) == 400.0
    assert metrics.parse_since("90s", now=1000.0) == 910.0
    assert metrics.parse_since("600", now=1000.0) == 400.0
    assert metrics.parse_since("1796000000", now=1000.0) == 1796000000.0
    for bad in ("", "ten minutes", "-5m", "5w", "1e9"):
        with pytest.raises(UsageError):
            metrics.parse_since(bad)
