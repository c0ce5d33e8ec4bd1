"""``dxflow.edge.worker.ClosingBody``: the one wrapper for "an answer is done" (the worker's uncorking,
the master's count of clients at work)."""

from __future__ import annotations

from dxflow.edge.worker import ClosingBody


class Body:
    """A WSGI body with a close of its own (a generator's, a file's)."""

    def __init__(self) -> None:
        self.closed = 0

    def __iter__(self):
        return iter([b"a", b"b"])

    def close(self) -> None:
        self.closed += 1


def test_the_body_is_passed_through_and_its_end_reported_once():
    ends: list[int] = []
    inner = Body()
    body = ClosingBody(inner, lambda: ends.append(1))
    assert b"".join(body) == b"ab"
    assert ends == []  # not before the server closes it
    body.close()
    body.close()  # a second close (gunicorn after an error, say) reports nothing more
    assert ends == [1] and inner.closed == 2


def test_the_end_is_reported_even_when_the_body_fails_to_close():
    ends: list[int] = []

    class Failing(Body):
        def close(self) -> None:
            raise OSError("the client went away")

    body = ClosingBody(Failing(), lambda: ends.append(1))
    try:
        body.close()
    except OSError:
        pass
    assert ends == [1]


def test_a_body_without_close_is_fine():
    ends: list[int] = []
    body = ClosingBody([b"x"], lambda: ends.append(1))
    body.close()
    assert list(body) == [b"x"] and ends == [1]
