"""Run an agent under gunicorn on 127.0.0.1, port 0, and register it once it answers.

Process layout: the gunicorn arbiter is the process the prolog started (its own
session; the epilog stops its whole tree). It is a child subreaper, so processes
the user starts from a shell and daemonizes stay in that tree.

The arbiter stays small: it imports gunicorn and what it needs to bind, supervise and
unregister, nothing of Flask, cryptography or PyJWT, nor the scheduler adapters and the
registration (``python -X importtime -m dxflow.agent`` shows it). Whatever the arbiter holds
is in the worker's resident set too (the worker is its fork), and a page either writes is
copied. The worker loads the app (no ``preload_app``), then serves with threads. It loads neither
cryptography nor PyJWT either (dxflow.signatures checks and signs; only a dial-out to a site service,
``site_gateways``, brings paramiko and cryptography): its key is made by a short-lived process that
has cryptography (dxflow.agent.keygen), started first so that it runs while the app's modules load.
A worker that gunicorn starts again gets a new key and registers it anew, as a new agent would: the
master checks it before it sends anything.

Before it forks, the arbiter moves its objects out of the garbage collector's reach
(``gc.freeze``): the worker's collections then leave the pages they share unwritten, and shared
(PSS, ``bench/hooks.py``: 2-4 MiB less).
"""

from __future__ import annotations

import ctypes
import datetime as dt
import gc
import logging
import os
import pwd
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gunicorn.app.base import BaseApplication

from dxflow import API_VERSION, __version__
from dxflow.config import SiteConfig, agent_name
from dxflow.layout import UserLayout

if TYPE_CHECKING:  # the worker's: the arbiter never imports them (see the module docstring)
    from dxflow.agent.keygen import Making
    from dxflow.agent.state import AgentState
    from dxflow.enroll import Enrollment

log = logging.getLogger("dxflow.agent")
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        log.warning("could not become a child subreaper: daemonized children may escape cleanup")


@dataclass(frozen=True)
class AgentJob:
    """What the arbiter knows of the agent's job; the worker makes the agent's state from it."""

    user: str
    home: Path
    scheduler: str
    cluster: str
    job: str
    node: str
    work_dir: str = ""
    stdout: str = ""
    stderr: str = ""
    started: float = 0.0

    def make_state(self, making: Making | None = None) -> AgentState:
        """The agent's state with a key of its own (and the user's key pair made if it is missing);
        ``making``: the key's process started earlier (:func:`dxflow.agent.keygen.start`)."""
        from dxflow.agent import keygen
        from dxflow.agent.state import AgentState
        from dxflow.signatures import fingerprint

        # the user's key pair exists before any token is checked
        user_public_key = keygen.user_public_key(UserLayout.of(self.home).base)
        key, pub = (making or keygen.start()).key()
        return AgentState(user=self.user, home=self.home, scheduler=self.scheduler, cluster=self.cluster,
                          job=self.job, node=self.node, key=key, public_key=pub, audience=fingerprint(pub),
                          user_public_key=user_public_key, work_dir=self.work_dir, stdout=self.stdout,
                          stderr=self.stderr, started=self.started)


