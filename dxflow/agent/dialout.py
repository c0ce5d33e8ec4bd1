"""The agent dials out to the site service's gateways (``site_gateways``; docs/site.md).

Nothing listens on the node for the site: the agent opens one SSH connection (paramiko, as a
client) to every gateway, and the gateway reaches the agent back through it. On each connection
the agent

1. checks the gateway's host key against the one the site publishes
   (``site_keys``/gateway_host_key.pub): any other key is refused and logged, never trusted on
   first use;
2. logs in as its own name (``CLUSTER.JOB.NODE``) with the gateway key the prolog made for it
   (:mod:`dxflow.enroll`); a gateway that does not know the key yet gets the prolog's root
   MUNGE credential and the key's signature of this session instead (enrollment). The agent's
   dialers enroll one at a time (:class:`Turn`): the first enrollment records the key in the store
   the replicas share, so the other gateways then let the agent in by key. A refused enrollment
   (the scheduler does not list the job yet, the store is busy) is tried again with the same
   credential, backing off up to :data:`ENROLL_BACKOFF` seconds, while the credential lives
   (:data:`ENROLL_FOR`); after that the agent logs in by key only;
3. sends its registration (port, pid, its identity key, version: :data:`dxflow.enroll.REGISTER`);
4. asks for a remote port forward, and connects every channel the gateway opens on it to its own
   port on 127.0.0.1, and nowhere else, whatever address the channel names. A gateway cannot
   open sessions, commands or ``direct-tcpip`` channels: paramiko's client side refuses them.

A broken connection is dialled again after at most :data:`MAX_BACKOFF` seconds; keepalives find
a dead one. The threads end with the agent's worker. paramiko is imported here only, on the
first dial: an agent of a site without gateways never loads it.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dxflow import enroll
from dxflow.config import SiteConfig
from dxflow.edge.pipes import pipe

if TYPE_CHECKING:
    from dxflow.enroll import Enrollment
    from dxflow.registration import Registration

log = logging.getLogger("dxflow.agent.dialout")

#: Seconds at most between two dials of a gateway that is down or refused the agent.
MAX_BACKOFF = 5.0
#: Seconds between keepalives on an idle connection (a dead gateway is found within two or three).
KEEPALIVE = 10
#: Seconds a TCP connect, the SSH handshake and the login each may take.
CONNECT_TIMEOUT = 15.0
#: The name of the gateway's host key file in ``site_keys``.
HOST_KEY_FILE = "gateway_host_key.pub"
#: Seconds at most between two enrollment tries a gateway refused (each asks munged or the scheduler).
ENROLL_BACKOFF = 30.0
#: Seconds after it was made that the agent offers its credential: munged's longest time to live by
#: default (its --max-ttl), which the prolog asks for (:data:`dxflow.enroll.CREDENTIAL_TTL`).
ENROLL_FOR = 3600.0


class EnrollmentRefused(ConnectionRefusedError):
    """A gateway refused the agent's key and its enrollment."""


class Turn:
    """What an agent's dialers share: one enrolls at a time, and whether one has enrolled already."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.enrolled = threading.Event()


def take_enrollment() -> Enrollment | None:
    """The enrollment the prolog left for this agent (``$DXFLOW_GATEWAY_ENROLLMENT``), read and its
    file removed; the variable is dropped so that nothing the agent starts sees it. None if none."""
    path = os.environ.pop(enroll.ENV, "")
    if not path:
        return None
    try:
        return enroll.take(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.error("cannot read the enrollment %s (no dial-out): %s", path, e)
        return None


def pinned_host_key(site: SiteConfig) -> tuple[str, bytes]:
    """(type, blob) of the gateways' host key the site publishes; ValueError/OSError when unreadable."""
    import base64

    line = (Path(site.site_keys) / HOST_KEY_FILE).read_text().split()
    if len(line) < 2:
        raise ValueError(f"{Path(site.site_keys) / HOST_KEY_FILE} is not an OpenSSH public key")
    return line[0], base64.b64decode(line[1], validate=True)


