"""The agent's worker checks tokens and signs challenges without PyJWT or cryptography (issue #14 item 6).

Those two are ~11 MiB of a worker's resident set. The probe runs the worker's own start-up
(``AgentServer.load``: the agent's key from dxflow.agent.keygen's process, the user's key pair made
there too, the app with every blueprint), serves a request with the user's token and a challenge,
and lists what it imported: an ``import jwt`` or a cryptography import anywhere on that path fails it
(and so does flask-sock's, which waits for the first shell).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dxflow import auth

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
from pathlib import Path
from dxflow.agent import jobwatch  # started by the worker once it listens
from dxflow.agent.server import AgentJob, AgentServer
from dxflow.config import SiteConfig
from dxflow.layout import UserLayout

home = Path(sys.argv[1])
UserLayout.of(home).ensure_shared()
server = AgentServer(AgentJob(user=sys.argv[2], home=home, scheduler="local", cluster="c", job="1", node="n1"),
                     SiteConfig(), home / "agent.log")
client = server.load().test_client()
print(json.dumps({"audience": server.state.audience, "public_key": server.state.public_key}), flush=True)
token = sys.stdin.readline().strip()
health = client.get("/api/health?challenge=nonce", headers={"Authorization": "Bearer " + token})
refused = client.get("/api/health", headers={"Authorization": "Bearer " + token[:-8] + "AAAAAAAA"})
print(json.dumps({"health": health.status_code, "signature": health.get_json().get("signature"),
                  "refused": refused.status_code,
                  "heavy": sorted(m for m in sys.modules if m.split(".")[0] in ("jwt", "cryptography", "paramiko")),
                  "websocket": sorted(m for m in sys.modules if m.split(".")[0] in ("flask_sock", "simple_websocket",
                                                                                     "wsproto", "asyncio"))}))
"""


def test_worker_serves_tokens_and_challenges_without_jwt_or_cryptography(tmp_path):
    user = "alice"
    proc = subprocess.Popen([sys.executable, "-c", PROBE, str(tmp_path), user], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert line, proc.communicate(timeout=60)[1]
        agent = json.loads(line)
        # the user's key pair was made by the agent (in keygen's process): the master would sign with it
        token = auth.mint_token(auth.user_key(tmp_path / ".dxflow"), user, agent["audience"])
        out, err = proc.communicate(token + "\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    seen = json.loads(out)
    assert seen["health"] == 200 and seen["refused"] == 401
    assert auth.check_challenge(agent["public_key"], "nonce", seen["signature"])
    assert agent["audience"] == auth.fingerprint(agent["public_key"])
    assert seen["heavy"] == []
    # flask-sock (and with it asyncio: 2.5 MiB) comes with the first shell, not before
    assert seen["websocket"] == []
