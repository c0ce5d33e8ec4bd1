"""The site service in the lab: ``dxflow lab site up|down|status`` (and ``dxflow lab up --site``).

Added to a running lab, and taken out again without touching the rest of it:

- the service account ``dxflow`` (a system user), the admin ``dana`` in the group ``dxadmin``;
- the lab's own PostgreSQL (:mod:`dxflow.lab.postgres`), which both replicas share;
- the second cluster ``pbslab`` (:mod:`dxflow.lab.pbslab`), PBS stand-ins on the lab's nodes;
- ``/etc/dxflow/site.toml`` (replica ``a``) and ``/etc/dxflow/site-b.toml`` (replica ``b``): the same site
  on other ports, ``[clusters.dxlab]`` (the lab's Slurm) and ``[clusters.pbslab]``;
- ``dxflow site init`` (keys, certificate, the published folder ``/etc/dxflow/site``);
- both replicas, each ``dxflow site serve`` as ``dxflow`` in a session of its own (:mod:`dxflow.lab.replicas`);
- ``site_gateways`` and ``site_keys`` in ``/etc/dxflow/dxflow.toml`` (a marked block), so every lab
  agent dials out to both gateways, while every user's CLI keeps its own master;
- ``/etc/dxflow/site-client.toml``: the same keys plus ``site = [both URLs]``, which the site tests
  name with ``DXFLOW_SITE_CONFIG`` to talk to the site instead.

The user APIs listen on the lab bridge's 10.77.0.1 over https (the CLI pins the published tls.pem), the
consoles on the login node's loopback, the gateways on 10.77.0.1, where the nodes reach them.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import fields
from pathlib import Path

from dxflow.lab import blocks, pbslab, postgres, users
from dxflow.lab.layout import Layout
from dxflow.lab.pbslab import NAME as PBS_CLUSTER, PbsLab
from dxflow.lab.replicas import (ADMIN, ADMIN_GROUP, API_HOST, CLIENT_CONFIG, DXFLOW, ETC, GLOBAL_CONFIG, PUBLISH_DIR,
                                 REPLICAS, SERVICE_USER, STATE_DIR, Replica, SiteState, answers, load_state, log_file,
                                 replica, replica_pid, save_state, start_replica, state_file, stop_replica)
from dxflow.lab.runner import LabError, run

#: what the tests, the bench and ``dxflow.cli.lab`` use from here (some of it lives in dxflow.lab.replicas)
__all__ = ["ADMIN", "ADMIN_GROUP", "API_HOST", "CLIENT_CONFIG", "PUBLISH_DIR", "REPLICAS", "SERVICE_USER", "LabError",
           "Replica", "SiteState", "answers", "down", "load_state", "replica", "replica_pid", "start_replica",
           "status", "status_table", "stop_replica", "up"]

log = logging.getLogger(__name__)


# -- users -------------------------------------------------------------------------------------
def ensure_users(state: SiteState) -> None:
    """The service account (system user, no login shell, home = its state folder) and the admin dana."""
    if run(["getent", "group", ADMIN_GROUP], check=False).returncode != 0:
        run(["groupadd", ADMIN_GROUP], what=f"creating the group {ADMIN_GROUP}")
        state.remember("groups_created", ADMIN_GROUP)
    if not users.exists(SERVICE_USER):
        run(["useradd", "--system", "--user-group", "--home-dir", STATE_DIR, "--no-create-home",
             "--shell", "/usr/sbin/nologin", SERVICE_USER], what="creating the service account")
        state.remember("users_created", SERVICE_USER)
    if users.ensure_user(ADMIN):
        state.remember("users_created", ADMIN)
    run(["usermod", "-a", "-G", ADMIN_GROUP, ADMIN], what=f"adding {ADMIN} to {ADMIN_GROUP}")
    users.ensure_ssh_key(ADMIN)


def remove_users(state: SiteState) -> None:
    for name in state.users_created:
        users.remove_user(name)
    for group in state.groups_created:
        run(["groupdel", group], check=False, what=f"removing the group {group}")


# -- config files ------------------------------------------------------------------------------
def _toml_str(value: str) -> str:
    return json.dumps(value)  # a TOML basic string is a JSON string for what the lab writes


def service_toml(layout: Layout, r: Replica, pg: postgres.Postgres, pbs: PbsLab) -> str:
    env = ", ".join(f"{k} = {_toml_str(v)}" for k, v in pbs.env.items())
    return (f"# written by `dxflow lab site up` (replica {r.name}); removed by `dxflow lab site down`\n"
            f"listen = \"{API_HOST}:{r.api}\"\n"
            f"console_listen = \"127.0.0.1:{r.console}\"\n"
            f"gateway_listen = \"{layout.host_addr}:{r.gateway}\"\n"
            f"state_dir = {_toml_str(str(STATE_DIR))}\n"
            f"publish_dir = {_toml_str(str(PUBLISH_DIR))}\n"
            f"database = {_toml_str(pg.url)}\n"
            f"replica = \"{r.name}\"\n"
            f"admin_group = \"{ADMIN_GROUP}\"\n"
            f"service_user = \"{SERVICE_USER}\"\n\n"
            f"[clusters.{layout.cluster_name}]\nscheduler = \"slurm\"\n\n"
            f"[clusters.{PBS_CLUSTER}]\nscheduler = \"pbs\"\nscheduler_bin = {_toml_str(str(pbs.bin))}\n"
            f"env = {{ {env} }}\n")


def global_lines(layout: Layout) -> list[str]:
    """The keys every lab agent, hook and CLI reads from /etc/dxflow/dxflow.toml."""
    gateways = ", ".join(f"\"{layout.host_addr}:{r.gateway}\"" for r in REPLICAS)
    return [f"site_gateways = [{gateways}]", f"site_keys = {_toml_str(str(PUBLISH_DIR))}"]


def client_text(layout: Layout) -> str:
    """/etc/dxflow/site-client.toml: the lab's global keys plus ``site``. Made from the keys, not copied from
    dxflow.toml, which a test may be rewriting at that very moment (tests/lab/test_fleet.py breaks it on purpose)."""
    urls = ", ".join(f"\"{r.url}\"" for r in REPLICAS)
    known = _known_site_keys()
    lines = [line for line in global_lines(layout) if line.split(" ")[0] in known]
    return (f"# written by `dxflow lab site up`: DXFLOW_SITE_CONFIG={CLIENT_CONFIG} makes a command use the site\n"
            f"site = [{urls}]\n" + "".join(f"{line}\n" for line in lines))


def _set_top_block(path: Path, lines: list[str]) -> bool:
    """The lab block at the top of ``path`` (top-level TOML keys must precede any table)."""
    old = path.read_text() if path.exists() else ""
    rest = blocks.without_block(old)
    if "[dxflow]" in rest:
        raise LabError(f"{path} keeps its keys in a [dxflow] table: add {', '.join(lines)} there by hand")
    new = f"{blocks.BEGIN}\n" + "".join(f"{line}\n" for line in lines) + f"{blocks.END}\n" + rest
    if new == old:
        return False
    blocks._rewrite(path, new)
    return True


def _known_site_keys() -> list[str]:
    """Which of the agents' site keys this dxflow's SiteConfig knows (an unknown key breaks every load)."""
    from dxflow.config import SiteConfig

    names = {f.name for f in fields(SiteConfig)}
    return [k for k in ("site_gateways", "site_keys") if k in names]


def write_service_files(layout: Layout, state: SiteState, pg: postgres.Postgres, pbs: PbsLab) -> None:
    """Each replica's site.toml."""
    ETC.mkdir(mode=0o755, parents=True, exist_ok=True)
    for r in REPLICAS:
        r.config.write_text(service_toml(layout, r, pg, pbs))
        r.config.chmod(0o644)  # no secret in it: the database is reached by peer authentication
        state.remember("files_written", str(r.config))


