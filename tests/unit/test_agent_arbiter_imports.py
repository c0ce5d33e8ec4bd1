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
#: dxflow's modules that only the worker uses (the registration is written by the worker; the arbiter
#: imports it only when it exits, to remove it)
WORKER_ONLY = ("dxflow.schedulers", "dxflow.registration", "dxflow.auth", "dxflow.agent.state")

PROBE = """
import json, sys
import dxflow.agent.server, dxflow.edge.worker
from dxflow.agent.server import AgentServer
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in %r or m.startswith(%r))))
""" % (HEAVY, WORKER_ONLY)

#: the worker as it serves: the app with every blueprint, and what the worker starts after it boots
WORKER_PROBE = """
import json, sys
from pathlib import Path
from dxflow.agent.server import AgentJob
from dxflow.agent import create_app, jobwatch
from dxflow.layout import UserLayout
UserLayout.of(Path(sys.argv[1])).ensure_shared()
state = AgentJob(user="alice", home=Path(sys.argv[1]), scheduler="slurm", cluster="c", job="1", node="n1").make_state()
create_app(state)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("paramiko",))))
"""


def test_arbiter_imports_nothing_of_the_app():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert json.loads(out.stdout) == []


def test_worker_loads_no_paramiko(tmp_path):
    """paramiko (7 MiB resident) is for the master's tunnels and an agent's rare SSH hops: an agent that
    makes none never loads it (issue #14 item 6). A module that needs it imports it where it is used."""
    out = subprocess.run([sys.executable, "-c", WORKER_PROBE, str(tmp_path)], capture_output=True, text=True,
                         check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                    "HOME": str(tmp_path)})
    assert json.loads(out.stdout) == []


def test_app_is_loaded_in_the_worker_not_preloaded(tmp_path):
    from dxflow.agent.server import AgentJob, AgentServer
    from dxflow.config import SiteConfig

    job = AgentJob(user="alice", home=tmp_path, scheduler="slurm", cluster="c", job="1", node="n1")
    server = AgentServer(job, SiteConfig(), tmp_path / "agent.log")
    assert server.cfg.preload_app is False
    assert not hasattr(server, "state")  # made by load(), in the worker


def test_arbiter_freezes_its_objects_before_it_forks(tmp_path):
    """The worker's collections then leave the pages it shares with the arbiter unwritten (PSS)."""
    import gc

    from dxflow.agent.server import AgentJob, AgentServer
    from dxflow.config import SiteConfig

    job = AgentJob(user="alice", home=tmp_path, scheduler="slurm", cluster="c", job="1", node="n1")
    server = AgentServer(job, SiteConfig(), tmp_path / "agent.log")
    gc.unfreeze()
    try:
        server.cfg.pre_fork(None, None)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
