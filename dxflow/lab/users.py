"""The lab's users (alice, bob), each with an SSH key that opens every node."""

from __future__ import annotations

import logging
import os
import pwd
from pathlib import Path

from dxflow.lab import procs
from dxflow.lab.runner import LabError, run

log = logging.getLogger(__name__)


def exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def ensure_user(name: str) -> bool:
    """Create ``name`` with a home and bash when missing. True when it was created now."""
    if exists(name):
        return False
    log.info("creating user %s", name)
    run(["useradd", "-m", "-s", "/bin/bash", name], what=f"creating user {name}")
    return True


def ensure_ssh_key(name: str) -> None:
    """``~/.ssh/id_ed25519`` for ``name``, its public half in ``~/.ssh/authorized_keys``.

    The home folders are the cluster's shared home, so this one key opens every node.
    """
    entry = pwd.getpwnam(name)
    ssh_dir = Path(entry.pw_dir) / ".ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ssh_dir / "id_ed25519"
    pub = ssh_dir / "id_ed25519.pub"
    if not key.exists() or not pub.exists():
        key.unlink(missing_ok=True)
        pub.unlink(missing_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@dxflow-lab", "-f", key],
            what=f"making an SSH key for {name}")
    pub_line = pub.read_text().strip()
    authorized = ssh_dir / "authorized_keys"
    lines = authorized.read_text().splitlines() if authorized.exists() else []
    if pub_line not in (line.strip() for line in lines):
        lines.append(pub_line)
        authorized.write_text("".join(f"{line}\n" for line in lines))
    for path, mode in ((ssh_dir, 0o700), (key, 0o600), (pub, 0o600), (authorized, 0o600)):
        os.chown(path, entry.pw_uid, entry.pw_gid)
        os.chmod(path, mode)


def processes_of(name: str, *, containing: str | None = None) -> list[int]:
    """Pids owned by user ``name``; with ``containing``, only those whose command line has it."""
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return []

    def match(pid: int) -> bool:
        if procs.owner(pid) != uid:
            return False
        return containing is None or containing in " ".join(procs.cmdline(pid))

    return procs.find_pids(match)


def remove_user(name: str) -> None:
    """Stop every process of ``name`` and delete it with its home (``userdel -r``)."""
    if not exists(name):
        return
    procs.terminate(processes_of(name), what=f"process of {name}")
    log.info("removing user %s", name)
    proc = run(["userdel", "-r", name], check=False, what=f"removing user {name}")
    # 12: the home folder could not be removed completely; the user itself is gone
    if proc.returncode not in (0, 6, 12):  # 6: already gone
        raise LabError(f"removing user {name} failed", argv=["userdel", "-r", name],
                       returncode=proc.returncode, stderr=proc.stderr)
    if proc.returncode == 12:
        log.warning("user %s removed, but not all of its home: %s", name, proc.stderr.strip())
