"""A lab of another Slurm generation, beside the host's: ``dxflow lab up --slurm 24.11`` (issue #12).

Slurm's clients must match its controller's generation, so a generation the host does not have runs
whole — login node included — inside that generation's cached root file system (:mod:`dxflow.lab.rootfs`).
The lab is the host lab's own code (:mod:`dxflow.lab.cluster`) run in there, in one outer set of
namespaces of its own, so that it runs beside the host lab and shares nothing with it:

- mount: ``/`` is an overlay of the cached root (its writes on a tmpfs: the cache stays as built), with
  fresh ``/proc``, ``/sys``, ``/run``, ``/tmp`` and ``/dev``; a home of its own
  (``/var/lib/dxflow-lab-gen/<G>/home``: a user's ``~/.dxflow/master.sock`` must not be the host lab's);
  the checkout bound read-only at its own path; the cached venv (:func:`ensure_venv`) at ``/opt/dxflow/venv``;
- net: the bridge ``dxlab0``, ``10.77.0.0/24`` and the node namespaces ``dxlab-nX`` of the host lab, the
  same names and addresses in a network namespace of their own (the lab tests need no other names);
- PID, UTS, IPC: its own; PID 1 only reaps. Killing it ends every process of that lab, and the kernel
  then drops its namespaces and mounts: that is ``lab down --slurm G``.

The host runs commands in there with ``nsenter --target <PID 1> --all`` (:func:`enter_argv`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from dxflow.errors import UsageError
from dxflow.lab import install, rootfs, slurm
from dxflow.lab.runner import LabError, run

log = logging.getLogger(__name__)

#: One folder per generation lab: ``keeper.json`` (PID 1's host PID), ``keeper.log``, ``home/``.
STATE_DIR = Path("/var/lib/dxflow-lab-gen")
#: One venv per generation, from the root's own python3 (3.13 on trixie, 3.14 on sid), kept between labs.
VENV_CACHE = Path("/var/cache/dxflow-lab/venv")
VENV_MARKER = ".dxflow-venv.json"
#: Mount points of the namespaces' overlays: made on the host's /run, mounted on only in there.
SCRATCH = Path("/run/dxflow-lab-gen")
#: Where the venv appears inside the root: where the host lab's code looks for it (Layout.venv).
VENV_INSIDE = "/opt/dxflow/venv"
#: What the venv gets besides dxflow: pytest and pexpect for the lab tests run in there.
TEST_PACKAGES = ("pytest>=7", "pexpect>=4.8")
CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
             "LANG": "C.UTF-8"}
#: PID 1 of a generation lab: reap whatever ends (daemons are reparented to it), leave on SIGTERM.
INIT = ("import os, signal, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: os._exit(0))\n"
        "while True:\n"
        "    try:\n"
        "        os.wait()\n"
        "    except ChildProcessError:\n"
        "        time.sleep(1)\n")
#: Host files a venv build reads in the root: DNS, and pip's certificate settings of this machine.
BUILD_BINDS = ("/etc/resolv.conf", "/etc/pip.conf", "/etc/ssl/certs/ca-certificates.crt")


def host_generation() -> str:
    """The host's own Slurm generation ("22.05"), from ``slurmd -V``; "" when it has none."""
    if shutil.which("slurmd") is None:
        return ""
    major, minor, _ = slurm.slurm_version()
    return f"{major}.{minor:02d}"


def is_host(name: str | None) -> bool:
    """True when ``name`` means the host lab: none given, or the host's own generation."""
    if name is None:
        return True
    rootfs.generation(name)  # an unknown name is a clear error here
    return name == host_generation()


def source_tree() -> Path:
    source = install.find_source_tree()
    if source is None:
        raise UsageError("a lab of another Slurm generation installs dxflow from its checkout; "
                         "this dxflow is an installed copy (run it from a checkout)")
    return source


def lab_dir(name: str) -> Path:
    return STATE_DIR / rootfs.generation(name).name


# --- PID 1 of a generation lab ------------------------------------------------------------------

