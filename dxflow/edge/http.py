"""HTTP plumbing that agent, master and CLI share: hop-by-hop headers, dxflow's own cookies,
response heads read from a raw socket, and the response that says "this connection was taken over".
"""

from __future__ import annotations

import io
import socket
import struct
from typing import Callable, Iterable, Iterator
from urllib.parse import quote

from werkzeug.wrappers import Response

#: hop-by-hop headers (RFC 9110 7.6.1): never passed on by a relay or proxy.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade"})
#: what a relay never passes on: hop-by-hop, plus what it sets itself (Host, length, credentials).
RELAY_DROP = HOP_BY_HOP | {"host", "authorization", "cookie", "content-length"}
#: dxflow's own cookies (the master's console, an agent's console, a service origin's session):
#: never handed to a job's web service, and a job's service may not set or clear them.
OWN_COOKIES = frozenset({"dxflow_console", "dxflow_agent", "dxflow_service"})
#: response headers a job's web service may not send through dxflow: a service worker scope wider
#: than its path, or wiping the browser's storage for the origin.
SERVICE_RESPONSE_DROP = frozenset({"service-worker-allowed", "clear-site-data"})
#: the ``Upgrade`` token of the master's raw TCP forward (``/api/forward``, ``dxflow forward``).
FORWARD_UPGRADE = "dxflow-tcp"
MAX_HEAD = 64 * 1024
CHUNK = 64 * 1024
#: pieces of a request body read straight from the connection (:func:`body_pieces`)
BODY_PIECE = 1024 * 1024


class Hijacked(Response):
    """Ends a request whose socket the app has taken over (an upgrade): gunicorn writes nothing more
    and closes the connection."""

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        raise StopIteration()  # gunicorn's workers treat it as "close this connection" (as flask-sock does)


#: characters a path keeps as they are when a relay writes it on the wire again (RFC 3986 pchar and "/")
PATH_SAFE = "/:@!$&'()*+,;=-._~"


def request_target(path: str, query: str = "") -> str:
    """The request target for a decoded ``path`` (as a router hands it) and a raw query string: the path
    percent-encoded again, so that ``?``, ``#``, spaces and non-ASCII in a name reach the agent intact."""
    return "/" + quote(path.lstrip("/"), safe=PATH_SAFE) + (f"?{query}" if query else "")


def without_own_cookies(cookie_header: str) -> str:
    """A ``Cookie`` header value without dxflow's own cookies ("" when nothing is left)."""
    kept = [c.strip() for c in cookie_header.split(";") if c.strip() and
            c.strip().partition("=")[0].strip() not in OWN_COOKIES]
    return "; ".join(kept)


def forwarded_headers(headers: Iterable[tuple[str, str]], drop: Iterable[str]) -> list[tuple[str, str]]:
    """Request headers for a job's service: without ``drop`` (lower-case names) and dxflow's own cookies."""
    dropped = {d.lower() for d in drop}
    out = []
    for key, value in headers:
        low = key.lower()
        if low in dropped:
            continue
        if low == "cookie":
            value = without_own_cookies(value)
            if not value:
                continue
        out.append((key, value))
    return out


def service_response_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """A job's service answer headers as dxflow passes them on: no ``Service-Worker-Allowed`` or
    ``Clear-Site-Data``, no ``Set-Cookie`` that names one of dxflow's cookies."""
    out = []
    for key, value in headers:
        low = key.lower()
        if low in SERVICE_RESPONSE_DROP:
            continue
        if low == "set-cookie" and value.partition("=")[0].strip() in OWN_COOKIES:
            continue
        out.append((key, value))
    return out


def read_head(sock, limit: int = MAX_HEAD) -> tuple[bytes, bytes]:
    """A response (or request) head read from a raw socket or channel: the head with its blank line,
    and whatever came after it. :class:`EOFError` if the peer closes first or the head is too long."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > limit:
            raise EOFError("head too long")
        data = sock.recv(CHUNK)
        if not data:
            raise EOFError("the peer closed the connection before answering")
        buf += data
    end = buf.index(b"\r\n\r\n") + 4
    return buf[:end], buf[end:]


def parse_head(head: bytes) -> tuple[int, list[tuple[str, str]]]:
    """The status code and headers of a response head; :class:`ValueError` if it is not one.
    Lines may end in a bare LF, as http.client and browsers accept."""
    lines = [line.rstrip("\r") for line in head.decode("latin-1").split("\n")]
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ValueError(f"not an HTTP answer: {lines[0][:100]!r}")
    headers = []
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep:
            headers.append((key.strip(), value.strip()))
    return int(parts[1]), headers


def read_body(sock, headers: list[tuple[str, str]], rest: bytes, limit: int = 1 << 20) -> bytes:
    """The body after a head: ``Content-Length`` bytes (at most ``limit``), or what arrives until the
    peer closes; a read error ends it early."""
    length = next((v for k, v in headers if k.lower() == "content-length"), None)
    want = int(length) if length and length.isdigit() else limit
    body = rest
    try:
        while len(body) < min(want, limit):
            data = sock.recv(CHUNK)
            if not data:
                break
            body += data
    except OSError:
        pass
    return body[:want]


def buffered_after_head(environ: dict) -> bytes:
    """Bytes the client sent after an upgrade request that gunicorn's parser already read, if any."""
    reader = getattr(environ.get("wsgi.input"), "reader", None)
    unreader = getattr(reader, "unreader", None)
    take = getattr(unreader, "take_buffered", None)
    try:
        return (take() or b"") if take else b""
    except Exception:  # noqa: BLE001 - a gunicorn without it: nothing read ahead that we could get
        return b""


