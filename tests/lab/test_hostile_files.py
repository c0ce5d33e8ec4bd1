"""alice's own job plants a FIFO for her agent, and bob holds a token of hers that leaked in a URL.

* A FIFO in the work dir: ``dxflow cp`` of it fails with a clear error, the files API answers
  each request for its content with a 400 at once (``open(2)`` on a FIFO would wait for a
  writer and pin one of the agent's worker threads for good), and the agent still answers after.
* A token in the query string opens nothing: neither bob (who holds a leaked bearer token or
  console login link of alice's) nor alice's own connection gets past the check with one;
  a login token is no bearer token either.
"""

from __future__ import annotations

import json
import shutil
import stat
import uuid
from pathlib import Path

import pytest

from conftest import Jobs, as_user, dxflow, dxflow_json, on_node, wait_agents, wait_for

PY = "/opt/dxflow/venv/bin/python"
USER = "alice"
HOME = Path("/home") / USER
#: alice's job: a folder with a FIFO, a symlink to it and a plain file, then it waits
SCRIPT = ('d=$HOME/hostile-files-$SLURM_JOB_ID; mkdir -p $d && mkfifo $d/fifo && ln -s fifo $d/to-fifo && '
          'echo plain > $d/plain.txt; sleep 900')
#: alice's requests for a file's content through her master, each printed as "STATUS MESSAGE"
#: ("timeout" when the agent has not answered within 30 s)
ASK = """
import json, socket, sys
from dxflow.master.client import MasterClient
client = MasterClient().ensure()
job, node, times = sys.argv[1], sys.argv[2], int(sys.argv[3])
for path in sys.argv[4:]:
    for _ in range(times):
        try:
            resp = client.request("GET", client.agent_path(job, node, "/api/files/content") + "?path=" + path,
                                  None, {}, 30)
            body = resp.read()
            message = json.loads(body).get("message", "") if resp.status >= 400 else f"{len(body)} bytes"
            print(resp.status, message.replace("\\n", " "))
        except (socket.timeout, TimeoutError):
            print("timeout -")
"""
#: a request to an agent's port on its node: prints the status, or "closed" when the agent hung up unanswered
CALL = """
import sys, urllib.error, urllib.request
port, path, bearer = sys.argv[1], sys.argv[2], sys.argv[3]
req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
if bearer:
    req.add_header("Authorization", "Bearer " + bearer)
try:
    print(urllib.request.urlopen(req, timeout=20).status)
except urllib.error.HTTPError as e:
    print(e.code)
except (OSError, urllib.error.URLError):
    print("closed")
"""
#: a bearer token of alice's for one agent, minted as alice from her registration of it
MINT = """
import json, sys
from dxflow.auth import fingerprint, mint_token, user_key
from dxflow.layout import UserLayout
reg = json.load(open(sys.argv[1]))
print(mint_token(user_key(UserLayout.of().ensure_shared().base), reg["user"], fingerprint(reg["public_key"])))
"""


@pytest.fixture(scope="module")
def job(lab):
    """alice's one-node job with its folder of special files: (job id, node, registration, its path)."""
    jobs = Jobs()
    job = jobs.submit(USER, SCRIPT)
    try:
        jobs.wait_running(job, timeout=120)
        wait_agents(USER, job, 1, timeout=60)
        fifo = HOME / f"hostile-files-{job}" / "fifo"
        wait_for(lambda: fifo.exists() and stat.S_ISFIFO(fifo.lstat().st_mode), 30, what="the job's FIFO")
        reg_path = next((HOME / ".dxflow" / "fleet").glob(f"*.{job}.*.json"))  # read as root: bob cannot
        reg = json.loads(reg_path.read_text())
        yield job, reg["node"], reg, reg_path
    finally:
        jobs.cancel_all()
        shutil.rmtree(HOME / f"hostile-files-{job}", ignore_errors=True)


@pytest.fixture
def local(lab):
    """A folder of alice's on the login node, removed after."""
    path = Path(f"/tmp/dxflow-hostile-files-{uuid.uuid4().hex[:8]}")
    as_user(USER, ["mkdir", str(path)])
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_cp_of_a_fifo_fails_and_the_agent_keeps_answering(job, local):
    job_id, node, _, _ = job
    folder = f"hostile-files-{job_id}"
    for name in ("fifo", "to-fifo"):
        proc = dxflow(USER, "cp", "-q", f"{job_id}:{folder}/{name}", f"{local}/", check=False, timeout=120)
        assert proc.returncode != 0 and "not a file" in proc.stderr, (proc.returncode, proc.stderr)
    assert list(local.iterdir()) == []
    # the files API itself, 5 times for each: a 400 at once, never a request left waiting on the FIFO
    out = as_user(USER, [PY, "-c", ASK, job_id, node, "5", f"{folder}/fifo", f"{folder}/to-fifo"],
                  timeout=400).stdout
    answers = out.splitlines()
    assert len(answers) == 10 and all(a.startswith("400 ") and "FIFO" in a for a in answers), out
    # ... and the agent still answers: a command, and a regular file's copy
    assert dxflow_json(USER, "info", f"{job_id}:{node}", timeout=60)["job"] == job_id
    dxflow(USER, "cp", "-q", f"{job_id}:{folder}/plain.txt", f"{local}/", timeout=120)
    assert (local / "plain.txt").read_text() == "plain\n"


def test_a_token_in_the_query_string_opens_nothing(job):
    job_id, node, reg, reg_path = job
    port = str(reg["port"])  # all bob is handed: the port of alice's agent
    bearer = as_user(USER, [PY, "-c", MINT, str(reg_path)]).stdout.strip()
    link = json.loads(dxflow(USER, "console", "--agent", job_id, "--json").stdout)
    login = link["url"].split("token=", 1)[1]

    def call(user: str, path: str, header_token: str = "") -> str:
        return on_node(node, user, ["/usr/bin/python3", "-c", CALL, port, path, header_token]).stdout.strip()

    assert call(USER, "/api/node", bearer) == "200"  # the control: alice, her bearer token in its header
    for leaked in (bearer, login):
        for path in (f"/api/node?token={leaked}", f"/api/files?path=.&token={leaked}"):
            assert call("bob", path) in ("401", "closed")  # bob with a leaked token: nothing
            assert call(USER, path) == "401"               # nor alice's own connection: the query is no place
    assert call("bob", "/api/node", login) in ("401", "closed")
    assert call(USER, "/api/node", login) == "401"          # a login token is no bearer token