def keeper_pid(name: str) -> int | None:
    """The host PID of the lab's PID 1 when it runs (checked against its start time), else None."""
    try:
        data = json.loads((lab_dir(name) / "keeper.json").read_text())
        pid, started = int(data["pid"]), data["started"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if _start_time(pid) == started else None


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: tells a PID from a later process that reused it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def running() -> list[str]:
    """The generations whose lab runs now."""
    return [g for g in rootfs.GENERATIONS if keeper_pid(g) is not None]


def start_keeper(name: str, root: Path, venv: Path) -> int:
    """Make the namespaces and PID 1 of generation ``name``'s lab; return PID 1's host PID."""
    folder = lab_dir(name)
    (folder / "home").mkdir(parents=True, exist_ok=True)
    ready = folder / "ready"
    ready.unlink(missing_ok=True)
    argv = ["unshare", "--mount", "--pid", "--fork", "--net", "--uts", "--ipc", "--propagation=private",
            sys.executable, "-m", "dxflow.lab.generation", "--enter", name, str(root), str(venv), str(source_tree())]
    with open(folder / "keeper.log", "ab") as logf:
        outer = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True,
                                 env={**CLEAN_ENV, "PYTHONPATH": str(source_tree())})
    deadline = time.monotonic() + 60
    while not ready.exists():
        if outer.poll() is not None or time.monotonic() > deadline:
            outer.kill()
            raise LabError(f"the Slurm {name} lab's namespaces did not come up; see {folder / 'keeper.log'}")
        time.sleep(0.2)
    children = Path(f"/proc/{outer.pid}/task/{outer.pid}/children").read_text().split()
    pid = int(children[0])
    (folder / "keeper.json").write_text(json.dumps({"pid": pid, "started": _start_time(pid), "generation": name}) + "\n")
    return pid


def enter(name: str, root: Path, venv: Path, source: Path) -> None:
    """In the new namespaces, as their PID 1: the overlay and mounts (module docstring), then ``INIT``."""
    folder = lab_dir(name)
    scratch = SCRATCH / name  # an empty folder left on the host; down removes it
    scratch.mkdir(parents=True, exist_ok=True)
    merged = mount_overlay(root, scratch, "mode=0755")
    mount_system(merged)
    for host, inside, readonly in ((folder / "home", "/home", False), (venv, VENV_INSIDE, False),
                                   (source, str(source), True)):
        bind(host, merged / inside.lstrip("/"), readonly=readonly)
    run(["ip", "link", "set", "lo", "up"], what="bringing the loopback up")
    run(["hostname", "dxlab-login"], what="naming the login node")
    (folder / "ready").touch()
    os.chroot(merged)
    os.chdir("/")
    os.execve("/usr/bin/python3", ["python3", "-c", INIT], CLEAN_ENV)


def mount_overlay(root: Path, scratch: Path, tmpfs_options: str | None = None) -> Path:
    """A writable overlay of ``root`` whose writes go to a tmpfs mounted on ``scratch`` (mount options
    ``tmpfs_options``); its merged folder, ``scratch/merged``. Lab and fixture capture alike."""
    run(["mount", "-t", "tmpfs"] + (["-o", tmpfs_options] if tmpfs_options else []) + ["tmpfs", str(scratch)],
        what="a scratch tmpfs")
    for sub in ("upper", "work", "merged"):
        (scratch / sub).mkdir()
    merged = scratch / "merged"
    run(["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={root},upperdir={scratch / 'upper'},workdir={scratch / 'work'}", str(merged)],
        what="an overlay on the root file system")
    return merged


def mount_system(merged: Path) -> None:
    """/proc, /sys, /run, /tmp and a /dev of the namespaces' own (host device nodes, own ptys)."""
    run(["mount", "-t", "proc", "proc", str(merged / "proc")], what="mounting /proc")
    run(["mount", "-t", "sysfs", "sysfs", str(merged / "sys")], what="mounting /sys")
    for tmpfs in ("run", "tmp"):
        run(["mount", "-t", "tmpfs", "-o", "mode=1777" if tmpfs == "tmp" else "mode=0755", "tmpfs",
             str(merged / tmpfs)], what=f"mounting /{tmpfs}")
    dev = merged / "dev"
    run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(dev)], what="mounting /dev")
    for node in ("null", "zero", "full", "random", "urandom", "tty"):
        bind(Path("/dev") / node, dev / node)
    (dev / "pts").mkdir()
    (dev / "shm").mkdir(mode=0o1777)
    run(["mount", "-t", "devpts", "-o", "newinstance,ptmxmode=0666,mode=0620", "devpts", str(dev / "pts")],
        what="mounting /dev/pts")
    (dev / "ptmx").symlink_to("pts/ptmx")
    for fd, link in enumerate(("stdin", "stdout", "stderr")):
        (dev / link).symlink_to(f"/proc/self/fd/{fd}")
    (dev / "fd").symlink_to("/proc/self/fd")


