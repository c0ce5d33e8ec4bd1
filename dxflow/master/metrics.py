"""The user's jobs' metrics, merged from their agents (issue #16; docs/metrics.md).

- ``GET /api/metrics/JOB?since=…&node=n1,n2`` — each node's series and summary (its agent's
  ``/api/metrics``), in one answer; a node that cannot be asked is named under ``errors``;
- ``GET /api/report/JOB`` — the job's efficiency report, merged from its nodes' parts in
  ``~/.dxflow/reports/JOB/`` (while it runs, from its agents' summaries now) and written to
  ``~/.dxflow/reports/JOB.json``;
- ``GET /api/top/JOB?node=…&processes=N&sort=cpu|memory`` — what the job runs on each node now
  (``dxflow top``, the console's job view: :mod:`dxflow.master.top`);
- ``GET /metrics`` — the live figures of every ready agent of the user, in Prometheus' text format.

Like every route of the master they answer on the CLI's socket and, with a console login, on the
console's listeners (:mod:`dxflow.master.console`): only the user's own agents are ever asked, with
the user's tokens, and only the user's own reports are read.
"""

from __future__ import annotations

import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor

from flask import Flask, Response, jsonify, request

from dxflow.errors import DxflowError, NotFound, UsageError
from dxflow.layout import user_home
from dxflow.master import top
from dxflow.metrics import parse_since, prometheus
from dxflow.metrics.report import merge
from dxflow.metrics.summary import report_dir, reports_dir, safe_name, write_json

log = logging.getLogger(__name__)

#: What a job id may hold before it names a file: Slurm's ``123``, ``123_4``; PBS's ``17.server``,
#: ``17[].server``; LSF's ``123[4]``.
JOB_ID = re.compile(r"[A-Za-z0-9_.\[\]-]{1,128}")
#: Seconds one agent may take to answer.
ASK_TIMEOUT = 10.0
#: Agents asked at once.
PARALLEL = 16
#: ``/metrics`` asks each agent for this many seconds of its series (enough for the newest sample).
LIVE_WINDOW = 30.0


def _ask_all(fleet, agents: list, path: str) -> tuple[list[dict], dict[str, str]]:
    """Ask every agent for ``path``: (the answers, node -> why not)."""
    answers: list[dict] = []
    errors: dict[str, str] = {}

    def one(agent):
        try:
            status, data = fleet.ask(agent, path, timeout=ASK_TIMEOUT)
        except DxflowError as e:
            return agent, None, str(e)
        if status != 200:
            return agent, None, f"{status}: {data.get('message', data)}"
        return agent, data, ""

    if not agents:
        return answers, errors
    with ThreadPoolExecutor(max_workers=min(PARALLEL, len(agents))) as pool:
        for agent, data, why in pool.map(one, agents):
            if data is None:
                errors[agent.reg.node] = why
            else:
                answers.append(data)
    answers.sort(key=lambda d: d.get("node", ""))
    return answers, errors


def job_agents(fleet, job: str, nodes: list[str] | None = None) -> list:
    """The job's agents that can be asked now (each is checked first if it needs to be)."""
    fleet.find(job)  # NotFound with the user's words when the job has no agent
    agents = []
    names = sorted({a.reg.node for a in fleet.registry.of_job(job) if a.state != "gone"})
    for node in names:
        if nodes and node not in nodes:
            continue
        try:
            agents.append(fleet.relay_target(job, node))
        except DxflowError as e:
            log.info("metrics of job %s node %s: %s", job, node, e)
    unknown = sorted(set(nodes or ()) - set(names))
    if unknown:
        raise NotFound(f"job {job} has no agent on node(s) {', '.join(unknown)}; its nodes: {', '.join(names)}")
    return agents


def read_parts(job: str) -> list[dict]:
    """The job's nodes' report parts (files that cannot be read are left out, and logged)."""
    folder = report_dir(user_home(), job)
    parts = []
    try:
        names = sorted(p for p in folder.iterdir() if p.suffix == ".json" and not p.name.startswith("."))
    except FileNotFoundError:
        return []
    for path in names:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            log.warning("report part %s unreadable: %s", path, e)
            continue
        if isinstance(data, dict) and data.get("job") == job:
            parts.append(data)
    return parts


def init_app(app: Flask, fleet) -> None:
    @app.get("/api/metrics/<job>")
    def job_metrics(job: str):
        since_arg = request.args.get("since", "")
        since = parse_since(since_arg) if since_arg else 0.0
        nodes = [n for n in request.args.get("node", "").split(",") if n] or None
        agents = job_agents(fleet, job, nodes)
        # an epoch time: the same instant for every node (a duration would be read on each node's clock)
        answers, errors = _ask_all(fleet, agents, f"/api/metrics?since={since!r}" if since else "/api/metrics")
        if not answers and errors:
            raise DxflowError(f"no agent of job {job} answered: "
                              + "; ".join(f"{n}: {why}" for n, why in sorted(errors.items())))
        return jsonify(job=job, since=since, nodes=answers, errors=errors)

    @app.get("/api/top/<job>")
    def job_top(job: str):
        nodes = [n for n in request.args.get("node", "").split(",") if n] or None
        return jsonify(top.ask_nodes(fleet, job, nodes, request.args.get("processes", ""),
                                     request.args.get("sort", "")))

    @app.get("/api/report/<job>")
    def job_report(job: str):
        if not JOB_ID.fullmatch(job) or safe_name(job) != job:
            raise UsageError(f"not a job id: {job!r}")
        parts = {p["node"]: p for p in read_parts(job)}
        try:
            live = job_agents(fleet, job)
        except NotFound:
            live = []
        if live:  # a running job: its agents' summaries now, fresher than their last written parts
            answers, _errors = _ask_all(fleet, live, f"/api/metrics?since={time.time() + 86400!r}")
            parts.update({a["node"]: a["summary"] for a in answers if a.get("summary", {}).get("samples")})
        if not parts:
            raise NotFound(f"no report of job {job}: its agents write one while it runs "
                           f"(in {report_dir(user_home(), job)}/)")
        report = merge(list(parts.values()))
        try:
            write_json(reports_dir(user_home()) / f"{job}.json", report)
        except OSError as e:
            log.warning("cannot write the report of job %s: %s", job, e)
        return jsonify(report)

    @app.get("/metrics")
    def prometheus_metrics():
        agents = [a for a in fleet.registry.all() if a.state == "ready" and fleet.verified(a) is not None]
        since = time.time() - LIVE_WINDOW
        answers, errors = _ask_all(fleet, agents, f"/api/metrics?since={since!r}")
        for node, why in errors.items():
            log.info("metrics of %s not read: %s", node, why)
        return Response(prometheus.render(answers), mimetype=None,
                        headers={"Content-Type": prometheus.CONTENT_TYPE})
