"""``dxflow site init|serve|status``: the site service, for the site's admin (docs/site.md)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("site", help="the site service (admins): init, serve, status",
                       description="One service for every user and cluster of a site: users' commands talk to it "
                       "when /etc/dxflow/dxflow.toml sets `site`, and agents dial out to its gateway. Its own config "
                       "is /etc/dxflow/site.toml ($DXFLOW_SITE_SERVICE_CONFIG). See docs/site.md.")
    ssub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = ssub.add_parser("init", help="as root, once: the service's private folder, its keys and TLS "
                           "certificate; publish their public halves (running it again keeps every key)")
    init.add_argument("--name", action="append", default=[], metavar="HOST",
                      help="another host name or address the TLS certificate is for (repeatable)")
    serve = ssub.add_parser("serve", help="run the service in the foreground (as its account, never root)")
    serve.add_argument("--user", metavar="ACCOUNT", help="started as root: become this account first "
                       "(the config's service_user)")
    status = ssub.add_parser("status", help="files, listeners and database of this replica; exit 3 when it does "
                             "not answer")
    status.add_argument("--json", action="store_true", help="print JSON")
    for q in (init, serve, status):
        q.add_argument("--config", type=Path, metavar="PATH",
                       help="the service's config (default $DXFLOW_SITE_SERVICE_CONFIG or /etc/dxflow/site.toml)")
        q.set_defaults(func=cmd_site)


def cmd_site(args: argparse.Namespace) -> int:
    from dxflow.cli.util import print_json
    from dxflow.errors import ConfigError
    from dxflow.site import admin
    from dxflow.site.config import SiteServiceConfig

    config = SiteServiceConfig.load(args.config)
    if args.action == "init":
        report = admin.init(config, args.name)
        for path in report.made:
            print(f"made      {path}")
        for path in report.kept:
            print(f"kept      {path}")
        for path in report.published:
            print(f"published {path}")
        print(f"the service runs as {config.service_user}: dxflow site serve --user {config.service_user}")
        return 0
    if args.action == "serve":
        return admin.serve(config, args.user or None)
    result = admin.status(config)
    if args.json:
        print_json(result)
    else:
        print(f"site replica {result['replica']}: {'running' if result['running'] else 'NOT answering'}")
        for key, up in result["listeners"].items():
            print(f"  {key:15} {getattr(config, key):22} {'answers' if up else 'no answer'}")
        for path, what in result["files"].items():
            print(f"  {path}: {what}")
        print(f"  database: {result['database']}")
        for name, scheduler in result["clusters"].items():
            print(f"  cluster {name}: {scheduler}")
    return 0 if result["running"] else ConfigError.exit_code
