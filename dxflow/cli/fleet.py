"""``dxflow ls`` and ``dxflow info``: your jobs' agents, and one node in detail."""

from __future__ import annotations

import argparse
import datetime as dt


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ls", help="list your jobs' agents", description=(
        "List the agents of your running jobs: job, node, state, uptime, load. States: "
        "starting (registered, not yet checked), ready (reached through its tunnel and proved "
        "its identity), lost (job running but agent unreachable), incompatible (an agent of a dxflow release "
        "whose agent API this one does not speak; it ends with its job), gone (job or agent ended). LOAD, CPU and "
        "MEMORY are the node's current figures when at most 5 s old; older ones (the agent could not be "
        "asked, or is lost) are shown with their age, e.g. `0.52 (40s ago)`, never as current. With --json, "
        "metrics_age and metrics_fresh say the same. Through a site service serving several clusters, a "
        "CLUSTER column comes first (name a job as CLUSTER/JOB where two clusters have its id); a site "
        "admin's list has a USER column too."))
    p.add_argument("--json", action="store_true", help="print a JSON list for scripts")
    p.add_argument("-a", "--all", action="store_true", help="also show agents that are gone")
    p.add_argument("--job", help="only this job's agents")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("info", help="show one node of a job (through its agent)",
                       description="Ask the agent of JOB on NODE (default: the job's first node) "
                       "for its node: hostname, CPUs, memory, load, uptime, GPUs. With a node set "
                       "(JOB:n[1-4], JOB:all) every node is asked at once and shown as one row.")
    p.add_argument("target", metavar="JOB[:NODES]")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)


def cmd_ls(args: argparse.Namespace) -> int:
    import getpass

    from dxflow.cli.service import service
    from dxflow.cli.util import human_bytes, human_duration, print_json, print_table

    client = service().ensure()
    agents = client.json("GET", "/api/agents?refresh=1" + ("&all=1" if args.all else ""))
    if args.job:
        agents = [a for a in agents if a["job"] == args.job]
    if args.json:
        print_json(agents)
        return 0
    if not agents:
        print("no agents: none of your jobs is running with dxflow (submit one, then `dxflow ls`)")
        return 0
    now = dt.datetime.now(dt.timezone.utc)
    rows = []
    for a in agents:
        try:
            up: str = human_duration((now - dt.datetime.fromisoformat(a.get("started") or "")).total_seconds())
        except ValueError:  # a record without its start time (one the site keeps of an agent it never heard of)
            up = "-"
        load = f"{a['load'][0]:.2f}" if a.get("load") else "-"
        cpu = f"{a['cpu_percent']:.0f}%" if a.get("cpu_percent") is not None else "-"
        mem = (f"{human_bytes(a['memory_total'] - a['memory_available'])}/{human_bytes(a['memory_total'])}"
               if a.get("memory_total") else "-")
        if a.get("metrics_fresh") is False:
            # an old reading is never shown as the node's present state: its age goes with it
            if a.get("metrics_age") is None:  # of unknown age (read by an older master)
                load = cpu = mem = "-"
            else:
                age = f" ({human_duration(a['metrics_age'])} ago)"
                load, cpu, mem = (v if v == "-" else v + age for v in (load, cpu, mem))
        rows.append([a["job"], a["node"], a["state"], up, load, cpu, mem,
                     a["detail"]])  # a ready agent's note: e.g. it goes through another job's SSH connection
    head = ["JOB", "NODE", "STATE", "UPTIME", "LOAD", "CPU", "MEMORY", "NOTE"]
    # a site service's fleet: which cluster where there are several; whose job, where some are not the
    # user's own (a site admin's list)
    me = getpass.getuser()
    for key, title, shown in (("user", "USER", any(a.get("user", me) != me for a in agents)),
                              ("cluster", "CLUSTER", len({a.get("cluster") for a in agents}) > 1)):
        if shown:
            head.insert(0, title)
            rows = [[a.get(key) or "-", *row] for a, row in zip(agents, rows)]
    print_table(head, rows)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from dxflow.cli import targets
    from dxflow.cli.service import service
    from dxflow.cli.util import human_bytes, human_duration, print_json

    target = targets.parse(args.target)
    client = service().ensure()
    where = targets.resolve(client, target)
    if target.several:
        return _info_nodes(client, where, args.json)
    info = client.json("GET", client.agent_path(where.job, where.nodes[0], "/api/node"))
    if args.json:
        print_json(info)
        return 0
    lines = [
        ("job", f"{info['job']} ({info['scheduler']}, cluster {info['cluster']})"),
        ("node", f"{info['node']} (hostname {info['hostname']})"),
        ("user", info["user"]),
        ("cpus", f"{info['cpus']} ({info['cpus_allowed']} allowed), {info['cpu_percent']}% busy"),
        ("memory", f"{human_bytes(info['memory_available'])} available of {human_bytes(info['memory_total'])}"),
        ("load", " ".join(f"{x:.2f}" for x in info["load"])),
        ("uptime", f"node {human_duration(info['uptime'])}, agent {human_duration(info['agent_uptime'])}"),
    ]
    for g in info.get("gpus", []):
        lines.append((f"gpu{g['index']}", f"{g['name']} {g['utilization']:.0f}% "
                      f"{human_bytes(g['memory_used'])}/{human_bytes(g['memory_total'])}"))
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k:<{width}}  {v}")
    return 0


def _info_nodes(client, where, as_json: bool) -> int:
    """``dxflow info JOB:NODES``: every node asked at once; one row each (a JSON list with --json)."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from dxflow.cli.util import human_bytes, print_json, print_table
    from dxflow.errors import DxflowError
    from dxflow.schedulers.hostlist import fold

    def ask(node: str) -> dict:
        try:
            return client.json("GET", client.agent_path(where.job, node, "/api/node"), timeout=30)
        except (DxflowError, OSError) as e:
            return {"node": node, "error": str(e)}

    with ThreadPoolExecutor(max_workers=max(1, min(32, len(where.nodes)))) as pool:
        infos = list(pool.map(ask, where.nodes))
    infos += [{"node": node, "error": why} for node, why in where.missing]  # nodes of the set without an agent
    failed = [i["node"] for i in infos if "error" in i]
    if as_json:
        print_json(infos)
    else:
        print_table(["NODE", "HOSTNAME", "CPUS", "BUSY", "MEMORY AVAILABLE", "LOAD", "GPUS"], [
            [i["node"], "-", "-", "-", "-", "-", i["error"]] if "error" in i else
            [i["node"], i["hostname"], f"{i['cpus_allowed']}/{i['cpus']}", f"{i['cpu_percent']:.0f}%",
             f"{human_bytes(i['memory_available'])} of {human_bytes(i['memory_total'])}",
             " ".join(f"{x:.2f}" for x in i["load"]), len(i.get("gpus", []))] for i in infos])
    if failed:
        print(f"dxflow: job {where.job}: no answer from {fold(failed)}", file=sys.stderr)
        return 1
    return 0
