"""Byte counts in binary units, written in one place (:func:`dxflow.metrics.report.human_bytes`): two
decimals in the efficiency report, one in the CLI's tables (:func:`dxflow.cli.util.human_bytes`)."""

from __future__ import annotations

import pytest

from dxflow.cli.util import human_bytes as in_tables
from dxflow.metrics.report import human_bytes as in_report


@pytest.mark.parametrize("n, report, table", [
    (None, "-", "-"),
    (0, "0 B", "0 B"),
    (1023, "1023 B", "1023 B"),
    (1536, "1.50 KiB", "1.5 KiB"),
    (3 * 1024 ** 3, "3.00 GiB", "3.0 GiB"),
    (2 * 1024 ** 5, "2048.00 TiB", "2048.0 TiB"),  # TiB is the largest unit
])
def test_report_and_tables_agree_but_for_the_decimals(n, report, table):
    assert in_report(n) == report
    assert in_tables(n) == table
