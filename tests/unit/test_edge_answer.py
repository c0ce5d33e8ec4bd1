"""dxflow.edge.answer.Answer: HTTP/1.x answers read from a real socket, framed as RFC 9112 6.3 says."""

from __future__ import annotations

import socket
import threading
import time
from typing import Iterator

import pytest

from dxflow.edge.answer import Answer, AnswerError

ANSWER = 10.0


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.settimeout(ANSWER)
    yield a, b
    a.close()
    b.close()


def send_in_pieces(sock: socket.socket, *pieces: bytes, close: bool = True) -> threading.Thread:
    """Write each piece a moment after the other (so the reader meets every boundary), then close."""
    def run() -> None:
        try:
            for piece in pieces:
                sock.sendall(piece)
                time.sleep(0.02)
            if close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:  # the test is over and closed the pair: nothing left to send to
            pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_body_of_known_length_arriving_in_pieces(pair):
    ours, theirs = pair
    send_in_pieces(theirs, b"HTTP/1.1 200 OK\r\nContent-Le", b"ngth: 11\r\nX-A: 1\r\n\r\nhello", b" world",
                   close=False)
    answer = Answer(ours, "GET")
    assert (answer.status, answer.length, answer.getheader("x-a")) == (200, 11, "1")
    assert answer.read() == b"hello world"  # and no wait for a close: the length says where it ends


def test_chunked_body_is_decoded_with_extensions_and_trailers(pair):
    ours, theirs = pair
    send_in_pieces(theirs, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhel",
                   b"lo\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n", close=False)
    answer = Answer(ours, "GET")
    assert answer.length is None
    assert answer.read() == b"hello world"


def test_body_without_length_ends_when_the_peer_closes(pair):
    ours, theirs = pair
    send_in_pieces(theirs, b"HTTP/1.0 200 OK\r\n\r\nsome", b" more")
    assert Answer(ours, "GET").read() == b"some more"


@pytest.mark.parametrize("method, status", [("HEAD", 200), ("GET", 204), ("GET", 304)])
def test_answers_without_a_body_do_not_wait_for_one(pair, method, status):
    ours, theirs = pair
    send_in_pieces(theirs, b"HTTP/1.1 %d X\r\nContent-Length: 99\r\n\r\n" % status, close=False)
    answer = Answer(ours, method)
    assert answer.length == 0 and answer.read() == b""


def test_interim_answers_are_skipped(pair):
    ours, theirs = pair
    send_in_pieces(theirs, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                           b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok", close=False)
    answer = Answer(ours, "POST")
    assert answer.status == 201 and answer.read() == b"ok"


def test_bare_line_feeds_are_accepted(pair):
    ours, theirs = pair
    send_in_pieces(theirs, b"HTTP/1.1 200 OK\nContent-Length: 2\nContent-Type: text/plain\n\nok", close=False)
    answer = Answer(ours, "GET")
    assert answer.getheader("Content-Type") == "text/plain" and answer.read() == b"ok"


@pytest.mark.parametrize("sent", [b"", b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 20", b"HTTP/1.1 2000 Big\r\n\r\n"],
                         ids=["closed at once", "not HTTP", "head cut short", "status out of range"])
def test_what_is_not_an_http_answer_is_refused(pair, sent):
    ours, theirs = pair
    send_in_pieces(theirs, sent)
    with pytest.raises(AnswerError):
        Answer(ours, "GET")


@pytest.mark.parametrize("sent", [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf",
                                  b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
                                  b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
                         ids=["length", "chunk cut short", "bad chunk size"])
def test_body_broken_off_is_an_error_not_an_end(pair, sent):
    ours, theirs = pair
    send_in_pieces(theirs, sent)
    with pytest.raises(AnswerError):
        Answer(ours, "GET").read()
