"""The site service as its admin runs it: `dxflow site init` as root, `site serve` as the service account
(never root), `site status`; and the lab's agents, through the lab's site, seen by their owner only.

``init``/``serve``/``status`` run on a config of the test's own (ports 18570-18572, a state folder in a
temporary folder): the lab's two replicas (docs/lab.md) are left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import DXFLOW, run, wait_for
from sitekit import site_dxflow, site_up, wait_site_agents

SERVICE = "dxflow"


def make_site(listen: str = "127.0.0.1:18570"):
    folder = Path(tempfile.mkdtemp(prefix="dxflow-site-svc-"))
    folder.chmod(0o755)
    state, publish = folder / "state", folder / "publish"
    config = folder / "site.toml"
    config.write_text(f'listen = "{listen}"\nconsole_listen = "127.0.0.1:18572"\n'
                      f'gateway_listen = "127.0.0.1:18571"\nstate_dir = "{state}"\npublish_dir = "{publish}"\n'
                      f'replica = "svc-test"\n[clusters.dxlab]\nscheduler = "slurm"\n')
    return config, state, publish


@pytest.fixture
def own_site():
    """A config of the test's own: (its path, its state folder, its publish folder)."""
    config, state, publish = make_site()
    yield config, state, publish
    shutil.rmtree(config.parent, ignore_errors=True)


@contextlib.contextmanager
def serving(config: Path):
    """The site service of ``config``, started as root with ``--user dxflow``, until the block ends."""
    with open(config.parent / "serve.log", "w") as log:  # read when a test fails
        proc = subprocess.Popen([DXFLOW, "site", "serve", "--config", str(config), "--user", SERVICE],
                                stdout=log, stderr=log, start_new_session=True)
    try:
        wait_for(lambda: site("status", "--config", str(config), check=False).returncode == 0, 30,
                 what="the test's site service answering")
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


def site(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return run([DXFLOW, "site", *args], check=check, timeout=timeout)


def test_init_makes_private_keys_of_the_service_account(own_site):
    config, state, publish = own_site
    first = site("init", "--config", str(config))
    assert "made" in first.stdout
    account = pwd.getpwnam(SERVICE)
    st = state.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (account.pw_uid, 0o700)
    for name in ("gateway_host_key", "token_key.pem", "tls.key"):
        st = (state / name).stat()
        assert (st.st_uid, st.st_mode & 0o777) == (account.pw_uid, 0o600), name
    for name in ("gateway_host_key.pub", "token_key.pem", "tls.pem"):
        st = (publish / name).stat()
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o644), name
    assert (publish / "gateway_host_key.pub").read_text().startswith("ssh-ed25519 ")
    assert "PRIVATE" not in (publish / "token_key.pem").read_text()
    # another user can read neither the private keys nor the folder that holds them
    assert run(["runuser", "-u", "bob", "--", "cat", str(state / "token_key.pem")], check=False).returncode != 0
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    again = site("init", "--config", str(config))
    assert "made" not in again.stdout and {p.name: p.read_bytes() for p in state.iterdir()} == before


def test_init_is_for_root_only(own_site):
    config, state, _ = own_site
    proc = run(["runuser", "-u", SERVICE, "--", DXFLOW, "site", "init", "--config", str(config)], check=False)
    assert proc.returncode == 2 and "runs as root" in proc.stderr
    assert not state.exists()


def test_serve_as_root_is_refused(own_site):
    config, _, _ = own_site
    site("init", "--config", str(config))
    proc = site("serve", "--config", str(config), check=False, timeout=30)
    assert proc.returncode == 2 and "does not run as root" in proc.stderr
    assert site("status", "--config", str(config), check=False).returncode == 3  # nothing was started


def test_serve_drops_to_the_service_account_and_answers(own_site):
    config, state, _ = own_site
    site("init", "--config", str(config))
    with serving(config) as proc:
        status = json.loads(site("status", "--config", str(config), "--json").stdout)
        assert status["running"] and status["replica"] == "svc-test"
        uids = {int(line.split()[1]) for line in run(["ps", "-o", "pid=,uid=", "--ppid", str(proc.pid)]).stdout
                .splitlines()} | {os.stat(f"/proc/{proc.pid}").st_uid}
        assert uids == {pwd.getpwnam(SERVICE).pw_uid}  # the arbiter and its worker: never root
        # nobody gets anything without a MUNGE credential
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen("http://127.0.0.1:18570/api/agents", timeout=10)
        assert e.value.code == 401
        assert (state / "site.db").stat().st_uid == pwd.getpwnam(SERVICE).pw_uid


def test_off_loopback_the_user_api_speaks_tls_with_the_published_certificate():
    """Kept-alive requests too: each head after the first is read from the TLS socket by a thread."""
    config, _, publish = make_site(listen="10.77.0.1:18670")
    try:
        site("init", "--config", str(config))
        with serving(config):
            pinned = ssl.create_default_context(cafile=str(publish / "tls.pem"))
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen("https://10.77.0.1:18670/api/agents", timeout=10, context=pinned)
            assert e.value.code == 401  # TLS done, then the same refusal as on loopback
            with pytest.raises(urllib.error.URLError):  # a certificate not pinned is not trusted
                urllib.request.urlopen("https://10.77.0.1:18670/api/agents", timeout=10,
                                       context=ssl.create_default_context())
            # the console's listener stays plain http (a browser reaches it by `ssh -L`, or behind a proxy)
            assert urllib.request.urlopen("http://127.0.0.1:18572/login", timeout=10).status == 200
            # a connection that never starts its handshake is closed by the head deadline, thread or not
            with socket.create_connection(("10.77.0.1", 18670), timeout=30) as silent:
                assert silent.recv(1) == b""
    finally:
        shutil.rmtree(config.parent, ignore_errors=True)


def test_the_lab_agents_are_seen_through_the_site_by_their_owner_only(jobs):
    site_up()
    job = jobs.submit("alice", "sleep 120", nodes=2)
    jobs.wait_running(job)
    agents = wait_site_agents("alice", job, _nodes_of(job))
    assert all(a["cluster"] == "dxlab" for a in agents)
    theirs = json.loads(site_dxflow("bob", "ls", "--json", "--all").stdout)
    assert all(a["job"] != job for a in theirs)
    refused = site_dxflow("bob", "exec", job, "--", "id", check=False)
    assert refused.returncode == 5 and "alice" not in refused.stdout + refused.stderr


def _nodes_of(job: str) -> set[str]:
    out = run(["squeue", "-h", "-j", job, "-o", "%N"]).stdout.strip()
    return set(run(["scontrol", "show", "hostnames", out]).stdout.split())
