"""``dxflow master start|stop|status``: your master on the login node (started on demand anyway)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("master", help="start, stop or check your master on this login node",
                       description="The master watches your agents' registrations, keeps one SSH "
                       "tunnel per node and relays the CLI's and console's requests. Other commands "
                       "start it when needed.")
    msub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, helptext in (("start", "start it unless running"), ("stop", "stop it"),
                           ("status", "show whether it runs, its tunnels and agents")):
        q = msub.add_parser(name, help=helptext)
        q.add_argument("--json", action="store_true", help="print JSON")
        q.set_defaults(func=cmd_master)


def cmd_master(args: argparse.Namespace) -> int:
    from dxflow.cli.util import print_json
    from dxflow.master.client import MasterClient

    client = MasterClient()
    if args.action == "start":
        pid = client.start()
        result = {"running": True, "pid": pid, "socket": str(client.sock)}
    elif args.action == "stop":
        result = {"running": False, "stopped": client.stop()}
    else:
        if not client.running():
            result = {"running": False}
        else:
            result = {"running": True, **client.json("GET", "/api/master")}
    if args.json:
        print_json(result)
    elif args.action == "start":
        print(f"master running (pid {result['pid']}), socket {result['socket']}")
    elif args.action == "stop":
        print("master stopped" if result["stopped"] else "master was not running")
    elif not result["running"]:
        print("master not running (any dxflow command starts it)")
    else:
        print(f"master running (pid {result['pid']}, dxflow {result['version']}), {result['agents']} agent(s)")
        for address, t in sorted(result["tunnels"].items()):
            state = "connected" if t["connected"] else f"down ({t['error'] or 'not connected'})"
            print(f"  tunnel {address}: {state}")
    return 0 if args.action != "status" or result["running"] else 3
