"""The files ``dxflow lab site up`` writes are what the site service and the CLI read (dxflow/lab/site.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from dxflow.config import SiteConfig
from dxflow.lab import blocks, postgres, site
from dxflow.lab.layout import Layout
from dxflow.lab.pbslab import PbsLab
from dxflow.site.config import SiteServiceConfig


def test_each_replicas_config_is_a_valid_site_config_with_both_clusters(tmp_path):
    layout = Layout(root=tmp_path / "lab", runtime=tmp_path / "run")
    pg, pbs = postgres.Postgres(layout), PbsLab(layout)
    seen = set()
    for r in site.REPLICAS:
        path = tmp_path / f"{r.name}.toml"
        path.write_text(site.service_toml(layout, r, pg, pbs))
        cfg = SiteServiceConfig.load(path)
        assert cfg.listen == f"{layout.host_addr}:{r.api}" and cfg.gateway_listen == f"{layout.host_addr}:{r.gateway}"
        assert cfg.console_listen == f"127.0.0.1:{r.console}"
        assert r.url == f"https://{cfg.listen}"  # not on loopback: https, the published certificate pinned
        assert cfg.database == pg.url and cfg.replica == r.name and cfg.admin_group == site.ADMIN_GROUP
        assert set(cfg.clusters) == {"dxlab", "pbslab"}
        assert cfg.clusters["pbslab"].scheduler == "pbs"
        assert cfg.clusters["pbslab"].scheduler_bin == str(pbs.bin)
        assert cfg.clusters["pbslab"].env == {"PBS_CONF_FILE": str(pbs.conf)}
        seen |= {cfg.listen, cfg.console_listen, cfg.gateway_listen}
    assert len(seen) == 3 * len(site.REPLICAS), "two replicas on one host need ports of their own"


def test_the_client_config_names_every_replica_and_the_agents_keys(tmp_path):
    path = tmp_path / "client.toml"
    path.write_text(site.client_text(Layout()))
    cfg = SiteConfig.load(path)
    assert cfg.site == [r.url for r in site.REPLICAS]
    assert cfg.site_gateways == [f"10.77.0.1:{r.gateway}" for r in site.REPLICAS]
    assert cfg.site_keys == str(site.PUBLISH_DIR)


def test_the_global_block_goes_before_a_sites_own_tables_and_comes_out_whole(tmp_path):
    path = tmp_path / "dxflow.toml"
    mine = 'scheduler_bin = "/opt/slurm/bin"\n\n[some_table]\nkey = 1\n'
    path.write_text(mine)
    site._set_top_block(path, site.global_lines(Layout()))
    data = tomllib.loads(path.read_text())
    assert data["site_gateways"] and data["site_keys"] and "site_gateways" not in data["some_table"]
    assert blocks.drop_block(path) and path.read_text() == mine


def test_a_dxflow_table_is_refused_rather_than_shadowed(tmp_path):
    path = tmp_path / "dxflow.toml"
    path.write_text('[dxflow]\nscheduler_bin = "/x"\n')
    with pytest.raises(site.LabError, match=r"\[dxflow\] table"):
        site._set_top_block(path, site.global_lines(Layout()))
    assert path.read_text() == '[dxflow]\nscheduler_bin = "/x"\n'


def test_the_postgres_url_reaches_the_socket_folder_only():
    pg = postgres.Postgres(Layout(runtime=Path("/run/x")))
    assert pg.url == f"postgresql:///dxflow?host=/run/x/postgres&port={postgres.PORT}"