def write_client_files(layout: Layout, state: SiteState) -> None:
    """The keys agents and the CLI read: written once the replicas answer, so that no agent dials a
    gateway that is not there yet."""
    known = _known_site_keys()
    if known:
        if not GLOBAL_CONFIG.exists() or not blocks.without_block(GLOBAL_CONFIG.read_text()).strip():
            state.global_created = True  # nothing of anyone else's in it: `down` removes the file
        lines = [line for line in global_lines(layout) if line.split(" ")[0] in known]
        _set_top_block(GLOBAL_CONFIG, lines)
    else:
        log.warning("this dxflow has no site_gateways setting yet: the lab's agents will not dial out")
    CLIENT_CONFIG.write_text(client_text(layout))
    CLIENT_CONFIG.chmod(0o644)
    state.remember("files_written", str(CLIENT_CONFIG))


def remove_files(state: SiteState) -> None:
    for name in state.files_written:
        Path(name).unlink(missing_ok=True)
    blocks.drop_block(GLOBAL_CONFIG)
    if state.global_created and GLOBAL_CONFIG.exists() and not GLOBAL_CONFIG.read_text().strip():
        GLOBAL_CONFIG.unlink()


# -- up, down, status ----------------------------------------------------------------------------
def _drop_certificate_without(address: str) -> None:
    """Remove the site's TLS certificate and key when the certificate does not name ``address``, so that
    ``dxflow site init`` makes them again (it keeps what exists)."""
    import ipaddress

    from cryptography import x509

    published = PUBLISH_DIR / "tls.pem"
    try:
        cert = x509.load_pem_x509_certificate(published.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if ipaddress.ip_address(address) in names.get_values_for_type(x509.IPAddress):
            return
    except (OSError, ValueError, x509.ExtensionNotFound):
        if not published.exists():
            return
    log.info("the site's certificate does not name %s: making a new one", address)
    for path in (STATE_DIR / "tls.pem", STATE_DIR / "tls.key", published):
        path.unlink(missing_ok=True)


def check_prerequisites(layout: Layout) -> None:
    """What the site needs beyond the lab, installed when missing: Debian's PostgreSQL server and psycopg
    (the `site` extra) in the lab's venv; and a dxflow with the site service."""
    import importlib.util

    from dxflow.lab import packages

    missing = packages.missing_packages(("postgresql",))
    if missing:
        log.info("installing %s", " ".join(missing))
        run(["apt-get", "update"], env=packages.APT_ENV, timeout=900, what="apt-get update")
        run(["apt-get", "install", "-y", *missing], env=packages.APT_ENV, timeout=1800, what="installing PostgreSQL")
    postgres.bindir()
    if importlib.util.find_spec("psycopg") is None:  # the store's PostgreSQL driver
        log.info("installing psycopg (dxflow's `site` extra) into %s", layout.venv)
        run([layout.venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "psycopg[binary]>=3.1"], what="installing psycopg", timeout=900)
        importlib.invalidate_caches()
    if importlib.util.find_spec("dxflow.site") is None:
        raise LabError("this dxflow has no site service (dxflow.site)")


def up(layout: Layout | None = None) -> dict:
    """Add the site to the running lab, or bring it back to what it should be. Returns ``status()``."""
    from dxflow.lab.cluster import require_root
    from dxflow.lab.state import load

    layout = layout or Layout()
    require_root()
    if load(layout.state_file) is None:
        raise LabError("there is no lab here: `dxflow lab up` first (or `dxflow lab up --site`)")
    check_prerequisites(layout)
    state = load_state(layout) or SiteState()
    save_state(layout, state)
    ensure_users(state)
    save_state(layout, state)
    pg = postgres.Postgres(layout)
    postgres.up(pg)
    pbs = PbsLab(layout)
    pbslab.up(pbs)
    write_service_files(layout, state, pg, pbs)
    save_state(layout, state)
    for d in (STATE_DIR, PUBLISH_DIR):
        if not d.exists():
            state.remember("dirs_created", str(d))
    save_state(layout, state)
    # the certificate names the API's address (the CLI pins the certificate itself, whatever it names; a
    # browser or urllib given tls.pem as its CA also checks the name): one made for other names is made again
    _drop_certificate_without(API_HOST)
    run([DXFLOW, "site", "init", "--config", REPLICAS[0].config, "--name", API_HOST, "--name", layout.login_name],
        what="dxflow site init", timeout=120)
    for r in REPLICAS:
        start_replica(layout, state, r)
    write_client_files(layout, state)
    save_state(layout, state)
    log.info("the site is up: %s", ", ".join(r.url for r in REPLICAS))
    return status(layout)


def down(layout: Layout | None = None) -> None:
    """Undo what ``up`` made; a lab without a site is fine. Called by ``lab down`` too."""
    layout = layout or Layout()
    state = load_state(layout)
    if state is None:
        return
    for r in REPLICAS:
        stop_replica(layout, state, r)
    pbslab.down(PbsLab(layout))
    postgres.down(postgres.Postgres(layout))
    remove_files(state)
    remove_users(state)
    for name in sorted(state.dirs_created, key=len, reverse=True):
        shutil.rmtree(name, ignore_errors=True)
    state_file(layout).unlink(missing_ok=True)
    (layout.root / "site.lock").unlink(missing_ok=True)
    log.info("the site is down")


def status(layout: Layout | None = None) -> dict:
    layout = layout or Layout()
    state = load_state(layout)
    if state is None:
        return {"state": "down", "replicas": []}
    pg = postgres.Postgres(layout)
    rows = [{"name": r.name, "url": r.url, "gateway": f"{layout.host_addr}:{r.gateway}",
             "console": f"127.0.0.1:{r.console}", "config": str(r.config), "pid": replica_pid(state, r),
             "answers": answers(r.api), "log": str(log_file(layout, r))} for r in REPLICAS]
    pg_pid = postgres.pid(pg)
    ok = pg_pid is not None and all(row["pid"] and row["answers"] for row in rows)
    return {"state": "up" if ok else "degraded", "replicas": rows, "postgres": postgres.status(pg),
            "clusters": [layout.cluster_name, PBS_CLUSTER], "service_user": SERVICE_USER,
            "admin": {"user": ADMIN, "group": ADMIN_GROUP}, "client_config": str(CLIENT_CONFIG),
            "users_created": state.users_created}


def status_table(info: dict) -> str:
    lines = [f"site: {info['state']}"]
    if info.get("postgres"):
        lines.append(f"  postgres   {'running' if info['postgres']['pid'] else 'stopped'}  {info['postgres']['url']}")
    for r in info["replicas"]:
        lines.append(f"  replica {r['name']}  {'running' if r['pid'] else 'stopped':8} {r['url']}  "
                     f"gateway {r['gateway']}  {'answers' if r['answers'] else 'silent'}")
    if info.get("clusters"):
        lines.append(f"  clusters: {', '.join(info['clusters'])}; admin {info['admin']['user']} "
                     f"({info['admin']['group']}); CLI: DXFLOW_SITE_CONFIG={info['client_config']}")
    return "\n".join(lines)
