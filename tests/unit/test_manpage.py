"""The committed man page is generated from the same parser as the CLI: it must not drift."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def body(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith(".TH ")]  # .TH carries the date


def test_manpage_matches_parser(tmp_path):
    pytest.importorskip("build_manpages", reason="argparse-manpage is not installed (pip install '.[test]')")
    exe = Path(sys.executable).parent / "argparse-manpage"
    out = tmp_path / "dxflow.1"
    subprocess.run([str(exe), "--module", "dxflow.cli", "--function", "build_parser", "--prog", "dxflow",
                    "--project-name", "dxflow", "--manual-title", "dxflow manual", "--description",
                    "reach the nodes of your running HPC jobs", "--output", str(out)], check=True, cwd=ROOT)
    committed = ROOT / "docs" / "man" / "dxflow.1"
    assert body(out.read_text()) == body(committed.read_text()), "run scripts/manpages.sh and commit"
