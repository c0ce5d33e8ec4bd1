"""``/api/exec`` of the agent (:mod:`dxflow.agent.exec`), in-process (Flask's test client)."""

from __future__ import annotations

import base64
import json
import os
import time

import pytest


def _run(client, headers, body):
    resp = client.post("/api/exec", json=body, headers=headers)
    out = {"stdout": b"", "stderr": b""}
    result = None
    for line in resp.data.splitlines():
        if not line.strip():
            continue
        msg = json.loads(line)
        if "exit" in msg:
            result = msg
        else:
            out[msg["stream"]] += base64.b64decode(msg["data"])
    return resp, out, result


def test_exec_streams_separately_and_exits(agent):
    client, state, headers = agent
    resp, out, result = _run(client, headers, {"argv": ["sh", "-c", "echo out; echo err >&2; pwd; exit 3"]})
    assert resp.status_code == 200 and resp.mimetype == "application/x-ndjson"
    assert out["stdout"] == f"out\n{state.work_dir}\n".encode() and out["stderr"] == b"err\n"
    assert result == {"exit": 3}


def test_exec_env_cwd_stdin(agent):
    client, state, headers = agent
    os.mkdir(os.path.join(state.work_dir, "sub"))
    _, out, result = _run(client, headers, {"argv": ["sh", "-c", "echo $DXFLOW_JOB $FOO; pwd; cat"],
                                            "env": {"FOO": "bar"}, "cwd": "sub", "stdin": "piped\n"})
    assert out["stdout"].decode().split("\n")[:3] == ["42 bar", os.path.join(state.work_dir, "sub"), "piped"]
    assert result == {"exit": 0}


def test_exec_signal_and_missing_command(agent):
    client, _, headers = agent
    _, _, result = _run(client, headers, {"argv": ["sh", "-c", "kill -9 $$"]})
    assert result == {"exit": 137, "signal": 9}
    _, out, result = _run(client, headers, {"argv": ["no-such-command-dxflow"]})
    assert result == {"exit": 127} and b"command not found" in out["stderr"]


@pytest.mark.parametrize("body", [None, {}, {"argv": []}, {"argv": "ls"}, {"argv": [1]}, {"argv": [""]},
                                  {"argv": ["ls"], "env": {"A=B": "x"}}, {"argv": ["ls"], "env": []},
                                  {"argv": ["ls"], "cwd": "no/such/dir"}, {"argv": ["ls"], "stdin": 5},
                                  {"argv": ["a\0b"]}])
def test_exec_bad_requests(agent, body):
    client, _, headers = agent
    resp = client.post("/api/exec", data=json.dumps(body), content_type="application/json", headers=headers)
    assert resp.status_code == 400 and resp.get_json()["error"] == "UsageError"


def test_exec_killed_when_client_goes_away(agent):
    client, _, headers = agent
    resp = client.post("/api/exec", json={"argv": ["sh", "-c", "echo $$; exec sleep 30"]}, headers=headers,
                       buffered=False)
    first = next(iter(resp.response))
    pid = int(base64.b64decode(json.loads(first)["data"]))
    assert os.path.exists(f"/proc/{pid}")
    resp.close()  # the generator is closed, as gunicorn does when the client is gone
    deadline = time.monotonic() + 3
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}")


def test_exec_keepalive_during_silence(agent, monkeypatch):
    from dxflow.agent import exec as agent_exec
    monkeypatch.setattr(agent_exec, "KEEPALIVE", 0.1)
    client, _, headers = agent
    resp = client.post("/api/exec", json={"argv": ["sleep", "0.35"]}, headers=headers)
    lines = resp.data.split(b"\n")
    assert lines.count(b"") >= 3 and json.loads([x for x in lines if x][-1]) == {"exit": 0}
