"""The test tree itself: `pytest tests` collects both tiers.

pytest imports a test module by its file's base name (no ``__init__.py`` here, the default import
mode), so two test files of the same name in ``tests/unit`` and ``tests/lab`` stop the whole
collection of ``pytest tests`` (the README's test command) with "import file mismatch".
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_no_two_test_files_share_a_name():
    where: dict[str, list[str]] = defaultdict(list)
    for path in TESTS.rglob("test_*.py"):
        where[path.name].append(str(path.relative_to(TESTS)))
    assert {name: paths for name, paths in where.items() if len(paths) > 1} == {}

