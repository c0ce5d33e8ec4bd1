"""``python -m dxflow.agent``: how the prolog starts an agent (as the job's user)."""

from __future__ import annotations

import argparse

from dxflow.agent.server import serve


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m dxflow.agent")
    p.add_argument("--scheduler", required=True)
    p.add_argument("--cluster", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--work-dir", default="")
    p.add_argument("--stdout", default="")
    p.add_argument("--stderr", default="")
    p.add_argument("--bind", default="127.0.0.1:0")
    p.add_argument("--foreground", action="store_true", help="log to the terminal instead of ~/.dxflow/logs")
    a = p.parse_args()
    return serve(a.scheduler, a.cluster, a.job, a.node, work_dir=a.work_dir, stdout=a.stdout,
                 stderr=a.stderr, bind=a.bind, foreground=a.foreground)


if __name__ == "__main__":
    raise SystemExit(main())
