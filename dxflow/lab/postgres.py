"""The lab's own PostgreSQL cluster, for the site service's replicas (``dxflow lab site up``).

Debian's ``postgresql`` package, but not its ``main`` cluster: ``initdb`` as the ``postgres``
user into the lab's state folder, a server that listens on a Unix socket in the lab's runtime
folder only (``listen_addresses = ''``: no TCP at all), and peer authentication, so the service
account ``dxflow`` logs in as the role ``dxflow`` with no password anywhere. ``lab down`` (or
``lab site down``) stops it and its files go with the lab's folders.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
from dataclasses import dataclass
from pathlib import Path

from dxflow.lab import procs
from dxflow.lab.layout import Layout
from dxflow.lab.runner import LabError, run

log = logging.getLogger(__name__)

#: Not Debian's 5432: the socket is in a folder of its own anyway, but a distinct number keeps
#: ``psql`` from ever reaching the machine's ``main`` cluster by mistake.
PORT = 5439
SUPERUSER = "postgres"


@dataclass(frozen=True)
class Postgres:
    """Where the lab's PostgreSQL lives, and the database the site service uses."""

    layout: Layout
    role: str = "dxflow"
    database: str = "dxflow"

    @property
    def data_dir(self) -> Path:
        return self.layout.root / "postgres"

    @property
    def socket_dir(self) -> Path:
        return self.layout.runtime / "postgres"

    @property
    def log_file(self) -> Path:
        return self.layout.log_dir / "postgres.log"

    @property
    def pidfile(self) -> Path:
        return self.data_dir / "postmaster.pid"

    @property
    def url(self) -> str:
        """The libpq URL of the site's database: the socket folder as ``host``, peer authentication."""
        return f"postgresql:///{self.database}?host={self.socket_dir}&port={PORT}"


def bindir() -> Path:
    """The newest installed server's programs (``/usr/lib/postgresql/15/bin``)."""
    base = Path("/usr/lib/postgresql")
    found = sorted((p for p in base.glob("*/bin") if (p / "initdb").exists()),
                   key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if not found:
        raise LabError("PostgreSQL's server is not installed; apt-get install postgresql")
    return found[-1]


def pid(pg: Postgres) -> int | None:
    """The running postmaster's pid (first line of postmaster.pid), or None."""
    try:
        first = pg.pidfile.read_text().split("\n", 1)[0].strip()
    except OSError:
        return None
    if first.isdigit() and procs.running_program(int(first), "postgres"):
        return int(first)
    return None


def up(pg: Postgres) -> int:
    """initdb once, start the server, make the role and database. Idempotent. Returns the pid."""
    try:
        owner = pwd.getpwnam(SUPERUSER)
    except KeyError as e:
        raise LabError("there is no `postgres` user; apt-get install postgresql") from e
    programs = bindir()
    pg.layout.log_dir.mkdir(parents=True, exist_ok=True)
    for folder, mode in ((pg.socket_dir, 0o755), (pg.data_dir, 0o700)):
        folder.mkdir(mode=mode, parents=True, exist_ok=True)
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        os.chmod(folder, mode)
    as_pg = ["runuser", "-u", SUPERUSER, "--"]
    if not (pg.data_dir / "PG_VERSION").exists():
        log.info("creating the lab's PostgreSQL cluster in %s", pg.data_dir)
        # peer for the socket, nothing for TCP: who connects is the Unix user, checked by the kernel
        run([*as_pg, programs / "initdb", "-D", pg.data_dir, "-U", SUPERUSER, "--auth-local=peer",
             "--auth-host=reject", "-E", "UTF8", "--locale=C.UTF-8"], what="initdb of the lab's PostgreSQL",
            timeout=180)
        with open(pg.data_dir / "postgresql.auto.conf", "a") as f:
            f.write(f"listen_addresses = ''\nunix_socket_directories = '{pg.socket_dir}'\nport = {PORT}\n"
                    # small: the lab machine is shared by every test
                    "shared_buffers = '32MB'\nmax_connections = 200\n")
    running = pid(pg)
    if running is None:
        log.info("starting the lab's PostgreSQL (socket %s)", pg.socket_dir)
        touch_log = pg.log_file
        touch_log.touch()
        os.chown(touch_log, owner.pw_uid, owner.pw_gid)
        run([*as_pg, programs / "pg_ctl", "-D", pg.data_dir, "-l", pg.log_file, "-w", "-t", "60", "start"],
            what="starting the lab's PostgreSQL", timeout=90)
        running = pid(pg)
        if running is None:
            raise LabError(f"PostgreSQL did not start; see {pg.log_file}")
    ensure_role(pg)
    ensure_role(test_database(pg))
    return running


def test_database(pg: Postgres) -> Postgres:
    """A throwaway database of root's for the store's own tests (tests/unit/test_site_store.py runs them on
    PostgreSQL when ``DXFLOW_TEST_PG`` is this URL; scripts/test.sh sets it): never the site's."""
    return Postgres(pg.layout, role="root", database="dxflow_test")


def psql(pg: Postgres, sql: str, *, user: str = SUPERUSER, database: str = "postgres") -> str:
    """Run one statement through the socket as ``user`` (peer authentication); its output, unaligned."""
    programs = bindir()
    proc = run(["runuser", "-u", user, "--", programs / "psql", "-X", "-q", "-A", "-t",
                "-v", "ON_ERROR_STOP=1", "-h", pg.socket_dir, "-p", str(PORT), "-d", database, "-c", sql],
               what=f"psql as {user}", timeout=60)
    return proc.stdout.strip()


def ensure_role(pg: Postgres) -> None:
    """The site service's role (no password, no superuser) and its own database."""
    if psql(pg, f"SELECT 1 FROM pg_roles WHERE rolname = '{pg.role}'") != "1":
        psql(pg, f'CREATE ROLE "{pg.role}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE')
    if psql(pg, f"SELECT 1 FROM pg_database WHERE datname = '{pg.database}'") != "1":
        psql(pg, f'CREATE DATABASE "{pg.database}" OWNER "{pg.role}"')


def down(pg: Postgres) -> None:
    """Stop the server (fast: open connections are closed) and remove its files."""
    running = pid(pg)
    if running is not None:
        log.info("stopping the lab's PostgreSQL")
        proc = run(["runuser", "-u", SUPERUSER, "--", bindir() / "pg_ctl", "-D", pg.data_dir, "-m", "fast",
                    "-w", "-t", "30", "stop"], check=False, what="stopping the lab's PostgreSQL", timeout=60)
        if proc.returncode != 0:
            procs.terminate([running], what="postgres")
    shutil.rmtree(pg.data_dir, ignore_errors=True)
    shutil.rmtree(pg.socket_dir, ignore_errors=True)


def status(pg: Postgres) -> dict:
    return {"pid": pid(pg), "socket": str(pg.socket_dir), "url": pg.url}
