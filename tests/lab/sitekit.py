"""What the site-service lab tests share: the CLI pointed at the site, one replica at a time, the site itself.

The lab's site (``dxflow lab site up``, dxflow/lab/site.py) leaves every user's CLI on its own master;
a command talks to the site when ``DXFLOW_SITE_CONFIG`` names ``/etc/dxflow/site-client.toml`` (both
replicas, tried in order) or a copy of it naming one replica only (:func:`client_config`).
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path
from typing import Iterator

from conftest import DXFLOW, run, wait_for
from dxflow.lab import site
from dxflow.lab.layout import Layout

CLIENT = str(site.CLIENT_CONFIG)


def site_up() -> dict:
    """The lab's site, both replicas answering: brought (back) up when it is not (``lab site up`` is
    idempotent: it starts a replica that is not running and leaves the rest as it is)."""
    info = site.status()
    if info["state"] != "up":
        info = site.up()
    assert info["state"] == "up", site.status_table(info)
    return info


def client_config(folder: Path, *names: str) -> str:
    """A copy of the lab's client config whose ``site`` names only the replicas NAMES, in that order."""
    urls = ", ".join(f'"{site.replica(n).url}"' for n in names)
    lines = [f"site = [{urls}]" if line.startswith("site = ") else line
             for line in Path(CLIENT).read_text().splitlines()]
    path = folder / f"client-{''.join(names)}.toml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o644)
    return str(path)


@contextlib.contextmanager
def configs() -> Iterator[dict[str, str]]:
    """``{"a": config naming replica a only, "b": ..., "ab": both}`` in a folder every user can read."""
    folder = Path(tempfile.mkdtemp(prefix="dxflow-site-test-"))
    folder.chmod(0o755)
    try:
        yield {"a": client_config(folder, "a"), "b": client_config(folder, "b"), "ab": CLIENT}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def site_dxflow(user: str, *args: str, config: str = CLIENT, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess:
    """``dxflow ARGS`` as USER in a login shell on the login node, talking to the site of CONFIG."""
    line = f"DXFLOW_SITE_CONFIG={shlex.quote(config)} exec {DXFLOW} {shlex.join(args)}"
    return run(["runuser", "-l", user, "-c", line], check=check, timeout=timeout)


def site_ls(user: str, config: str = CLIENT) -> list[dict]:
    return json.loads(site_dxflow(user, "ls", "--json", config=config).stdout)


def wait_site_agents(user: str, job: str, nodes: set[str], *, config: str = CLIENT, cluster: str | None = None,
                     timeout: float = 60) -> list[dict]:
    """Until the site lists USER's agents of JOB (of CLUSTER) on exactly NODES, all ready."""
    def ready():
        proc = site_dxflow(user, "ls", "--json", config=config, check=False)
        if proc.returncode != 0:
            return None
        agents = [a for a in json.loads(proc.stdout) if a["job"] == job
                  and (cluster is None or a.get("cluster") == cluster)]
        return agents if {a["node"] for a in agents} == nodes and all(a["state"] == "ready" for a in agents) else None
    return wait_for(ready, timeout, interval=0.5, what=f"{user}'s agents of {job} ready on {sorted(nodes)} via the site")


def kill_replica(name: str) -> None:
    """SIGKILL the replica's whole process group: the machine it ran on is gone, as far as anyone can tell."""
    import signal

    layout = Layout()
    state = site.load_state(layout)
    assert state is not None
    pid = site.replica_pid(state, site.replica(name))
    assert pid, f"replica {name} is not running"
    site.stop_replica(layout, state, site.replica(name), signal.SIGKILL)
    wait_for(lambda: not site.answers(site.replica(name).api), 10, what=f"replica {name} silent")


def start_replica(name: str) -> int:
    layout = Layout()
    state = site.load_state(layout)
    assert state is not None
    return site.start_replica(layout, state, site.replica(name))


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # the login's 303 carries the cookie: look at it
        return None


def http(url: str, cookie: str = "", method: str = "GET", timeout: float = 20) -> tuple[int, Message, bytes]:
    """(status, headers, body) of one request, redirects not followed."""
    req = urllib.request.Request(url, method=method, headers={"Cookie": cookie} if cookie else {})
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def console_login(user: str, config: str = CLIENT) -> tuple[str, str]:
    """``dxflow console``'s one-time link, redeemed: (the console's base URL, the session cookie)."""
    link = json.loads(site_dxflow(user, "console", "--json", config=config).stdout)
    url = link["url"]
    status, headers, body = http(url)
    assert status in (302, 303), (status, body[:300])
    cookie = "; ".join(c.split(";")[0] for c in headers.get_all("Set-Cookie") or [])
    assert "=" in cookie, dict(headers)
    base = url.split("/login")[0]
    return base, cookie
