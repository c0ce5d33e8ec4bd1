"""HTTP plumbing that agent, master and CLI share: hop-by-hop headers, dxflow's own cookies,
response heads read from a raw socket, and the response that says "this connection was taken over".
"""

from __future__ import annotations

from typing import Callable, Iterable
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