def bind(host: Path, target: Path, *, readonly: bool = False) -> None:
    if host.is_dir():
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch(exist_ok=True)
    run(["mount", "--bind", str(host), str(target)], what=f"binding {host}")
    if readonly:
        run(["mount", "-o", "remount,bind,ro", str(target)], what=f"making {target} read-only")


def enter_argv(pid: int) -> list[str]:
    """Run what follows in every namespace, and the root, of the lab whose PID 1 is ``pid``."""
    return ["nsenter", f"--target={pid}", "--mount", "--uts", "--ipc", "--net", "--pid", "--root", "--wd", "--"]


# --- the venv ------------------------------------------------------------------------------------

def ensure_venv(name: str, root: Path, *, cache: Path = VENV_CACHE, timeout: float = 1800) -> Path:
    """A venv of the root's python3 holding an editable install of this checkout, built once per generation.

    Built in a mount namespace only (the host's network reaches the package index), on a throwaway
    overlay of the root, the venv folder bound at ``/opt/dxflow/venv`` where it also runs later."""
    source = source_tree()
    venv = cache / rootfs.generation(name).name
    marker = venv / VENV_MARKER
    want = {"generation": name, "source": str(source), "requirements": requirements_digest(source)}
    try:
        if json.loads(marker.read_text()) == want:
            return venv
    except (OSError, ValueError):
        pass
    # pip installs again over what is there (a running lab keeps using the venv meanwhile)
    venv.mkdir(parents=True, exist_ok=True)
    log.info("building the Slurm %s lab's venv (the root's python3, dxflow from %s and its dependencies) in %s",
             name, source, venv)
    pip = [f"{VENV_INSIDE}/bin/python", "-m", "pip", "install", "--quiet", "--no-warn-script-location"]
    constraints = ["-c", str(source / "constraints.txt")] if (source / "constraints.txt").is_file() else []
    script = " && ".join([shlex.join(["/usr/bin/python3", "-m", "venv", VENV_INSIDE]),
                          shlex.join([*pip, *constraints, "-e", str(source), *TEST_PACKAGES])])
    env = {**CLEAN_ENV, **{k: v for k, v in os.environ.items() if k.startswith("PIP_") and k != "PIP_FIND_LINKS"}}
    argv = ["unshare", "--mount", "--propagation=private", sys.executable, "-m", "dxflow.lab.generation",
            "--build-venv", name, str(root), str(venv), str(source), script]
    try:
        run(argv, env={**env, "PYTHONPATH": str(source)}, timeout=timeout, what=f"building the Slurm {name} venv")
    finally:
        for empty in SCRATCH.glob("build-*"):
            _rmdir(empty)
    marker.write_text(json.dumps(want) + "\n")
    return venv


def requirements_digest(source: Path) -> str:
    """What the venv's dependencies come from: a changed setup.cfg or constraints.txt rebuilds it."""
    digest = hashlib.sha256()
    for name in ("setup.cfg", "constraints.txt"):
        try:
            digest.update((source / name).read_bytes())
        except OSError:
            digest.update(b"-")
    return digest.hexdigest()


def build_venv(root: Path, venv: Path, source: Path, script: str) -> None:
    """In a new mount namespace: a throwaway overlay of ``root`` with the venv, checkout and BUILD_BINDS
    bound in; ``script`` runs chrooted there."""
    scratch = SCRATCH / f"build-{os.getpid()}"  # an empty folder left on the host; ensure_venv removes it
    scratch.mkdir(parents=True)
    merged = mount_overlay(root, scratch)
    mount_system(merged)
    bind(venv, merged / VENV_INSIDE.lstrip("/"))
    # writable here only: setuptools rewrites dxflow.egg-info (git-ignored) for the editable install
    bind(source, merged / str(source).lstrip("/"))
    for f in BUILD_BINDS:
        if Path(f).is_file():
            (merged / f.lstrip("/")).unlink(missing_ok=True)
            bind(Path(f), merged / f.lstrip("/"), readonly=True)
    os.chroot(merged)
    os.chdir("/")
    os.execve("/bin/sh", ["sh", "-c", script], dict(os.environ))


# --- up, down, status, exec -----------------------------------------------------------------------

def inside(name: str, argv: list[str], **kw) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as root on the login node of generation ``name``'s running lab."""
    pid = keeper_pid(name)
    if pid is None:
        raise UsageError(f"no Slurm {name} lab runs here; start it with `dxflow lab up --slurm {name}`")
    return run([*enter_argv(pid), *argv], env=CLEAN_ENV, **kw)


