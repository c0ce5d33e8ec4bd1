"""The job's output and the agent's log (:mod:`dxflow.agent.logs`): where they are, ``/api/logs``
and its live follow, in-process (Flask's test client)."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest

from dxflow.agent import jobwatch, logs
from dxflow.schedulers.base import Presence


# -- log paths (each scheduler's pattern tokens: test_schedulers_patterns.py) -------------------------------

@pytest.fixture
def job77(make_agent_state):
    """``make(**fields)``: the state of alice's agent of Slurm job 77 on n2 (nothing on disk)."""
    def make(**fields):
        return make_agent_state(**{"scheduler": "slurm", "cluster": "c", "job": "77", "node": "n2", "user": "alice",
                                   "home": Path("/home/alice"), "work_dir": "/home/alice/run", **fields})
    return make


def test_paths_given_plainly_need_no_scheduler(job77, fake_scheduler):
    st = job77(stdout="out.txt")
    assert logs.job_output_paths(st) == {"stdout": "/home/alice/run/out.txt", "stderr": "/home/alice/run/out.txt"}
    assert fake_scheduler.asked == 0


def test_pattern_or_empty_asks_the_scheduler_once(job77, fake_scheduler):
    fake_scheduler.add("77", user="alice", name="train", work_dir="/home/alice/run",
                       stdout="/home/alice/run/train-77.out", stderr="")
    for given in ("/home/alice/run/%x-%j.out", ""):
        st = job77(stdout=given)
        fake_scheduler.asked = 0
        for _ in range(3):
            assert logs.job_output_paths(st) == {"stdout": "/home/alice/run/train-77.out",
                                                 "stderr": "/home/alice/run/train-77.out"}
        assert fake_scheduler.asked == 1


def test_scheduler_down_falls_back_to_local_expansion(job77, fake_scheduler):
    fake_scheduler.fail = True
    st = job77(stdout="/home/alice/slurm-%j.out")
    assert logs.job_output_paths(st)["stdout"] == "/home/alice/slurm-77.out"
    assert logs.job_output_paths(job77(stdout=""))["stdout"] == "/home/alice/run/slurm-77.out"  # Slurm's default
    assert "log_paths" not in st.extra  # asked again later


def test_tail_offset():
    cases = [(b"a\nb", 1, b"b"), (b"a\nb\n", 1, b"b\n"), (b"a\nb\n", 5, b"a\nb\n"), (b"", 3, b""),
             (b"x" * 200_000 + b"\nlast\n", 1, b"last\n"), (b"a\nb\n", 0, b"")]
    for data, k, want in cases:
        f = io.BytesIO(data)
        assert data[logs.tail_offset(f, k):] == want


def test_sse_event_format():
    assert logs.sse_event("hi", event_id=3) == b"id: 3\ndata: hi\n\n"
    assert logs.sse_event("a\rb") == b"data: a\ndata: b\n\n"
    assert logs.sse_event("bye", event="end") == b"event: end\ndata: bye\n\n"


# -- /api/logs ---------------------------------------------------------------------------------------------

def test_list_and_read_logs(agent):
    client, state, headers = agent
    Path(state.stdout).write_text("one\ntwo\nthree\n")
    body = {x["name"]: x for x in client.get("/api/logs", headers=headers).get_json()}
    assert body["stdout"]["size"] == 14 and body["stdout"]["exists"]
    assert body["stderr"]["exists"] is False and body["agent"]["path"].endswith("/t.42.n1.log")
    resp = client.get("/api/logs/stdout?lines=2", headers=headers)
    assert resp.status_code == 200 and resp.data == b"two\nthree\n"
    assert client.get("/api/logs/stdout", headers=headers).data == b"one\ntwo\nthree\n"
    assert client.get("/api/logs/stdout?lines=x", headers=headers).status_code == 400
    assert client.get("/api/logs/stdout?lines=-1", headers=headers).status_code == 400
    assert client.get("/api/logs/stderr", headers=headers).status_code == 404
    assert client.get("/api/logs/passwd", headers=headers).status_code == 404


def _events(resp, until, timeout=5.0):
    """Read SSE events from a streamed test-client response until ``until(events)``; in a thread, bounded."""
    events, buf = [], b""
    done = threading.Event()

    def reader():
        nonlocal buf
        for chunk in resp.response:
            buf += chunk
            while b"\n\n" in buf:
                raw, buf = buf.split(b"\n\n", 1)
                fields = {}
                for line in raw.decode().split("\n"):
                    k, _, v = line.partition(": ")
                    fields.setdefault(k, []).append(v)
                if "data" in fields:
                    events.append((fields.get("event", ["message"])[0], "\n".join(fields["data"])))
            if until(events):
                break
        done.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    done.wait(timeout)
    return events


def test_follow_sends_new_lines_then_end(agent, monkeypatch):
    client, state, headers = agent
    Path(state.stdout).write_text("old1\nold2\n")
    resp = client.get("/api/logs/stdout/follow?lines=1", headers=headers, buffered=False)
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"

    def writer():
        time.sleep(0.2)
        with open(state.stdout, "a") as f:
            f.write("new1\nnew2 part")
            f.flush()
            time.sleep(0.1)
            f.write("ial\n")
    threading.Thread(target=writer, daemon=True).start()
    # the stream is still open (the job runs): lines that arrive now were sent as they were written
    events = _events(resp, lambda ev: len(ev) >= 3)
    assert [d for _, d in events[:3]] == ["old2", "new1", "new2 partial"]
    resp.close()


def test_follow_ends_with_the_job(agent, fake_scheduler):
    """The end comes from the agent's own look at its node (its job watch), not from the scheduler."""
    client, state, headers = agent
    Path(state.stdout).write_text("x\n")
    here = [Presence.LASTING]
    node = fake_scheduler.adapter("slurm")
    node.job_here = lambda job_id, name: here[0]  # what the node's own files say
    watch = jobwatch.JobWatch(node, state.job, state.node, look_every=60, ask_every=60)
    state.extra[jobwatch.KEY] = watch
    watch.look()  # its batch step is seen ...
    here[0] = Presence.ABSENT  # ... and then gone
    resp = client.get("/api/logs/stdout/follow", headers=headers, buffered=False)
    events = _events(resp, lambda ev: any(e == "end" for e, _ in ev))
    assert events[0] == ("message", "x") and events[-1][0] == "end"
    assert fake_scheduler.asked == 0  # a follower never asks the controller


def test_follow_resumes_after_last_event_id(agent):
    client, state, headers = agent
    Path(state.stdout).write_text("aa\nbb\ncc\n")
    resp = client.get("/api/logs/stdout/follow", headers={**headers, "Last-Event-ID": "3"}, buffered=False)
    assert [d for _, d in _events(resp, lambda ev: len(ev) >= 2)][:2] == ["bb", "cc"]
    resp.close()
    assert client.get("/api/logs/stdout/follow?offset=x", headers=headers).status_code == 400
