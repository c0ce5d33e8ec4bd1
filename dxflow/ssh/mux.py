"""A channel through an OpenSSH ControlMaster without an ssh process: its multiplexing protocol, spoken here.

``ssh -S CTL -W HOST:PORT NODE`` is a mux client: it says hello on the ControlMaster's socket, asks
for a stdio forwarding (``MUX_C_NEW_STDIO_FWD``), hands its stdin and stdout to the master
(``SCM_RIGHTS``) and then only waits for the master to hang up. Doing the same here hands the
master one end of a socket pair, and keeps the other as the channel: no process per channel (a
proxied request costs ~0.5 ms instead of an ssh start-up of ~15 ms; a heartbeat stream per agent
costs no process). The control connection stays open for the channel's life: the master ends the
forwarding when it closes.

Message layout: OpenSSH's PROTOCOL.mux (every message is ``uint32 length, uint32 type, ...``;
strings are ``uint32 length, bytes``). A master speaking another protocol version is refused
(:class:`MuxError`); :mod:`dxflow.ssh.openssh` then runs ``ssh -W`` instead.
"""

from __future__ import annotations

import array
import socket
import struct
from pathlib import Path

MUX_MSG_HELLO = 0x00000001
MUX_C_NEW_STDIO_FWD = 0x10000008
MUX_S_FAILURE = 0x80000003
MUX_S_PERMISSION_DENIED = 0x80000002
MUX_S_SESSION_OPENED = 0x80000006
VERSION = 4


class MuxError(OSError):
    """The ControlMaster refused, or spoke something this client does not know."""


class MuxChannel(socket.socket):
    """The channel's end of the socket pair; when its descriptor closes, the control connection goes too.

    ``_real_close``, not ``close``: a file from ``makefile()`` (http.client reads answers through
    one) keeps the descriptor open after ``close()`` until the file is closed as well.
    """

    control: socket.socket | None = None

    def _real_close(self, *args, **kwargs) -> None:
        try:
            super()._real_close(*args, **kwargs)  # type: ignore[misc]
        finally:
            if self.control is not None:
                self.control.close()
                self.control = None


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack(">I", len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            raise MuxError("the ControlMaster hung up")
        buf += data
    return buf


def _recv(sock: socket.socket) -> tuple[int, bytes]:
    (length,) = struct.unpack(">I", _recv_exact(sock, 4))
    if not 4 <= length <= 256 * 1024:
        raise MuxError(f"a mux message of {length} bytes")
    body = _recv_exact(sock, length)
    return struct.unpack(">I", body[:4])[0], body[4:]


def _send_fd(sock: socket.socket, fd: int) -> None:
    """One fd, with the one byte of data OpenSSH's ``mm_receive_fd`` expects."""
    sock.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def _reason(body: bytes) -> str:
    if len(body) < 8:
        return "no reason given"
    (n,) = struct.unpack(">I", body[4:8])
    return body[8:8 + n].decode(errors="replace")


def stdio_forward(ctl: Path, host: str, port: int, timeout: float) -> MuxChannel:
    """A byte stream to HOST:PORT as seen from the ControlMaster's node."""
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ours, theirs = socket.socketpair()
    try:
        control.settimeout(timeout)
        control.connect(str(ctl))
        _send(control, struct.pack(">II", MUX_MSG_HELLO, VERSION))
        kind, body = _recv(control)
        if kind != MUX_MSG_HELLO or struct.unpack(">I", body[:4])[0] != VERSION:
            raise MuxError(f"the ControlMaster speaks mux {kind:#x}/{body[:4].hex()}, not hello version {VERSION}")
        request_id = 1
        _send(control, struct.pack(">II", MUX_C_NEW_STDIO_FWD, request_id) + _string(b"")
              + _string(host.encode()) + struct.pack(">I", port))
        _send_fd(control, theirs.fileno())   # the forwarding's input ...
        _send_fd(control, theirs.fileno())   # ... and output: the same socket
        kind, body = _recv(control)
        if kind in (MUX_S_FAILURE, MUX_S_PERMISSION_DENIED):
            raise MuxError(f"the ControlMaster refused the forwarding to {host}:{port}: {_reason(body)}")
        if kind != MUX_S_SESSION_OPENED:
            raise MuxError(f"the ControlMaster answered {kind:#x} to a forwarding")
    except BaseException:
        control.close()
        ours.close()
        raise
    finally:
        theirs.close()   # the master has its own copies now
    control.settimeout(None)
    chan = MuxChannel(ours.family, ours.type, ours.proto, fileno=ours.detach())
    chan.control = control
    chan.settimeout(timeout)
    return chan
