"""The local end of ``dxflow forward``: where it listens (127.0.0.1, or a Unix socket of the user's
own) and who may connect (the user's processes only, by the kernel's word: :mod:`dxflow.edge.peer`).

Kept apart from :mod:`dxflow.cli.forward`, which handles the arguments and the talk with the master:
everything here is about the login node's sockets and files, and is where a security review of the
forward's local side starts. Imported only when a forward starts (the CLI's start-up stays light).
"""

from __future__ import annotations

import os
import pwd
import re
import socket
import stat
import sys
from pathlib import Path

from dxflow.edge.peer import peer_uid
from dxflow.errors import UsageError
from dxflow.layout import UserLayout, ensure_private_dir

UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the final NUL (man 7 unix)


def listen_tcp(port: int | None, wanted: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    candidates = [port] if port is not None else [wanted, 0]
    for i, p in enumerate(candidates):
        try:
            s.bind(("127.0.0.1", p))
            break
        except OSError as e:
            if i == len(candidates) - 1:
                s.close()
                raise UsageError(f"cannot listen on 127.0.0.1:{p}: {e.strerror}; choose another with --local") from e
    s.listen(64)
    return s


def unix_socket_path(text: str, job: str, node: str, port: int) -> Path:
    """``--unix PATH`` as given, or ``~/.dxflow/forward/JOB-NODE-PORT.sock`` in a folder only the user enters."""
    if text:
        return Path(text).expanduser().absolute()
    folder = ensure_private_dir(UserLayout.of().ensure_shared().forward_dir)
    name = "-".join(re.sub(r"[^A-Za-z0-9._-]+", "_", part) for part in (job, node, str(port)))
    return folder / f"{name}.sock"


def listen_unix(path: Path) -> tuple[socket.socket, int]:
    """A Unix socket listening at ``path`` (mode 0600) and its inode; a dead forward's socket is replaced."""
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise UsageError(f"{path}: too long for a Unix socket (at most {UNIX_PATH_MAX} bytes); "
                         "choose a shorter one with --unix PATH")
    remove_stale(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # born 0600: at no moment can another user connect (the peer check stays anyway)
    try:
        s.bind(str(path))
    except OSError as e:
        s.close()
        raise UsageError(f"cannot listen on {path}: {e.strerror}; choose another path with --unix PATH") from e
    finally:
        os.umask(old)
    s.listen(64)
    return s, path.lstat().st_ino


def remove_stale(path: Path) -> None:
    """Remove the socket a dead forward left at ``path``; refuse a live one, and anything not a socket."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{path} exists and is not a socket: remove it, or choose another path with --unix PATH")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(5)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        try:
            path.unlink(missing_ok=True)  # nobody listens: what a killed forward (SIGKILL, a reboot) leaves
        except OSError as e:
            raise UsageError(f"cannot remove the stale socket {path}: {e.strerror}") from e
        return
    except OSError as e:
        raise UsageError(f"cannot tell whether {path} is in use ({e.strerror or e}): remove it, or choose "
                         "another path with --unix PATH") from e
    finally:
        probe.close()
    raise UsageError(f"another `dxflow forward` listens on {path}: stop it first, or choose another path "
                     "with --unix PATH")


def remove_own(path: Path, inode: int) -> None:
    """Remove the socket file this forward made (not one that has replaced it since)."""
    try:
        if path.lstat().st_ino == inode:
            path.unlink()
    except FileNotFoundError:
        pass


def admitted(conn: socket.socket) -> bool:
    """Whether the process at the other end of ``conn`` is the user's; a stranger's attempt is logged."""
    uid = peer_uid(conn)
    if uid == os.getuid():
        return True
    if uid is None:
        who = "a process whose owner the kernel cannot tell"
    else:
        try:
            who = f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
        except KeyError:
            who = f"uid {uid}"
    print(f"dxflow: forward: refused a connection from {who}: only your own processes may use this forward",
          file=sys.stderr, flush=True)
    return False
