"""The paramiko login to one host, as the user's OpenSSH would make it (:mod:`dxflow.ssh.options`).

The user's keys and ssh-agent; host keys checked against the system and user ``known_hosts``
(unknown hosts are refused, ``@revoked`` keys too: :mod:`dxflow.ssh.knownhosts`); AES-GCM first;
keepalives. Anything paramiko cannot do as OpenSSH would (host certificates, hostbased, GSSAPI, MFA,
a setting it cannot honour) raises :class:`~dxflow.ssh.transport.UseOpenSSH`, and the caller goes
through the user's OpenSSH client instead.

Kept apart from :mod:`dxflow.master.tunnels` (which pools the transports this makes, per node and per
job) because a login is one concern with its own socket and cipher tuning, and needs nothing of the master.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Callable, cast

import paramiko

from dxflow.ssh import knownhosts
from dxflow.ssh.options import HostOptions
from dxflow.ssh.transport import UseOpenSSH

log = logging.getLogger(__name__)

#: seconds of silence after which the transport sends a keepalive (as OpenSSH's ServerAliveInterval):
#: the agents' heartbeat lines (every 15 s) already cross every transport that serves one, so this is
#: for nodes without agents and for middle boxes; each one is a wakeup per node (issue #11: idle CPU)
KEEPALIVE = 60
CONNECT_TIMEOUT = 10.0
#: seconds the reading thread of a connected transport waits for a packet before it looks at keepalives
IDLE_WAKE = KEEPALIVE / 3


class QuickAckSocket:
    """The SSH connection's socket, acknowledging every segment at once.

    sshd does not set TCP_NODELAY on a non-interactive session: an answer the agent writes
    as headers then body leaves sshd as two segments, the second held until the first is
    acknowledged (Nagle), while this side delays its ACK (~40 ms). Both ends of that are
    fixed here: TCP_NODELAY for what we send, TCP_QUICKACK (which the kernel resets, so it is
    set again before each read) for what we receive.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def recv(self, n: int) -> bytes:
        try:
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:
            pass
        return self._sock.recv(n)

    def close(self) -> None:
        """Close, waking the transport's thread blocked in ``recv`` (a plain close from another thread
        would leave it there until its timeout)."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class GCMFirstTransport(paramiko.Transport):
    """AES-GCM first: one C call per packet, where AES-CTR adds an HMAC that paramiko checks
    in Python. Downloads through the tunnel measured ~50 % of `ssh cat` with CTR, ~100 % with GCM."""

    _preferred_ciphers = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com") + tuple(
        c for c in paramiko.Transport._preferred_ciphers  # type: ignore[attr-defined]  # private: not in its stubs
        if "gcm" not in c)



def login(name: str, opts: HostOptions, hop: Callable[[], paramiko.Transport] | None = None) -> paramiko.Transport:
    """Log in to the host ``opts`` describes, directly or through the transport ``hop`` gives (its last
    ProxyJump hop, asked for only once the host is known to suit paramiko); UseOpenSSH where only OpenSSH could."""
    why = opts.why_openssh()
    if why:
        raise UseOpenSSH(f"{name}: {why}")
    sock: paramiko.Channel | socket.socket
    if hop is not None:
        sock = hop().open_channel("direct-tcpip", (opts.hostname, opts.port), ("127.0.0.1", 0),
                                  timeout=CONNECT_TIMEOUT)
    else:
        # socket-like is all paramiko needs of it (its type hints say socket)
        sock = cast(socket.socket, QuickAckSocket(socket.create_connection((opts.hostname, opts.port),
                                                                           timeout=CONNECT_TIMEOUT)))
    client = paramiko.SSHClient()
    known = knownhosts.load(opts.known_hosts, client.get_host_keys())
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    keys = [k for k in opts.identity_files if os.path.exists(k)]
    try:
        # key_filename takes a list (paramiko's docs) and transport_factory a Transport subclass,
        # where paramiko's type hints say str and a narrower callable
        client.connect(opts.hostname, port=opts.port, username=opts.user, sock=sock,
                       key_filename=cast(Any, keys or None), timeout=CONNECT_TIMEOUT,
                       banner_timeout=CONNECT_TIMEOUT, auth_timeout=CONNECT_TIMEOUT,
                       transport_factory=cast(Any, GCMFirstTransport))
    except paramiko.AuthenticationException as e:  # hostbased, GSSAPI, MFA, a passphrase: OpenSSH's
        client.close()
        raise UseOpenSSH(f"{name}: paramiko cannot log in with the keys or agent ({e})") from e
    except paramiko.BadHostKeyException as e:
        client.close()
        raise UseOpenSSH(f"{name}: the host key is not the one in known_hosts; OpenSSH decides") from e
    except paramiko.SSHException as e:
        client.close()
        if "not found in known_hosts" in str(e):  # a host certificate, or CheckHostIP-style entries
            raise UseOpenSSH(f"{name}: host key not in known_hosts for paramiko "
                             f"({known.cert_authorities} @cert-authority line(s) only OpenSSH can use)") from e
        if "No authentication methods available" in str(e):
            raise UseOpenSSH(f"{name}: no key or agent for paramiko") from e
        raise
    t = client.get_transport()
    assert t is not None
    if known.is_revoked(t.get_remote_server_key()):
        client.close()
        raise paramiko.SSHException(f"{name}: the host key is marked @revoked in known_hosts")
    t.set_keepalive(KEEPALIVE)
    # paramiko's reading thread wakes every 0.1 s to look for keepalives and a close: ten wakeups a
    # second per node while nothing happens. Connected, it need not: a close wakes it at once
    # (QuickAckSocket.close), keepalives are due every KEEPALIVE seconds, so IDLE_WAKE is soon enough.
    t.sock.settimeout(IDLE_WAKE)
    setattr(t, "_dxflow_client", client)  # keep the wrapper (and its socket) alive with the transport
    log.info("SSH transport to %s (%s@%s:%d) open", name, opts.user, opts.hostname, opts.port)
    return t

