"""``dxflow console``: a one-time login link to your master's web console, and how to reach it from a laptop."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("console", help="open the web console: print a one-time login link",
                       description="Start your master (unless it runs) with its web console on "
                       "~/.dxflow/hosts/HOST/console.sock and 127.0.0.1, and print a login link that works once, within 5 "
                       "minutes, plus the `ssh -L` lines that reach it from your laptop (the socket, which only "
                       "you can use, or the TCP port, where other users' connections are refused). They name "
                       "this login node (HOST), where your master runs: on a cluster with several login nodes "
                       "behind one name, each has a master and a console of its own. The console shows your jobs' "
                       "nodes, their metrics, files, logs, a terminal and the web services they run.")
    p.add_argument("--port", type=int, metavar="P",
                   help="TCP port for the console when the master starts (default: the one used last "
                   "time, else a free one)")
    p.add_argument("--agent", metavar="JOB[:NODE]",
                   help="instead, a link to the console of one agent running on this host "
                   "(`dxflow agent` on a workstation or in a container)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_console)


def cmd_console(args: argparse.Namespace) -> int:
    from dxflow.cli.util import print_json

    result = agent_link(args.agent) if args.agent else master_link(args.port)
    if args.json:
        print_json(result)
        return 0
    if args.agent:
        print(f"Console of {result['job']} on {result['node']} (one-time link, valid "
              f"{result['valid_seconds'] // 60} minutes):\n\n  {result['url']}\n")
        return 0
    minutes = max(1, round(result["valid_seconds"] / 60))
    print(f"Web console (the link works once, within {minutes} minutes):\n\n  {result['url']}\n")
    if result.get("site"):
        print(f"From your laptop, forward the site console's port first:\n\n  {result['ssh']}\n")
        print("then open the link there. Run `dxflow console` again for a new link.")
        return 0
    print(f"From your laptop, forward the console's socket first (only you can use it):\n\n  {result['ssh']}\n")
    print(f"or its TCP port (other users of this login node are refused there too):\n\n  {result['ssh_tcp']}\n")
    print("then open the link there. Run `dxflow console` again for a new link.")
    return 0


def master_link(port: int | None) -> dict:
    import getpass
    import json
    import time

    from dxflow.cli.service import service
    from dxflow.errors import UsageError
    from dxflow.master.client import MasterClient, check

    client = service()
    if not isinstance(client, MasterClient):
        return site_link(client, port)
    if not client.running():
        client.start(console_port=port)
    resp = client.request("POST", "/api/console/token", b"", timeout=30)
    raw = resp.read()
    if resp.status == 404:
        raise UsageError("the running master has no web console (an older dxflow): restart it with "
                         "`dxflow master stop`, then run `dxflow console` again")
    check(resp, raw)
    data = json.loads(raw)
    if port is not None and data["port"] != port:
        raise UsageError(f"your master's console listens on port {data['port']}, not {port}: stop the "
                         f"master (`dxflow master stop`), then run `dxflow console --port {port}`")
    host = login_host(data.get("host") or client.layout.host)
    p = data["port"]
    where = f"{getpass.getuser()}@{host}"
    sock = data.get("socket") or str(client.layout.console_sock)
    return {"url": data["url"], "port": p, "token": data["token"], "expires": data["expires"],
            "valid_seconds": max(0, int(data["expires"] - time.time())), "login_host": host, "socket": sock,
            "ssh": f"ssh -N -L {p}:{sock} {where}", "ssh_tcp": f"ssh -N -L {p}:127.0.0.1:{p} {where}"}


def site_link(client, port: int | None) -> dict:
    """The site service's console (``site`` set in dxflow.toml): a one-time link for this user, proven by
    MUNGE; the console listens where the site admin put it, on the host of the replica that answered."""
    import getpass
    import time

    from dxflow.errors import UsageError

    if port is not None:
        raise UsageError("--port: the site service's console listens on the port the site admin chose; "
                         "leave --port out")
    data = client.json("POST", "/api/console/token", {}, timeout=30)
    host = login_host(data.get("host"))
    listen_host = str(data.get("listen") or "127.0.0.1:0").rpartition(":")[0].strip("[]")  # HOST:PORT, [V6]:PORT
    p = data["port"]
    return {"url": data["url"], "port": p, "token": data["token"], "expires": data["expires"],
            "valid_seconds": max(0, int(data["expires"] - time.time())), "login_host": host, "socket": None,
            "site": True, "ssh": f"ssh -N -L {p}:{listen_host}:{p} {getpass.getuser()}@{host}"}


def login_host(host: str | None = None) -> str:
    """The name a laptop reaches the login node ``host`` (default: this one, where the master runs)
    by: its FQDN when the resolver knows one that starts with it, else ``host`` itself — never the
    cluster's shared alias, which may land on another login node."""
    import socket

    from dxflow.layout import this_host

    host = host or this_host()
    fqdn = socket.getfqdn(host)
    return fqdn if fqdn.split(".")[0] == host.split(".")[0] and not fqdn.startswith("localhost") else host


def agent_link(target: str) -> dict:
    import time

    from dxflow import registration
    from dxflow.auth import LOGIN_TOKEN_LIFETIME, fingerprint, mint_login_token, user_key
    from dxflow.cli.util import parse_target
    from dxflow.errors import NotFound
    from dxflow.layout import UserLayout

    job, node = parse_target(target)
    layout = UserLayout.of().ensure_shared()
    regs = [r for r in registration.read_all(layout.fleet_dir) if r.job == job and (node is None or r.node == node)]
    if not regs:
        raise NotFound(f"no agent of {target} is registered in {layout.fleet_dir}: is `dxflow agent` running?")
    reg = sorted(regs, key=lambda r: r.node)[0]
    lifetime = LOGIN_TOKEN_LIFETIME
    # a login token: the link may linger in a terminal or a browser's history, and opens no API
    token = mint_login_token(user_key(layout.base), reg.user, fingerprint(reg.public_key), lifetime=lifetime)
    return {"job": reg.job, "node": reg.node, "port": reg.port, "expires": time.time() + lifetime,
            "valid_seconds": lifetime, "url": f"http://127.0.0.1:{reg.port}/console/login?token={token}"}
