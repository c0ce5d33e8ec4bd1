"""The site service's HTTP app: the master's API, for every user, with each request's own user.

The same routes as a user's master (:mod:`dxflow.master.app`), so every ``dxflow`` command works
unchanged through :class:`dxflow.site.client.SiteClient`: the relay (:func:`dxflow.master.app.add_relay`)
and the master's extensions of :data:`~dxflow.master.app.RELAY_EXTENSIONS`, served by a
:class:`~dxflow.site.fleet.SiteFleet`. What the site adds or changes:

* every request has a user: MUNGE on the user API, the console session on the console's listener
  (:mod:`dxflow.site.users`, :mod:`dxflow.site.console`); ``/api/agents`` lists what that user may see;
* ``/api/master`` describes this replica (its gateway, its database) instead of a user's master;
* ``/api/shutdown`` is refused: the site's admin stops the service (systemd), no user;
* ``/api/jobs/JOB/nodes`` (what ``JOB:all`` means) answers from the requesting user's jobs on each
  cluster (:mod:`dxflow.site.jobnodes`), not the master's one scheduler;
* ``/api/report/JOB`` answers from the job's live agents only: the reports an ended job left are in
  its user's home, which the service account does not read (``dxflow report`` reads them there).
"""

from __future__ import annotations

import importlib
import os
import time

from flask import Flask, jsonify, request

from dxflow import __version__
from dxflow.edge import httperrors
from dxflow.errors import AccessDenied, NotFound, UsageError
from dxflow.master import jobnodes
from dxflow.master.app import RELAY_EXTENSIONS, add_relay
from dxflow.master.metrics import JOB_ID, _ask_all, job_agents
from dxflow.metrics.report import merge
from dxflow.site import console, users
from dxflow.site import jobnodes as site_jobnodes
from dxflow.site.fleet import SiteFleet


def create_app(fleet: SiteFleet) -> Flask:
    app = Flask("dxflow.site")
    app.config["FLEET"] = fleet
    users.init_app(app, fleet)     # first: every request's user, and the policy the fleet applies
    console.init_app(app, fleet)
    for name in RELAY_EXTENSIONS:
        importlib.import_module(name).init_app(app, fleet)
    app.view_functions["job_report"] = _live_report(fleet)
    jobnodes.init_app(app, fleet, lookup=site_jobnodes.lookup(fleet))  # the requesting user's jobs on each cluster

    @app.get("/api/master")
    def site_status():
        user = users.current()
        gateway = fleet.gateway.status() if fleet.gateway is not None else {"running": False}
        return jsonify(pid=os.getpid(), user=user.name, admin=user.admin, version=__version__, site=True,
                       replica=fleet.replica, database=fleet.store.kind, gateway=gateway, tunnels={},
                       agents=len([a for a in fleet.registry.all() if a.state != "gone"]))

    @app.post("/api/shutdown")
    def shutdown():
        raise AccessDenied("the site service is stopped by its admin (systemctl stop dxflow-site), not by users")

    @app.get("/api/agents")
    def agents():
        if request.args.get("refresh"):
            fleet.refresh()
        show_all = request.args.get("all") == "1"
        items = [users.listing_item(fleet.shown(a), a.reg.user) for a in fleet.registry.all()
                 if show_all or a.state != "gone"]
        return jsonify(items)

    add_relay(app, fleet)
    httperrors.install(app, default_status=502)
    return app


def _live_report(fleet: SiteFleet):
    def job_report(job: str):
        if not JOB_ID.fullmatch(job.replace("~", "_", 1)):
            raise UsageError(f"not a job id: {job!r}")
        agents = job_agents(fleet, job)  # NotFound for a job that is not the user's or has no agent now
        answers, _errors = _ask_all(fleet, agents, f"/api/metrics?since={time.time() + 86400!r}")
        parts = [a["summary"] for a in answers if a.get("summary", {}).get("samples")]
        if not parts:
            raise NotFound(f"no report of job {job} yet: its agents have no samples (an ended job's report is "
                           "in your home: `dxflow report` reads it there)")
        return jsonify(merge(parts))
    return job_report
