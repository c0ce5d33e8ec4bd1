"""``dxflow doctor``: what this host's dxflow would use, and why — for site admins and bug reports.

Per scheduler (dxflow's own, then a site's from the ``dxflow.schedulers`` entry points): its
adapter, the backend it talks through (pyslurm or Slurm's JSON, qstat's JSON or XML, bjobs' JSON)
and why, and where its client commands are. Then the site configuration,
the hooks' runtime folder and their log.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from typing import Any

#: Lines of the hook log shown (the newest).
LOG_TAIL = 5


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check this host's dxflow setup (schedulers, site config, hooks)",
                       description="Report, for each scheduler dxflow knows, the adapter, the backend it "
                       "uses and why, and where its client commands are; then the site config "
                       "(path and validity), the hooks' runtime folder and the hook log. Exits 1 "
                       "when something needs fixing.")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_doctor)


def scheduler_report(name: str, target: str) -> dict[str, Any]:
    from dxflow.schedulers import get_scheduler

    out: dict[str, Any] = {"scheduler": name, "adapter": target}
    try:
        sched = get_scheduler(name)
        out["backend"] = sched.backend()
        out["why"] = sched.backend_why()
        out["commands"] = {c: (p if os.path.isabs(p := sched.command(c)) else None) for c in sched.commands}
    except Exception as e:  # noqa: BLE001 - report every adapter, even a broken one
        out.update(backend=None, why=f"{type(e).__name__}: {e}", commands={})
        out["error"] = True
    out["client_found"] = any(out["commands"].values())
    return out


def site_report() -> tuple[dict[str, Any], list[str]]:
    from dxflow.config import SITE_CONFIG, SiteConfig
    from dxflow.errors import ConfigError

    problems: list[str] = []
    config: dict[str, Any] = {"path": str(SITE_CONFIG), "exists": SITE_CONFIG.exists(), "valid": True, "error": ""}
    try:
        site = SiteConfig.load()
    except ConfigError as e:
        config.update(valid=False, error=str(e))
        problems.append(str(e))
        site = SiteConfig()
    if site.scheduler_bin and not os.path.isdir(site.scheduler_bin):
        problems.append(f"scheduler_bin {site.scheduler_bin} (site config) is not a folder")
    config["audit_socket"] = {"path": site.audit_socket, "exists": os.path.exists(site.audit_socket),
                              "facility": site.audit_facility}  # no syslog daemon: no audit trail, acts go on
    runtime: dict[str, Any] = {"path": site.runtime_dir, "exists": False}
    try:
        st = os.lstat(site.runtime_dir)
        runtime.update(exists=True, owner_uid=st.st_uid, mode=oct(stat.S_IMODE(st.st_mode)),
                       entries=len(os.listdir(site.runtime_dir)) if os.access(site.runtime_dir, os.R_OK) else None)
        if st.st_uid != 0 or stat.S_IMODE(st.st_mode) & 0o022 or not stat.S_ISDIR(st.st_mode):
            problems.append(f"{site.runtime_dir} must be a folder owned by root, writable by root only")
    except FileNotFoundError:
        runtime["note"] = "created by the first prolog"
    hook_log: dict[str, Any] = {"path": site.hook_log, "exists": os.path.exists(site.hook_log), "tail": []}
    if hook_log["exists"]:
        hook_log["size"] = os.path.getsize(site.hook_log)
        try:
            with open(site.hook_log, "rb") as f:
                f.seek(max(0, hook_log["size"] - 8192))
                lines = f.read().decode(errors="replace").splitlines()
            hook_log["tail"] = lines[-LOG_TAIL:]
        except OSError as e:
            hook_log["tail_error"] = str(e)
    return {"site_config": config, "runtime_dir": runtime, "hook_log": hook_log}, problems


def report() -> dict[str, Any]:
    from dxflow import __version__
    from dxflow.schedulers import adapters

    schedulers = [scheduler_report(name, target) for name, target in adapters().items()]
    site, problems = site_report()
    problems += [f"scheduler {s['scheduler']}: {s['why']}" for s in schedulers if s.get("error")]
    return {"version": __version__, "python": sys.executable, "schedulers": schedulers, **site,
            "problems": problems}


def cmd_doctor(args: argparse.Namespace) -> int:
    from dxflow.cli.util import print_json, print_table

    data = report()
    if args.json:
        print_json(data)
        return 1 if data["problems"] else 0
    print(f"dxflow {data['version']} ({data['python']})\n")
    rows = []
    for s in data["schedulers"]:
        found = [f"{c}={p}" for c, p in s["commands"].items() if p]
        missing = [c for c, p in s["commands"].items() if not p]
        client = " ".join(found + ([f"(not found: {' '.join(missing)})"] if missing else [])) or "-"
        rows.append([s["scheduler"], s["adapter"], s["backend"] or "-", client])
    print_table(["SCHEDULER", "ADAPTER", "BACKEND", "CLIENT COMMANDS"], rows)
    for s in data["schedulers"]:
        if s["why"]:
            print(f"  {s['scheduler']}: {s['why']}")
    conf, run_dir, log_ = data["site_config"], data["runtime_dir"], data["hook_log"]
    print()
    state = ("invalid: " + conf["error"]) if not conf["valid"] else ("valid" if conf["exists"] else
                                                                      "not found (defaults apply)")
    print(f"site config  {conf['path']}: {state}")
    if run_dir["exists"]:
        print(f"runtime dir  {run_dir['path']}: owner uid {run_dir['owner_uid']}, mode {run_dir['mode']}, "
              f"{run_dir['entries'] if run_dir['entries'] is not None else '?'} record(s)")
    else:
        print(f"runtime dir  {run_dir['path']}: missing ({run_dir.get('note', '')})")
    if log_["exists"]:
        print(f"hook log     {log_['path']}: {log_['size']} bytes" + (", newest lines:" if log_["tail"] else ""))
        for line in log_["tail"]:
            print(f"  {line}")
    else:
        print(f"hook log     {log_['path']}: none yet (written by the first prolog/epilog)")
    if data["problems"]:
        print("\nto fix:")
        for p in data["problems"]:
            print(f"  - {p}")
        return 1
    return 0
