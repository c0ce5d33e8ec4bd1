"""known_hosts files read the way paramiko can use them, without failing on what only OpenSSH knows.

paramiko's own loader stops at the first line it cannot parse: one ``@cert-authority`` line (a
site that signs host keys) made the whole file fail, and so every node unreachable. Here each line
is taken on its own: plain and hashed entries go to paramiko; ``@cert-authority`` lines are
counted (paramiko cannot check a host certificate: such a host goes to OpenSSH when no plain
entry matches); ``@revoked`` keys are kept and refused after the key exchange; a line that cannot be
parsed is logged and skipped, as OpenSSH does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import paramiko
from paramiko.hostkeys import HostKeyEntry, InvalidHostKey

log = logging.getLogger(__name__)


@dataclass
class KnownHosts:
    """Host keys from several files (OpenSSH's order: the system's, then the user's)."""

    keys: paramiko.HostKeys = field(default_factory=paramiko.HostKeys)
    revoked: list[paramiko.PKey] = field(default_factory=list)
    cert_authorities: int = 0

    def is_revoked(self, key: paramiko.PKey) -> bool:
        return any(key == r for r in self.revoked)


def _entry(line: str, where: str) -> HostKeyEntry | None:
    try:
        return HostKeyEntry.from_line(line)
    except (paramiko.SSHException, InvalidHostKey, ValueError) as e:
        log.info("%s: line skipped (%s)", where, e)
        return None


def load(paths: tuple[str, ...] | list[str], keys: paramiko.HostKeys | None = None) -> KnownHosts:
    """Every readable file of ``paths`` (missing ones are skipped, as OpenSSH does), into ``keys`` if given."""
    found = KnownHosts(keys if keys is not None else paramiko.HostKeys())
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.readlines()
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for n, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{path}:{n}"
            if line.startswith("@"):
                marker, _, rest = line.partition(" ")
                if marker == "@cert-authority":
                    found.cert_authorities += 1
                elif marker == "@revoked":
                    entry = _entry(rest.strip(), where)
                    if entry is not None and entry.key is not None:
                        found.revoked.append(entry.key)
                else:
                    log.info("%s: unknown marker %s skipped", where, marker)
                continue
            entry = _entry(line, where)
            if entry is None or entry.key is None:
                continue
            for name in entry.hostnames:
                found.keys.add(name, entry.key.get_name(), entry.key)
    return found
