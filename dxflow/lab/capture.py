"""Real Slurm output from each generation, kept as test fixtures (issue #12).

``python -m dxflow.lab.capture [--generation 24.11 ...] [--out tests/fixtures/slurm]`` (as root) runs,
for each generation, a throwaway two-node Slurm inside that generation's cached root file system
(:mod:`dxflow.lab.rootfs`), submits pending, running, array, heterogeneous, multi-task and multi-node
jobs as ``alice`` with ``%j %A %a %N %u %x`` output patterns, and keeps what that Slurm printed
(``squeue --json``, ``scontrol --json``, ``sinfo --json``, plain ``squeue``), the output files it
made, and the environments its prolog and epilog saw. :mod:`dxflow.lab.capture_inside` is what runs
in there: it uses the root's own Python and nothing of dxflow.

Nothing of it touches the lab or the host: it runs in mount, PID, network (loopback only), UTS and
IPC namespaces of its own, on an overlay whose writes vanish with it, so the cached root stays as
built and munged's socket, slurmctld's state and every port are its own.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from dxflow.lab import rootfs
from dxflow.lab.generation import mount_overlay
from dxflow.lab.runner import LabError, run

log = logging.getLogger(__name__)

INSIDE_SCRIPT = Path(__file__).with_name("capture_inside.py")
#: Where the inside script and its output folder appear in the root.
INSIDE_DIR = "/opt/dxflow-capture"
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "slurm"
#: The only environment the namespaces get: nothing of the caller's (tokens, paths) reaches a fixture.
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}


def capture(name: str, out: Path = DEFAULT_OUT, *, timeout: float = 900) -> Path:
    """Capture generation ``name`` into ``out/<name>``; the folder is replaced only on success."""
    root = rootfs.ensure(name)
    with tempfile.TemporaryDirectory(prefix=f"dxflow-capture-{name}-") as tmp:
        result = Path(tmp) / "out"
        result.mkdir()
        (Path(tmp) / "ns").mkdir()
        argv = ["unshare", "--mount", "--pid", "--fork", "--net", "--uts", "--ipc", "--propagation=private",
                sys.executable, "-m", "dxflow.lab.capture", "--inside", str(root), tmp]
        proc = subprocess.run(argv, env={**CLEAN_ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        (result / "capture.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            keep = Path(tempfile.mkdtemp(prefix=f"dxflow-capture-{name}-failed-"))
            shutil.copytree(result, keep, dirs_exist_ok=True)
            raise LabError(f"capturing Slurm {name} failed; what it left is in {keep}", argv=argv,
                           returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)
        (result / "capture.log").unlink()
        shutil.rmtree(result / "logs", ignore_errors=True)  # daemons' logs help only when it fails
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(result, target)
    return target


def enter(root: Path, tmp: Path) -> None:
    """In the new namespaces (PID 1 of its own): an overlay of ``root`` (its writes on a tmpfs over
    ``tmp/ns``), the usual kernel file systems, ``tmp/out`` bound in for the results; then the root's
    Python runs the inside script as PID 1."""
    scratch, result = tmp / "ns", tmp / "out"
    merged = mount_overlay(root, scratch, "mode=0755")
    run(["mount", "-t", "proc", "proc", str(merged / "proc")], what="mounting /proc")
    run(["mount", "-t", "sysfs", "sysfs", str(merged / "sys")], what="mounting /sys")
    for tmpfs in ("run", "tmp"):
        run(["mount", "-t", "tmpfs", "tmpfs", str(merged / tmpfs)], what=f"mounting /{tmpfs}")
    inside = merged / INSIDE_DIR.lstrip("/")
    (inside / "out").mkdir(parents=True)
    shutil.copy(INSIDE_SCRIPT, inside / "capture_inside.py")
    run(["mount", "--bind", str(result), str(inside / "out")], what="binding the result folder")
    os.chroot(merged)
    os.chdir("/")
    os.execve("/usr/bin/python3", ["python3", f"{INSIDE_DIR}/capture_inside.py", f"{INSIDE_DIR}/out"],
              CLEAN_ENV)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dxflow.lab.capture", description=__doc__.split("\n")[0])
    parser.add_argument("--generation", action="append", choices=list(rootfs.GENERATIONS),
                        help="a Slurm generation (repeatable; default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"fixtures folder (default {DEFAULT_OUT})")
    parser.add_argument("--inside", nargs=2, metavar=("ROOT", "TMP"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.inside:
        enter(Path(args.inside[0]), Path(args.inside[1]))
        return 1  # not reached: execve
    if os.geteuid() != 0:
        parser.error("run as root: it builds root file systems and makes namespaces")
    for name in args.generation or list(rootfs.GENERATIONS):
        log.info("Slurm %s: %s", name, capture(name, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
