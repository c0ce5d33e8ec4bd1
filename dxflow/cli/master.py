"""``dxflow master start|stop|status``: your master on the login node (started on demand anyway)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("master", help="start, stop or check your master on this login node",
                       description="The master watches your agents' registrations, keeps one SSH "
                       "tunnel per node and relays the CLI's and console's requests. Other commands "
                       "start it when needed. Each login node runs a master of its own (its files in "
                       "~/.dxflow/hosts/HOST): these commands act on this node's only. `status` exits 3 "
                       "when no master runs here.")
    msub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, helptext in (("start", "start it unless running"), ("stop", "stop it"),
                           ("status", "show whether it runs, its tunnels and agents")):
        q = msub.add_parser(name, help=helptext)
        q.add_argument("--json", action="store_true", help="print JSON")
        q.set_defaults(func=cmd_master)


def cmd_master(args: argparse.Namespace) -> int:
    from dxflow.cli.util import print_json
    from dxflow.errors import ConfigError
    from dxflow.master.client import MasterClient

    client = MasterClient()
    host = client.layout.host  # one master per login node: each command names the one it acts on
    result: dict[str, Any]
    if args.action == "start":
        pid = client.start()
        result = {"running": True, "host": host, "pid": pid, "socket": str(client.sock)}
    elif args.action == "stop":
        result = {"running": False, "host": host, "stopped": client.stop()}
    else:
        if not client.running():
            result = {"running": False, "host": host}
        else:
            result = {"running": True, "host": host, **client.json("GET", "/api/master")}
    if args.json:
        print_json(result)
    elif args.action == "start":
        print(f"master running on {host} (pid {result['pid']}), socket {result['socket']}")
    elif args.action == "stop":
        print(f"master stopped on {host}" if result["stopped"] else f"master was not running on {host}")
    elif not result["running"]:
        print(f"master not running on {host} (any dxflow command starts it)")
    else:
        print(f"master running on {host} (pid {result['pid']}, dxflow {result['version']}), "
              f"{result['agents']} agent(s)")
        for address, t in sorted(result["tunnels"].items()):
            state = "connected" if t["connected"] else f"down ({t['error'] or 'not connected'})"
            print(f"  tunnel {address} ({t.get('transport', 'paramiko')}): {state}")
    return 0 if args.action != "status" or result["running"] else ConfigError.exit_code
