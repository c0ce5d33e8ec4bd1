"""The agent's gunicorn arbiter stays small (issue #14 item 6): what it imports is all it holds.

The arbiter imports dxflow.agent.server and the worker class; the worker (forked from it) loads the
Flask app and makes the agent's key. Anything heavy imported by the arbiter is paid twice in the
node's memory (in the arbiter, and again in the worker's resident set).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("flask", "werkzeug", "jinja2", "cryptography", "jwt", "paramiko", "flask_sock")

PROBE = """
import json, sys
import dxflow.agent.server, dxflow.edge.worker
from dxflow.agent.server import AgentServer
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in %r)))
""" % (HEAVY,)


def test_arbiter_imports_nothing_of_the_app():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert json.loads(out.stdout) == []


def test_app_is_loaded_in_the_worker_not_preloaded(tmp_path):
    from dxflow.agent.server import AgentJob, AgentServer
    from dxflow.config import SiteConfig

    job = AgentJob(user="alice", home=tmp_path, scheduler="slurm", cluster="c", job="1", node="n1")
    server = AgentServer(job, SiteConfig(), tmp_path / "agent.log")
    assert server.cfg.preload_app is False
    assert not hasattr(server, "state")  # made by load(), in the worker
