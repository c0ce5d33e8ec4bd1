"""A host's SSH settings as the user's OpenSSH resolves them: ``ssh -G HOST``.

Asking OpenSSH itself gets every rule of ``ssh_config(5)`` right without re-implementing it:
``/etc/ssh/ssh_config`` and ``~/.ssh/config`` in that order, ``Include``, ``Match``, ``Host``
patterns, first-value-wins, tokens (``%h``, ``%r``), and OpenSSH's defaults — both known_hosts
files lists (``GlobalKnownHostsFile`` keeps the system-wide ones when ``UserKnownHostsFile`` is
set), the default identity files. ``ssh -G`` prints one ``keyword value`` line per setting and
never connects (sample: ``hostname 10.77.0.11``, ``proxyjump hop1,hop2``,
``userknownhostsfile ~/.ssh/known_hosts ~/.ssh/known_hosts2``).

Standard library only: the CLI imports it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

from dxflow.errors import ConfigError, UsageError

SSH = "ssh"
RESOLVE_TIMEOUT = 10.0

#: settings paramiko cannot honour, each with why; a host with any of them goes to OpenSSH
#: (``ssh -G`` prints these keywords only when they are set, or with the value given here when unset)
OPENSSH_ONLY: dict[str, tuple[str, str]] = {
    # keyword: (value when not in use, why paramiko cannot do it)
    "proxycommand": ("none", "ProxyCommand is set"),
    "hostkeyalias": ("", "HostKeyAlias is set"),
    "certificatefile": ("", "a user certificate (CertificateFile) is set"),
    "pkcs11provider": ("none", "a PKCS#11 token (PKCS11Provider) is set"),
    "knownhostscommand": ("none", "KnownHostsCommand is set"),
    "identityagent": ("", "IdentityAgent names an agent other than $SSH_AUTH_SOCK"),
    "pubkeyauthentication": ("true", "PubkeyAuthentication is off"),
}


@dataclass(frozen=True)
class Jump:
    """One ``ProxyJump`` hop: ``[user@]host[:port]`` or ``ssh://[user@]host[:port]``."""

    host: str
    user: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, spec: str) -> "Jump":
        text = spec.strip()
        if text.startswith("ssh://"):
            text = text[len("ssh://"):]
        user = None
        if "@" in text:
            user, text = text.rsplit("@", 1)
        port = None
        if text.startswith("["):  # [v6-address]:port
            host, _, rest = text[1:].partition("]")
            if rest.startswith(":"):
                port = int(rest[1:])
        elif text.count(":") == 1:
            host, _, p = text.partition(":")
            port = int(p)
        else:
            host = text
        if not host or host.startswith("-"):
            raise UsageError(f"ProxyJump hop {spec!r}: not a host")
        return cls(host=host, user=user or None, port=port)

    def __str__(self) -> str:
        return (f"{self.user}@" if self.user else "") + self.host + (f":{self.port}" if self.port else "")


@dataclass(frozen=True)
class HostOptions:
    """What ``ssh -G`` says about one host, with the settings dxflow uses picked out."""

    host: str
    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...]
    jumps: tuple[Jump, ...]
    known_hosts: tuple[str, ...]
    raw: dict[str, list[str]] = field(default_factory=dict, compare=False, repr=False)

    def get(self, keyword: str, default: str = "") -> str:
        values = self.raw.get(keyword.lower())
        return values[0] if values else default

    def why_openssh(self) -> str:
        """Why only OpenSSH can connect as configured ("" when paramiko honours every setting in use)."""
        for keyword, (unused, why) in OPENSSH_ONLY.items():
            value = self.get(keyword, unused)
            if keyword == "identityagent" and value in ("", "SSH_AUTH_SOCK", os.environ.get("SSH_AUTH_SOCK", "")):
                continue
            if keyword == "pubkeyauthentication" and value in ("true", "yes", "unbound", "host-bound"):
                continue
            if value.lower() != unused:
                return why
        preferred = self.get("preferredauthentications")
        if preferred and preferred.split(",")[0] != "publickey":
            return f"PreferredAuthentications starts with {preferred.split(',')[0]}"
        return ""


def parse(output: str) -> dict[str, list[str]]:
    """``ssh -G`` output: keyword (lower case) -> its values, in order (identityfile, sendenv repeat)."""
    out: dict[str, list[str]] = {}
    for line in output.splitlines():
        keyword, _, value = line.strip().partition(" ")
        if keyword:
            out.setdefault(keyword.lower(), []).append(value.strip())
    return out


def _expand(path: str, home: str) -> str:
    return home + path[1:] if path == "~" or path.startswith("~/") else path


def from_output(host: str, output: str, home: str | None = None) -> HostOptions:
    """The settings of ``host`` from what ``ssh -G`` printed for it."""
    raw = parse(output)
    home = home or os.path.expanduser("~")

    def first(keyword: str, default: str = "") -> str:
        return raw.get(keyword, [default])[0]

    jump = first("proxyjump", "none")
    jumps = tuple(Jump.parse(s) for s in jump.split(",")) if jump.lower() != "none" else ()
    known = [_expand(p, home) for keyword in ("globalknownhostsfile", "userknownhostsfile")
             for value in raw.get(keyword, []) for p in value.split()]
    return HostOptions(host=host, hostname=first("hostname", host), port=int(first("port", "22")),
                       user=first("user"), identity_files=tuple(_expand(p, home) for p in raw.get("identityfile", [])),
                       jumps=jumps, known_hosts=tuple(known), raw=raw)


def ssh_g_argv(host: str, *, port: int | None = None, user: str | None = None,
               config_file: str | None = None) -> list[str]:
    """The ``ssh -G`` command for ``host`` (``-F`` replaces both config files, as for ssh itself)."""
    if not host or host.startswith("-") or any(c.isspace() for c in host):
        raise UsageError(f"{host!r} is not a host name SSH can be asked about")
    argv = [SSH, "-G"]
    if config_file:
        argv += ["-F", config_file]
    if port:
        argv += ["-p", str(port)]
    if user:
        argv += ["-l", user]
    return argv + [host]


def resolve(host: str, *, port: int | None = None, user: str | None = None,
            config_file: str | None = None) -> HostOptions:
    """``host``'s settings as ``ssh HOST`` would use them (ConfigError when OpenSSH cannot say)."""
    argv = ssh_g_argv(host, port=port, user=user, config_file=config_file)
    if shutil.which(SSH) is None:
        raise ConfigError("the OpenSSH client (ssh) is not on PATH: dxflow reads SSH settings through `ssh -G`; "
                          "install openssh-client")
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=RESOLVE_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"`{' '.join(argv)}` failed: {e}") from e
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise ConfigError(f"`{' '.join(argv)}` exited {proc.returncode}: {tail or 'no message'}; "
                          "fix the SSH configuration it names")
    return from_output(host, proc.stdout)