def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"site_gateways: {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class Dialer(threading.Thread):
    """One gateway: dial, serve its channels while the connection lasts, dial again."""

    def __init__(self, gateway: str, enrollment: Enrollment, registration: Registration, port: int,
                 host_key: tuple[str, bytes], stop: threading.Event, turn: Turn | None = None) -> None:
        super().__init__(name=f"dxflow-dialout-{gateway}", daemon=True)
        self.gateway = gateway
        self.enrollment = enrollment
        self.registration = registration
        self.port = port
        self.host_key = host_key
        self.stop = stop
        self.turn = turn or Turn()
        self.connected = threading.Event()
        self.transport: Any = None  # paramiko.Transport while connected

    def run(self) -> None:
        backoff = refused = 0.5
        while not self.stop.is_set():
            wait = backoff
            try:
                self.connect_once()
                backoff = refused = 0.5  # it was up: the next dial is soon
                wait = backoff
            except EnrollmentRefused as e:  # the same credential again, less often: each try asks munged or the scheduler
                wait, refused = refused, min(ENROLL_BACKOFF, refused * 2)
                log.warning("gateway %s: %s (again in %.1f s)", self.gateway, e, wait)
            except Exception as e:  # noqa: BLE001 - whatever broke, dial again later
                log.warning("gateway %s: %s: %s (again in %.1f s)", self.gateway, type(e).__name__, e, backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)
            self.connected.clear()
            self.stop.wait(wait)

    def connect_once(self) -> None:
        import paramiko

        host, port = host_port(self.gateway)
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        t = paramiko.Transport(sock)
        self.transport = t
        try:
            t.banner_timeout = t.handshake_timeout = t.auth_timeout = CONNECT_TIMEOUT
            t.start_client(timeout=CONNECT_TIMEOUT)
            key = t.get_remote_server_key()
            if (key.get_name(), key.asbytes()) != self.host_key:
                log.error("gateway %s: host key %s %s is not the site's (%s): refused", self.gateway,
                          key.get_name(), enroll.fingerprint(key.asbytes()), enroll.fingerprint(self.host_key[1]))
                raise ConnectionRefusedError("the gateway's host key is not the one the site publishes")
            self.login(t, paramiko)
            if t.global_request(enroll.REGISTER, (self.registration.to_json(),), wait=True) is None:
                raise ConnectionRefusedError("the gateway refused the agent's registration")
            t.request_port_forward("127.0.0.1", self.port, handler=self.forwarded)
            t.set_keepalive(KEEPALIVE)
            self.connected.set()
            log.info("gateway %s: connected as %s", self.gateway, self.enrollment.name)
            while t.is_active() and not self.stop.is_set():
                self.stop.wait(1.0)
            if not self.stop.is_set():
                log.warning("gateway %s: connection lost", self.gateway)
        finally:
            self.transport = None
            t.close()

    def login(self, t: Any, paramiko: Any) -> None:
        """The gateway key; where the gateway does not know it yet, the enrollment, one dialer at a time
        (the first enrollment lets the others in by key: the replicas share the store)."""
        pkey = paramiko.Ed25519Key.from_private_key(io.StringIO(self.enrollment.private_key))
        try:
            t.auth_publickey(self.enrollment.name, pkey)
            return
        except paramiko.AuthenticationException:
            pass
        with self.turn.lock:
            if self.turn.enrolled.is_set():  # another dialer enrolled while this one waited: the key may do now
                try:
                    t.auth_publickey(self.enrollment.name, pkey)
                    return
                except paramiko.AuthenticationException:
                    pass
            if not self.enrollment.credential or (self.enrollment.made
                                                  and time.time() > self.enrollment.made + ENROLL_FOR):
                raise EnrollmentRefused(f"the gateway does not know the key of {self.enrollment.name}, and its "
                                        "enrollment credential is missing or past its time to live: key only")
            try:
                t.auth_password(self.enrollment.name, enroll.password(self.enrollment, t.session_id))
            except paramiko.AuthenticationException as e:
                raise EnrollmentRefused(f"enrollment of {self.enrollment.name} refused ({e}): the gateway's "
                                        "log says why") from e
            self.turn.enrolled.set()
        log.info("gateway %s: enrolled as %s", self.gateway, self.enrollment.name)

    def forwarded(self, channel: Any, origin: tuple, server: tuple) -> None:
        """A channel from the gateway: to this agent's own port, whatever ``server`` says."""
        threading.Thread(target=self._serve, args=(channel,), name="dxflow-dialout-channel", daemon=True).start()

    def _serve(self, channel: Any) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=CONNECT_TIMEOUT)
        except OSError as e:
            log.warning("gateway %s: cannot reach the agent's own port %d: %s", self.gateway, self.port, e)
            channel.close()
            return
        sock.settimeout(None)
        try:
            pipe(channel, sock)
        finally:
            sock.close()
            channel.close()


class DialOut:
    """Every gateway's :class:`Dialer`; :meth:`stop` ends them all."""

    def __init__(self, dialers: list[Dialer], stop: threading.Event) -> None:
        self.dialers = dialers
        self._stop = stop

    def stop(self) -> None:
        self._stop.set()
        for d in self.dialers:
            t = d.transport
            if t is not None:
                t.close()


def start(site: SiteConfig, enrollment: Enrollment | None, registration: Registration) -> DialOut | None:
    """Dial every gateway of ``site_gateways`` in threads of its own; None (logged) where the agent has
    no enrollment or the site's host key cannot be read."""
    if not site.site_gateways:
        return None
    if enrollment is None:
        log.error("the site has gateways but this agent has no enrollment (see the hook log): no dial-out; "
                  "the user's own master still reaches it")
        return None
    try:
        host_key = pinned_host_key(site)
        for gateway in site.site_gateways:
            host_port(gateway)
    except (OSError, ValueError) as e:
        log.error("no dial-out: %s", e)
        return None
    stop, turn = threading.Event(), Turn()
    dialers = [Dialer(g, enrollment, registration, registration.port, host_key, stop, turn)
               for g in site.site_gateways]
    for d in dialers:
        d.start()
    return DialOut(dialers, stop)
