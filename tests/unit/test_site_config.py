"""The site service's config (/etc/dxflow/site.toml): what it accepts, and the clear refusal of what it does not."""

from __future__ import annotations

import os

import pytest

from dxflow.errors import ConfigError
from dxflow.site.config import ClusterConfig, SiteServiceConfig, host_port, site_service_keys, site_service_table

FULL = """
listen = "10.0.0.1:8470"
console_listen = "127.0.0.1:8472"
gateway_listen = "[::]:8471"
state_dir = "/srv/dxflow-site"
publish_dir = "/etc/dxflow/site"
database = "postgresql:///dxflow?host=/run/postgresql"
replica = "login1"
admin_group = "hpcadmin"
admins_may_act = true

[clusters.c1]
scheduler = "slurm"
env = { SLURM_CONF = "/etc/slurm-c1/slurm.conf" }

[clusters.pbs2]
scheduler = "pbs"
scheduler_bin = "/opt/pbs/bin"
"""


def write(tmp_path, text: str):
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


def test_a_missing_file_is_the_defaults(tmp_path):
    cfg = SiteServiceConfig.load(tmp_path / "absent.toml")
    assert cfg == SiteServiceConfig()
    assert cfg.database_url == "/var/lib/dxflow-site/site.db"
    assert cfg.listen == "127.0.0.1:8470" and cfg.clusters == {}


def test_every_key_is_read(tmp_path):
    cfg = SiteServiceConfig.load(write(tmp_path, FULL))
    assert cfg.listen == "10.0.0.1:8470" and cfg.replica_name == "login1" and cfg.admins_may_act is True
    assert cfg.database_url.startswith("postgresql://")
    assert cfg.token_key == cfg.state / "token_key.pem" and str(cfg.state) == "/srv/dxflow-site"
    assert cfg.clusters["c1"] == ClusterConfig(name="c1", scheduler="slurm",
                                               env={"SLURM_CONF": "/etc/slurm-c1/slurm.conf"})
    assert cfg.clusters["pbs2"].scheduler == "pbs" and cfg.clusters["pbs2"].scheduler_bin == "/opt/pbs/bin"
    assert cfg.cluster("c1").name == "c1"


def test_the_environment_variable_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DXFLOW_SITE_SERVICE_CONFIG", str(write(tmp_path, 'replica = "from-env"\n')))
    assert SiteServiceConfig.load().replica == "from-env"


@pytest.mark.parametrize("text, says", [
    ('lisen = "127.0.0.1:1"\n', "unknown key(s) lisen"),
    ('listen = "127.0.0.1"\n', "expected HOST:PORT"),
    ('listen = "127.0.0.1:70000"\n', "not in 1..65535"),
    ('gateway_listen = "[zz::1]:8471"\n', "gateway_listen"),
    ("listen = 8470\n", "listen must be str"),
    ('state_dir = "relative/dir"\n', "must be an absolute path"),
    ('database = "mysql://x"\n', "postgresql:// URL"),
    ('admins_may_act = "yes"\n', "admins_may_act must be bool"),
    ('admin_group = "a b"\n', "admin_group"),
    ('[clusters."bad name"]\n', "cluster name"),
    ('[clusters.c1]\nscheduler = "moab"\n', "scheduler 'moab' has no adapter"),
    ('[clusters.c1]\nscheduler_bin = "bin"\n', "absolute path"),
    ('[clusters.c1]\nenv = { "lower" = "x" }\n', "env must be"),
    ('[clusters.c1]\nenv = { A = 1 }\n', "env must be"),
    ('[clusters.c1]\nqueue = "x"\n', "unknown key(s) queue"),
    ("clusters = 3\n", "clusters must be tables"),
    ("listen = \n", "cannot read"),
    ('console_listen = "127.0.0.2:8470"\n', "ports of their own"),
])
def test_bad_values_are_refused_with_what_is_wrong(tmp_path, text, says):
    with pytest.raises(ConfigError) as e:
        SiteServiceConfig.load(write(tmp_path, text))
    assert says in str(e.value)


def test_an_unknown_cluster_names_the_known_ones(tmp_path):
    cfg = SiteServiceConfig.load(write(tmp_path, FULL))
    with pytest.raises(ConfigError, match="known: c1, pbs2"):
        cfg.cluster("c9")


def test_host_port_takes_ipv6_in_brackets():
    assert host_port("[::1]:8470") == ("::1", 8470)
    assert host_port("login1.example.org:443") == ("login1.example.org", 443)


def test_a_clusters_commands_come_first_on_its_path_and_its_env_wins(monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin")
    monkeypatch.setenv("SLURM_CONF", "/etc/slurm/slurm.conf")  # the service's own: not another cluster's
    c = ClusterConfig(name="c2", scheduler="slurm", scheduler_bin="/opt/c2/bin", env={"SLURM_CONF": "/etc/c2.conf"})
    env = c.command_env()
    assert env["PATH"].split(os.pathsep)[:2] == ["/opt/c2/bin", "/usr/bin"]
    assert env["SLURM_CONF"] == "/etc/c2.conf"
    assert "SLURM_CONF" not in ClusterConfig(name="c3").command_env()


def test_the_docs_table_names_every_key():
    keys = {k for k, _, _ in site_service_keys()}
    assert {"listen", "database", "admins_may_act", "clusters.NAME.scheduler", "clusters.NAME.env"} <= keys
    assert all(doc for _, _, doc in site_service_keys())
    assert "| `state_dir` | `\"/var/lib/dxflow-site\"` |" in site_service_table()
