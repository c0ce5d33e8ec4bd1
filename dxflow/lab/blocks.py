"""Marked blocks in shared text files (``/etc/hosts``, ``/etc/ssh/ssh_known_hosts``).

The lab owns only the lines between its markers; everything else is left as it was.
Files are rewritten in place, not replaced: ``/etc/hosts`` is often a bind mount.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

BEGIN = "# BEGIN dxflow-lab"
END = "# END dxflow-lab"


def without_block(text: str) -> str:
    """``text`` with every lab block (markers included) taken out."""
    out: list[str] = []
    inside = False
    for line in text.splitlines(keepends=True):
        marker = line.strip()
        if marker == BEGIN:
            inside = True
        elif marker == END and inside:
            inside = False
        elif not inside:
            out.append(line)
    return "".join(out)


def with_block(text: str, lines: Iterable[str]) -> str:
    """``text`` with exactly one lab block holding ``lines``, at the end."""
    base = without_block(text)
    if base and not base.endswith("\n"):
        base += "\n"
    body = "".join(f"{line}\n" for line in lines)
    return f"{base}{BEGIN}\n{body}{END}\n"


def set_block(path: Path, lines: Iterable[str]) -> bool:
    """Put the lab block into ``path`` (created if missing, mode 0644). True if it changed."""
    old = path.read_text() if path.exists() else ""
    new = with_block(old, lines)
    if new == old:
        return False
    _rewrite(path, new)
    return True


def drop_block(path: Path) -> bool:
    """Take the lab block out of ``path``. True if it changed; a missing file is fine."""
    try:
        old = path.read_text()
    except FileNotFoundError:
        return False
    new = without_block(old)
    if new == old:
        return False
    _rewrite(path, new)
    return True


def _rewrite(path: Path, text: str) -> None:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o644)
    with open(path, "r+") as f:  # same inode: keeps bind mounts, owner and mode
        f.write(text)
        f.truncate()
