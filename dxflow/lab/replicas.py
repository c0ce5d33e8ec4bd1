"""The lab's site replicas: their names, ports and config files, the state file, starting and stopping them.

Used by :mod:`dxflow.lab.site` (``lab site up|down|status``) and by the tests and bench that kill and
restart a replica (tests/lab/sitekit.py, bench/site.py). Starts and stops are serialised by a lock in
the lab's folder, and a replica is found by what it serves, not only by the pid recorded: several
processes start and stop replicas of one lab.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from dxflow.lab import procs
from dxflow.lab.layout import Layout
from dxflow.lab.runner import LabError
from dxflow.locks import locked

log = logging.getLogger(__name__)

SERVICE_USER = "dxflow"
ADMIN = "dana"
ADMIN_GROUP = "dxadmin"
DXFLOW = "/usr/local/bin/dxflow"
ETC = Path("/etc/dxflow")
STATE_DIR = Path("/var/lib/dxflow-site")
PUBLISH_DIR = ETC / "site"
GLOBAL_CONFIG = ETC / "dxflow.toml"
CLIENT_CONFIG = ETC / "site-client.toml"
START_TIMEOUT = 40.0
#: where the user APIs listen: the login node as the lab's other hosts see it (not loopback: https)
API_HOST = "10.77.0.1"


@dataclass(frozen=True)
class Replica:
    """One ``dxflow site serve`` of the lab's site: its name, ports and config file."""

    name: str
    api: int
    console: int
    gateway: int
    config: Path

    @property
    def url(self) -> str:
        """The user API: https on the login node's lab address, pinned to the published tls.pem by the CLI."""
        return f"https://{API_HOST}:{self.api}"


REPLICAS = (Replica("a", 8470, 8472, 8471, ETC / "site.toml"),
            Replica("b", 8480, 8482, 8481, ETC / "site-b.toml"))


def replica(name: str) -> Replica:
    for r in REPLICAS:
        if r.name == name:
            return r
    raise LabError(f"no replica {name!r}: the lab's are {', '.join(r.name for r in REPLICAS)}")


@dataclass
class SiteState:
    """What ``lab site up`` made, so that ``lab site down`` (and ``lab down``) undo exactly that."""

    users_created: list[str] = field(default_factory=list)
    groups_created: list[str] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)
    files_written: list[str] = field(default_factory=list)
    #: /etc/dxflow/dxflow.toml did not exist: remove it, not only the block, when it is empty again
    global_created: bool = False
    dirs_created: list[str] = field(default_factory=list)

    def remember(self, attr: str, value: str) -> None:
        items = getattr(self, attr)
        if value not in items:
            items.append(value)


def state_file(layout: Layout) -> Path:
    return layout.root / "site.json"


def load_state(layout: Layout) -> SiteState | None:
    try:
        data = json.loads(state_file(layout).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("the site's state file is unreadable (%s): cleaning up by name", e)
        return SiteState(users_created=[SERVICE_USER, ADMIN], groups_created=[ADMIN_GROUP])
    known = {f.name for f in fields(SiteState)}
    return SiteState(**{k: v for k, v in data.items() if k in known})


def save_state(layout: Layout, state: SiteState) -> None:
    path = state_file(layout)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# -- replicas ----------------------------------------------------------------------------------
def log_file(layout: Layout, r: Replica) -> Path:
    return layout.log_dir / f"site-{r.name}.log"


def replica_pid(state: SiteState, r: Replica) -> int | None:
    """The replica's ``dxflow site serve`` when it runs: the pid recorded, or else the session leader that
    serves ``r.config`` (another ``lab site up`` or test may have started it and recorded its own pid)."""
    def serves(pid: int) -> bool:
        argv = procs.cmdline(pid)
        return procs.alive(pid) and "serve" in argv and str(r.config) in argv and _session(pid) == pid

    pid = state.pids.get(r.name)
    if pid and serves(pid):
        return pid
    found = procs.find_pids(serves)
    return min(found) if found else None


def answers(port: int, timeout: float = 1.0, host: str = API_HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def start_replica(layout: Layout, state: SiteState, r: Replica) -> int:
    """``dxflow site serve`` as the service account, a session of its own; waits until its API answers.
    One start at a time per lab (tests and benches start and stop replicas from several processes)."""
    with locked(layout.root / "site.lock", START_TIMEOUT + 10):
        _reload_pids(layout, state)
        return _start_replica(layout, state, r)


def _reload_pids(layout: Layout, state: SiteState) -> None:
    """The pids as the state file has them now (another process may have started or stopped a replica)."""
    fresh = load_state(layout)
    if fresh is not None:
        state.pids = fresh.pids


def _start_replica(layout: Layout, state: SiteState, r: Replica) -> int:
    running = replica_pid(state, r)
    if running:
        return running
    pw = pwd.getpwnam(SERVICE_USER)
    out = log_file(layout, r)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(STATE_DIR), "USER": SERVICE_USER,
           "LOGNAME": SERVICE_USER, "LANG": "C.UTF-8", "DXFLOW_SITE_SERVICE_CONFIG": str(r.config)}
    argv = [DXFLOW, "site", "serve", "--config", str(r.config)]
    log.info("starting site replica %s (API %s, gateway %s:%d)", r.name, r.url, layout.host_addr, r.gateway)
    with open(out, "ab") as f:
        proc = subprocess.Popen(argv, user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], env=env, cwd="/",
                                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    state.pids[r.name] = proc.pid
    save_state(layout, state)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LabError(f"site replica {r.name} exited {proc.returncode}; see {out}", argv=argv,
                           returncode=proc.returncode, stderr=_tail(out))
        if answers(r.api):
            return proc.pid
        time.sleep(0.3)
    raise LabError(f"site replica {r.name} does not answer on {r.url} after {START_TIMEOUT:.0f} s; see {out}",
                   argv=argv, stderr=_tail(out))


def stop_replica(layout: Layout, state: SiteState, r: Replica, sig: int = signal.SIGTERM) -> None:
    """Signal the replica's whole session (gunicorn's arbiter and its worker); SIGKILL = the replica dies."""
    with locked(layout.root / "site.lock", START_TIMEOUT + 10):
        _reload_pids(layout, state)
        _stop_replica(layout, state, r, sig)


def _stop_replica(layout: Layout, state: SiteState, r: Replica, sig: int) -> None:
    pid = replica_pid(state, r)
    if pid:
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        if procs.wait_gone([pid], 10):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    # a worker that outlived its arbiter (SIGKILL) still holds the ports: the session's every process
    leftovers = procs.find_pids(lambda p: _session(p) == pid) if pid else []
    procs.terminate(leftovers, what=f"process of site replica {r.name}")
    state.pids.pop(r.name, None)
    save_state(layout, state)


def _session(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[3])


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
