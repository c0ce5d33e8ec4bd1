"""The audit trail: who did what on which job, sent to syslog, where an admin can trust it.

One record per act a user's client asks of dxflow on a job (:func:`record`, the only entry point):

===========  ===================================================================  ===========
action       what                                                                 recorded by
===========  ===================================================================  ===========
``exec``     the command run (argv, shell-quoted) and its cwd                     the agent
``shell``    a terminal opened (the shell run)                                    the agent
``write``    a file written (uploaded)                                            the agent
``mkdir``    a folder made                                                        the agent
``move``     a file or folder moved (``what``: the source; ``to``)                the agent
``delete``   a file or folder removed                                             the agent
``proxy``    a request relayed to a port of the job (its method and path)         the agent
``forward``  a TCP pipe opened to a port of the job                               the master
``relay``    a request passed on to an agent: every method but GET, HEAD and      the master
             OPTIONS, every proxied request, every WebSocket (a shell)
===========  ===================================================================  ===========

The agent knows what it did; the master, on the login node, knows which process of the user's asked
(its pid, hence its login uid). An act that goes through the master has a record from each.

Each record names the job and node, the account the act ran as (``user``, ``uid``: agents and
masters run as their user), and who asked, as the kernel tells it for the request's connection:
``peer_uid`` and, on a Unix socket, ``peer_pid`` (SO_PEERCRED: the user's ``dxflow`` command at the
master; over loopback TCP, the user's sshd session carrying the master's channel at an agent, whose
uid comes from the socket table), and ``loginuid``: the login uid of the requesting process where
its pid is known, else of this process (``/proc/PID/loginuid``: set by pam_loginuid when a person
logs in, kept across ``su`` and ``sudo``; ``unset`` for processes no login started, such as an agent
started by slurmd). Text a user chose (paths, commands) is JSON-quoted: it cannot forge a field or
a line.

Records go at once to the site's syslog socket (``audit_socket``, default ``/dev/log``; a Unix
datagram socket, as every syslog daemon offers) with facility ``audit_facility`` (default
``authpriv``: kept apart from user-readable logs by the usual rsyslog and journald setups), tagged
``dxflow-agent`` or ``dxflow-master``; once sent, a user cannot change them. Sending never fails or
delays the act: a missing or full socket is said once in the process's own log; while it stays
missing, a new connection is tried at most every ``RETRY`` seconds (a proxied page makes many
records a second), and the records in between are counted and the count logged once it is back.
"""

from __future__ import annotations

import functools
import json
import logging
import logging.handlers
import os
import pwd
import re
import shlex
import socket
import struct
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from dxflow import config
from dxflow.edge.peer import peer_uid

log = logging.getLogger(__name__)

#: at most this many characters of a user's text in one record (a syslog line is kept short)
MAX_TEXT = 512
_PLAIN = re.compile(r"^[A-Za-z0-9_.:/@+=,-]{1,128}$")


#: seconds between two tries to reach a syslog socket that was missing
RETRY = 10.0
#: WSGI environ key naming the user a site service proved for the request (dxflow.site.users): a record
#: of the site's names them as ``asked_by`` (the service itself runs as its own account)
ASKED_BY = "dxflow.asked_by"


class _Handler(logging.handlers.SysLogHandler):
    """SysLogHandler that says once, in the process's own log, that the syslog socket refused a record,
    and then tries it again only every :data:`RETRY` seconds instead of at every record."""

    warned = False
    failed_at: float | None = None
    missed = 0
    socket: socket.socket | None  # SysLogHandler's own (not in typeshed); made again when None

    def emit(self, record: logging.LogRecord) -> None:
        if self.failed_at is not None and time.monotonic() - self.failed_at < RETRY:
            self.missed += 1
            return
        failed_before, self.failed_at = self.failed_at, None
        super().emit(record)  # calls handleError on failure, which sets failed_at again
        if failed_before is not None and self.failed_at is None and self.missed:
            log.warning("audit: %d records could not be sent to %s while it was unreachable",
                        self.missed, self.address)
            self.missed = 0

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        self.failed_at = time.monotonic()
        self.missed += 1
        if self.socket is not None:  # a socket that failed once is made anew at the next try
            try:
                self.socket.close()
            except OSError:
                pass
            self.socket = None  # SysLogHandler makes it again when None
        if not self.warned:
            self.warned = True
            log.warning("audit records cannot be sent to %s (audit_socket in %s): is a syslog daemon "
                        "listening there?", self.address, config.SITE_CONFIG)


