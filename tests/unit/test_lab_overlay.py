"""``dxflow.lab.generation.mount_overlay``, shared by the lab's namespaces, its venv build and the fixture
capture: a real overlay in a private mount namespace (root only), its writes kept off the lower tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                reason="mounting needs root and unshare(1)")

SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from dxflow.lab.generation import mount_overlay
    root, scratch, options = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] or None
    merged = mount_overlay(root, scratch, options)
    assert merged == scratch / "merged", merged
    assert (merged / "lower.txt").read_text() == "from the root"
    (merged / "lower.txt").write_text("changed above")
    (merged / "new.txt").write_text("new")
    assert (scratch / "upper" / "new.txt").read_text() == "new"
    print(oct((scratch).stat().st_mode & 0o7777))
""")


@pytest.mark.parametrize("options, mode", [("mode=0755", "0o755"), ("", "0o1777")])
def test_writes_go_to_the_tmpfs_and_the_root_is_untouched(tmp_path, options, mode):
    root, scratch = tmp_path / "root", tmp_path / "scratch"
    root.mkdir()
    scratch.mkdir()
    (root / "lower.txt").write_text("from the root")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", SCRIPT,
                           str(root), str(scratch), options], capture_output=True, text=True, timeout=60)
    if done.returncode != 0 and "Operation not permitted" in done.stderr:
        pytest.skip(f"no mount namespace here: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [mode]  # the tmpfs's own mode: as asked, or the kernel's default
    assert (root / "lower.txt").read_text() == "from the root"
    assert sorted(p.name for p in root.iterdir()) == ["lower.txt"]
    assert list(scratch.iterdir()) == []  # the tmpfs went with the namespace