def body_pieces(environ: dict, size: int, piece: int = BODY_PIECE,
                idle: float | None = None) -> Iterator[bytes | memoryview]:
    """The next ``size`` bytes of the request body (fewer if the client stops sending), in pieces of up
    to ``piece`` bytes, each a buffer of its own that the caller may keep (queue, hand to threads).
    ``idle``: seconds to wait for the next bytes at most (on gunicorn's connection); a client silent that
    long is taken as gone: the pieces end short and the connection is cut both ways (no answer goes back,
    and nothing it sends later is read as a request).

    Read straight from gunicorn's connection: its body reader passes each byte through several BytesIO
    buffers (about seven copies), which a broadcast of GiBs pays on every node of the tree. Bytes
    gunicorn already holds come first (its line buffer after a ``readline``, then its read-ahead, but
    never past this body: a pipelined next request stays where gunicorn finds it), and gunicorn's count
    of the body's bytes is kept right, so the connection stays usable. Where the body is not gunicorn's
    length-delimited one (another server, a chunked body), ``wsgi.input.read`` does it.
    """
    body = environ.get("wsgi.input")
    reader = getattr(body, "reader", None)
    unreader = getattr(reader, "unreader", None)
    sock = environ.get("gunicorn.socket")
    if (sock is None or type(reader).__name__ != "LengthReader" or not isinstance(getattr(body, "buf", None), io.BytesIO)
            or not isinstance(getattr(reader, "length", None), int) or not hasattr(unreader, "take_buffered")):
        yield from _read_through(body, size, piece)
        return
    assert body is not None and reader is not None and unreader is not None
    held = body.buf.getvalue()
    body.buf = io.BytesIO()
    ahead = unreader.take_buffered()
    if len(ahead) > reader.length:  # the next request's bytes: gunicorn reads them from here
        unreader.unread(ahead[reader.length:])
        ahead = ahead[:reader.length]
    reader.length -= len(ahead)
    held += ahead
    if len(held) > size:  # not asked for: left for the app's next read
        body.buf.write(held[size:])
        held = held[:size]
    for at in range(0, len(held), piece):
        yield held[at:at + piece]
    left = min(size - len(held), reader.length)
    timed = idle is not None and sock.gettimeout() is None and _receive_timeout(sock, idle)
    try:
        while left > 0:
            buf = bytearray(min(piece, left))
            view, got = memoryview(buf), 0
            while got < len(buf):
                try:
                    n = sock.recv_into(view[got:])
                except (BlockingIOError, TimeoutError):  # silent for ``idle`` seconds: taken as gone
                    _cut(sock)
                    n = 0
                except OSError:
                    n = 0
                if not n:
                    break
                got += n
            reader.length -= got
            left -= got
            if got:
                yield view[:got]
            if got < len(buf):
                return
    finally:
        if timed:
            _receive_timeout(sock, 0)  # none, as gunicorn had it


def _receive_timeout(sock, seconds: float) -> bool:
    """``SO_RCVTIMEO`` (0: none): a blocking receive then fails with EAGAIN after that long without a byte.
    Not Python's own socket timeout, which would add a ``poll`` before every receive of a large body."""
    whole = int(seconds)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", whole, int((seconds - whole) * 1_000_000)))
    except (OSError, struct.error):
        return False
    return True


def _cut(sock) -> None:
    """End the connection both ways (gunicorn keeps a connection open after an answer whatever the app's
    ``Connection`` header says, and reads on after a ``SHUT_RD``): its answer is lost, as the client is."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _read_through(body, size: int, piece: int) -> Iterator[bytes | memoryview]:
    while size > 0:
        data = body.read(min(piece, size)) if body is not None else b""
        if not data:
            return
        size -= len(data)
        yield data
