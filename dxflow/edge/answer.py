"""An HTTP/1.x answer read straight from a socket: the agent's proxy reading a job's web service.

``http.client`` builds a request from many small calls and parses every answer's headers with
the ``email`` package: about half of the CPU a small proxied request costs the agent beyond the
service's own time. :class:`Answer` reads the head with one look for its end and
:func:`~dxflow.edge.http.parse_head`, then frames the body as RFC 9112 section 6.3 says:

* no body: an answer to ``HEAD``, and ``1xx`` (skipped: 100 Continue, 103 Early Hints), ``204``, ``304``;
* ``Transfer-Encoding: chunked``: decoded, chunk extensions and trailers dropped;
* ``Content-Length``: that many bytes (a malformed or repeated length: until the peer closes, as
  ``http.client`` does);
* anything else: until the peer closes.
"""

from __future__ import annotations

import socket

from dxflow.edge.http import MAX_HEAD, parse_head

CHUNK = 256 * 1024
MAX_LINE = 64 * 1024   # a chunk-size or trailer line longer than this is not HTTP
NO_BODY = (204, 304)


class AnswerError(ValueError):
    """The peer's answer is not HTTP, or breaks off where HTTP says it may not."""


class Answer:
    """The answer to a request already sent on ``sock`` (a connected, blocking socket)."""

    def __init__(self, sock: socket.socket, method: str) -> None:
        self._sock = sock
        self._buf = b""
        while True:
            self.status, self.headers = self._head()
            if not 100 <= self.status < 200 or self.status == 101:
                break  # interim answers are skipped; 101 is the proxy's upgrade path, not read here
        self._chunked = False
        self._left: int | None = None   # bytes of the body (or of the current chunk) still to come
        self._done = False
        te = (self.getheader("Transfer-Encoding") or "").lower()
        length = (self.getheader("Content-Length") or "").strip()
        if method == "HEAD" or self.status in NO_BODY or 100 <= self.status < 200:
            self.length: int | None = 0
            self._done = True
        elif "chunked" in te:
            self.length = None
            self._chunked = True
        elif length.isdigit():
            self.length = self._left = int(length)
            self._done = self._left == 0
        else:
            self.length = None  # until the peer closes

    # -- the head ------------------------------------------------------------------------------------
    def _head(self) -> tuple[int, list[tuple[str, str]]]:
        while True:
            end = _head_end(self._buf)
            if end:
                head, self._buf = self._buf[:end], self._buf[end:]
                try:
                    status, headers = parse_head(head)
                except ValueError as e:
                    raise AnswerError(str(e)) from e
                if not 100 <= status <= 999:
                    raise AnswerError(f"not an HTTP status: {status}")
                return status, headers
            if len(self._buf) > MAX_HEAD:
                raise AnswerError("the answer's head is too long")
            if not self._fill():
                raise AnswerError("the peer closed the connection before answering" if not self._buf else
                                  "the peer closed the connection in the middle of the answer's head")

    def getheader(self, name: str, default: str | None = None) -> str | None:
        low = name.lower()
        found = [v for k, v in self.headers if k.lower() == low]
        return ", ".join(found) if found else default

    # -- the body ------------------------------------------------------------------------------------
    def read(self) -> bytes:
        """The whole body (for an answer known to be small)."""
        parts = []
        while piece := self.read1(CHUNK):
            parts.append(piece)
        return b"".join(parts)

    def read1(self, n: int = CHUNK) -> bytes:
        """Up to ``n`` bytes of the body as they arrive (one read at most from the socket); b"" at its end."""
        if self._done:
            return b""
        if self._chunked and not self._left:
            if not self._next_chunk():
                return b""
        if not self._buf and not self._fill():
            if self.length is None and not self._chunked:
                self._done = True  # until the peer closes: this is the end
                return b""
            raise AnswerError("the peer closed the connection in the middle of the answer's body")
        take = min(n, len(self._buf)) if self._left is None else min(n, len(self._buf), self._left)
        piece, self._buf = self._buf[:take], self._buf[take:]
        if self._left is not None:
            self._left -= take
            if not self._left:
                if self._chunked:
                    self._line()  # the CRLF after the chunk's data
                else:
                    self._done = True
        return piece

    def _next_chunk(self) -> bool:
        """Start the next chunk; False (and the answer done) at the last one."""
        size = self._line().split(b";", 1)[0].strip()
        try:
            self._left = int(size, 16)
        except ValueError:
            raise AnswerError(f"not a chunk size: {size[:40]!r}") from None
        if self._left:
            return True
        while self._line():  # trailers, up to the blank line
            pass
        self._done = True
        return False

    def _line(self) -> bytes:
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_LINE:
                raise AnswerError("a chunk line is too long")
            if not self._fill():
                raise AnswerError("the peer closed the connection in the middle of a chunked body")
        line, _, self._buf = self._buf.partition(b"\n")
        return line.rstrip(b"\r")

    def _fill(self) -> bool:
        data = self._sock.recv(CHUNK)
        self._buf += data
        return bool(data)


def _head_end(buf: bytes) -> int:
    """Where the head in ``buf`` ends (after its blank line), 0 if it has not ended yet; a bare LF counts
    as a line end, as http.client and browsers accept it."""
    ends = [i + len(sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := buf.find(sep)) >= 0]
    return min(ends) if ends else 0