class AgentServer(BaseApplication):
    state: AgentState  # made in the worker (load)

    def __init__(self, job: AgentJob, site: SiteConfig, log_path: Path, bind: str = "127.0.0.1:0",
                 enrollment: Enrollment | None = None) -> None:
        self.job = job
        self.site = site
        self.enrollment = enrollment  # with the site's gateways (dxflow.agent.dialout); kept for a new worker
        self.log_path = log_path
        self.bind = bind
        self.fleet_dir = UserLayout.of(job.home).fleet_dir
        super().__init__()

    def load_config(self) -> None:
        settings = {
            "bind": [self.bind], "workers": 1, "worker_class": "dxflow.edge.worker.GuardedThreadWorker",
            "threads": self.site.agent_threads,
            "preload_app": False, "control_socket_disable": True, "timeout": 120, "graceful_timeout": 1, "keepalive": 30,
            "errorlog": str(self.log_path), "accesslog": None, "loglevel": "info",
            "proc_name": f"dxflow-agent {self.job.job}.{self.job.node}",
            "pre_fork": self._pre_fork, "post_worker_init": self._post_worker_init, "on_exit": self._on_exit,
        }
        for key, value in settings.items():
            if key in self.cfg.settings:  # settings added by newer gunicorn releases are skipped on older ones
                self.cfg.set(key, value)

    def load(self):
        """In the worker: the agent's key and app (the arbiter never imports them)."""
        from dxflow.agent import keygen

        making = keygen.start()  # the key is made by its own process while this one loads the app's modules
        from dxflow.agent import create_app, load_blueprints
        from dxflow.schedulers.base import QUERY_BUDGET

        load_blueprints()
        QUERY_BUDGET.resize(self.site.controller_queries_per_minute)  # every controller query of this agent counts
        self.state = self.job.make_state(making)
        if self.site.site_gateways:  # tokens the site service signs for this agent's user (docs/site.md)
            from dxflow.agent.auth import site_token_key

            self.state.extra["site_token_key"] = site_token_key(self.site)
        # the site policy read once, here: the blueprints would each read the file again
        return create_app(self.state, {"FILE_SCRATCH_ROOTS": self.site.scratch_roots,
                                       "FILE_NODE_LOCAL_ROOTS": self.site.node_local_roots,
                                       "METRICS_INTERVAL": self.site.metrics_interval})

    # gunicorn hooks --------------------------------------------------------
    def _pre_fork(self, arbiter, worker) -> None:
        gc.freeze()  # idempotent: a worker started again forks from the same frozen objects

    def _post_worker_init(self, worker) -> None:
        from dxflow import registration
        from dxflow.schedulers import adapter_class

        for sock in worker.sockets:
            # accepted connections inherit it: a response written as headers + body must not wait
            # for sshd's delayed ACK (~40 ms on a kept-alive tunnel channel)
            sock.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.state.port = worker.sockets[0].getsockname()[1]
        reg = registration.Registration(
            cluster=self.state.cluster, scheduler=self.state.scheduler, job=self.state.job,
            node=self.state.node, address=self.state.node, port=self.state.port, pid=os.getppid(),
            user=self.state.user,
            started=dt.datetime.fromtimestamp(self.state.started, dt.timezone.utc).isoformat(timespec="seconds"),
            public_key=self.state.public_key, api_version=API_VERSION, version=__version__,
            job_nodes=registration.job_nodes_of(os.environ),
        )
        registration.write(self.fleet_dir, reg)
        log.info("registered %s on 127.0.0.1:%d", reg.name, self.state.port)
        if adapter_class(self.state.scheduler).started_by_hand:
            log.info("web console of this node: run `dxflow console --agent %s:%s` for a login link",
                     self.state.job, self.state.node)
        # stops the agent when its job is gone, in case no epilog does; looked at on this node (issue #11)
        from dxflow.agent import jobwatch

        jobwatch.start(self.state, self.site, stop=lambda: os.kill(os.getppid(), signal.SIGTERM))
        if self.site.site_gateways:  # reached by the site service through connections it dials out (issue #17)
            from dxflow.agent import dialout

            dialout.start(self.site, self.enrollment, reg)

    def _on_exit(self, arbiter) -> None:
        from dxflow import registration

        registration.remove(self.fleet_dir, agent_name(self.job.cluster, self.job.job, self.job.node),
                            pid=os.getpid())


def redirect_output(log_path: Path) -> None:
    """Send this process's stdout/stderr to the agent log (the hook gave us /dev/null)."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def serve(scheduler: str, cluster: str, job: str, node: str, *, work_dir: str = "", stdout: str = "",
          stderr: str = "", bind: str = "127.0.0.1:0", foreground: bool = False) -> int:
    started = time.time()
    os.environ["DXFLOW_AGENT"] = "1"  # marks the agent's processes (and children) as not the job's own
    site = SiteConfig.load()
    layout = UserLayout.of().ensure_shared()  # nothing per host: this is a compute node
    log_path = layout.agent_log(agent_name(cluster, job, node))
    if not foreground:
        redirect_output(log_path)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [agent] %(levelname)s %(message)s",
                        stream=sys.stderr)
    become_subreaper()
    spec = AgentJob(user=pwd.getpwuid(os.getuid()).pw_name, home=layout.base.parent, scheduler=scheduler,
                    cluster=cluster, job=job, node=node, work_dir=work_dir, stdout=stdout, stderr=stderr,
                    started=started)
    enrollment = None
    if "DXFLOW_GATEWAY_ENROLLMENT" in os.environ:  # dxflow.enroll.ENV: imported where the site has gateways only
        from dxflow.agent.dialout import take_enrollment

        enrollment = take_enrollment()  # before anything forks: the agent's children never see it
    AgentServer(spec, site, log_path, bind=bind, enrollment=enrollment).run()
    return 0