@functools.lru_cache(maxsize=64)
def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@functools.lru_cache(maxsize=4)
def _trail(site_config: str) -> logging.Logger:
    """The logger whose records go to the site's syslog socket (one per site config per process)."""
    try:
        site = config.SiteConfig.load(Path(site_config))
    except config.ConfigError as e:  # the process that loads it first reports it; audit to the default
        log.warning("audit: %s; sending to %s", e, config.SiteConfig.audit_socket)
        site = config.SiteConfig()
    facility = logging.handlers.SysLogHandler.facility_names.get(site.audit_facility)
    if facility is None:
        log.warning("audit_facility %r is not a syslog facility; using authpriv", site.audit_facility)
        facility = logging.handlers.SysLogHandler.LOG_AUTHPRIV
    handler = _Handler(address=site.audit_socket, facility=facility)
    tag = "dxflow-agent" if os.environ.get("DXFLOW_AGENT") else "dxflow-master"
    handler.setFormatter(logging.Formatter(f"{tag}[%(process)d]: %(message)s"))
    trail = logging.Logger("dxflow.audit.trail")  # outside logging's tree: no other handler sees it
    trail.addHandler(handler)
    trail.setLevel(logging.INFO)
    return trail


def loginuid(pid: int | str = "self") -> str:
    """The login uid of a process (``unset`` when no login set one, ``unknown`` when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/loginuid") as f:
            value = f.read().strip()
    except OSError:
        return "unknown"
    return "unset" if value in ("", "4294967295") else value


def peer(environ: Mapping[str, Any] | None) -> tuple[int | None, int | None]:
    """(uid, pid) of the process at the other end of the request's connection, as far as the kernel says."""
    sock = (environ or {}).get("gunicorn.socket")
    if not isinstance(sock, socket.socket):
        return None, None
    if sock.family == socket.AF_UNIX:
        try:
            pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                struct.calcsize("3i")))
        except OSError:
            return None, None
        return (uid if uid >= 0 else None), (pid if pid > 0 else None)
    return peer_uid(sock), None


def _text(value: object) -> str:
    text = str(value)
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT] + "..."
    return text if _PLAIN.match(text) else json.dumps(text)


def record(action: str, what: str | Sequence[str], where: Any, environ: Mapping[str, Any] | None = None,
           **details: object) -> None:
    """Send one audit record: ``action`` (see the module's table) of ``what`` (text, or an argv that is
    shell-quoted) on the job and node of ``where`` (an agent's state or registration: ``.job``,
    ``.node``), asked over the request whose WSGI ``environ`` is given (who asked is read from its
    connection). Never raises: the act goes on whatever happens to its record."""
    try:
        uid = os.getuid()
        user = _user_name(uid)
        p_uid, p_pid = peer(environ)
        job, node = getattr(where, "job", "?"), getattr(where, "node", "?")
        if not isinstance(what, str):
            what = shlex.join(what)
        fields: dict[str, object] = {
            "action": action, "job": job, "node": node, "user": user, "uid": uid,
            "peer_uid": "unknown" if p_uid is None else p_uid, "peer_pid": p_pid if p_pid else "unknown",
            "loginuid": loginuid(p_pid if p_pid else "self"), "what": what, **details,
        }
        asked_by = (environ or {}).get(ASKED_BY)
        if asked_by:  # the site service: the user its MUNGE login or console session proved
            fields["asked_by"] = asked_by
        line = " ".join(f"{key}={_text(value)}" for key, value in fields.items())
        _trail(str(config.SITE_CONFIG)).info(line)
    except Exception as e:  # noqa: BLE001 - an audit failure must not fail the user's act
        log.warning("audit record of %s not sent: %s: %s", action, type(e).__name__, e)