def add_users(name: str, users: tuple[str, ...] = ("alice", "bob")) -> None:
    """The lab's users with the host's uids and gids, so that files the tests hand around keep their owners."""
    import pwd

    for user in users:
        if inside(name, ["id", "-u", user], check=False).returncode == 0:
            continue
        try:
            entry = pwd.getpwnam(user)
            ids = ["-u", str(entry.pw_uid), "-g", str(entry.pw_gid)]
            inside(name, ["groupadd", "-g", str(entry.pw_gid), user], what=f"creating group {user}")
        except KeyError:
            ids = []
        inside(name, ["useradd", "-m", "-s", "/bin/bash", *ids, user], what=f"creating user {user}")


def up(name: str, node_count: int = 2) -> dict:
    """Build (or repair) generation ``name``'s lab; returns its status."""
    # a running lab keeps the root it overlays: a rebuild now would pull it from under its processes
    root = rootfs.path(name) if keeper_pid(name) else rootfs.ensure(name)
    venv = ensure_venv(name, root)
    if keeper_pid(name) is None:
        log.info("starting the Slurm %s lab's namespaces on %s", name, root)
        start_keeper(name, root, venv)
        add_users(name)
    proc = inside(name, [f"{VENV_INSIDE}/bin/dxflow", "lab", "up", "--no-install", "--nodes", str(node_count),
                         "--json"], check=False, timeout=600, what=f"`dxflow lab up` in the Slurm {name} lab")
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise LabError(f"`dxflow lab up` in the Slurm {name} lab failed (exit {proc.returncode}); "
                       f"`dxflow lab down --slurm {name}` removes what it made", stderr=proc.stderr)
    return with_generation(json.loads(proc.stdout), name)


def status(name: str) -> dict:
    if keeper_pid(name) is None:
        return {"state": "down", "generation": name, "cluster": "dxlab", "login": {"name": "dxlab-login",
                "addr": ""}, "daemons": {}, "nodes": [], "users": [], "slurm_version": "", "cgroups": "off"}
    proc = inside(name, [f"{VENV_INSIDE}/bin/dxflow", "lab", "status", "--json"], check=False, timeout=60)
    try:
        return with_generation(json.loads(proc.stdout), name)
    except ValueError:
        raise LabError(f"`dxflow lab status` in the Slurm {name} lab printed no status",
                       stderr=proc.stderr) from None


def with_generation(info: dict, name: str) -> dict:
    info["generation"] = name
    info["keeper_pid"] = keeper_pid(name)
    return info


def down(name: str) -> None:
    """Kill the lab's PID 1 (so every process of it, its namespaces and mounts), then its folder."""
    pid = keeper_pid(name)
    if pid is not None:
        log.info("stopping the Slurm %s lab (PID 1 is %d here)", name, pid)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _start_time(pid) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
    shutil.rmtree(lab_dir(name), ignore_errors=True)
    _rmdir(SCRATCH / name)
    log.info("the Slurm %s lab is down (its venv stays cached in %s)", name, VENV_CACHE / name)


def _rmdir(path: Path) -> None:
    """Remove an empty mount point the host saw made; a busy or filled one stays."""
    try:
        path.rmdir()
    except OSError:
        pass


def exec_argv(name: str | None, user: str, command: list[str]) -> list[str]:
    """``command`` as ``user`` would run it on the login node of that lab: a login shell (the lab's
    ``dxflow`` on PATH), in the generation lab's namespaces unless ``name`` is the host's."""
    if not command:
        raise UsageError("`dxflow lab exec` needs a command after `--`")
    login = ["runuser", "-l", user, "-c", shlex.join(command)]
    if is_host(name):
        return login
    assert name is not None
    pid = keeper_pid(name)
    if pid is None:
        raise UsageError(f"no Slurm {name} lab runs here; start it with `dxflow lab up --slurm {name}`")
    return [*enter_argv(pid), *login]


def main(argv: list[str]) -> int:
    """Entry points of the namespaces made above (not for people)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if argv[:1] == ["--enter"]:
        enter(argv[1], Path(argv[2]), Path(argv[3]), Path(argv[4]))
    elif argv[:1] == ["--build-venv"]:
        build_venv(Path(argv[2]), Path(argv[3]), Path(argv[4]), argv[5])
    return 2  # not reached: both exec


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
