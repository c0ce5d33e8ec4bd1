"""How the site service is served (dxflow.site.server): who may start it, what counts against a peer's bound,
which listeners speak TLS."""

from __future__ import annotations

import os

import pytest

from dxflow.errors import ConfigError, UsageError
from dxflow.site.config import SiteServiceConfig
from dxflow.site.server import SiteWorker, check_ready, on_loopback


def test_connections_of_other_hosts_are_bounded_per_host_and_local_ones_per_user():
    key = SiteWorker.peer_key
    assert key(None, None, ("10.0.0.5", 40000)) == ("host", "10.0.0.5")
    assert key(None, None, ("10.0.0.5", 40001)) == key(None, None, ("10.0.0.5", 9))
    assert key(None, 1001, ("127.0.0.1", 40000)) == 1001
    assert SiteWorker.admits(None, None) is True  # each request proves its user


@pytest.mark.parametrize("address, loopback", [("127.0.0.1:8470", True), ("[::1]:8470", True),
                                               ("localhost:8470", True), ("10.0.0.1:8470", False),
                                               ("login1:8470", False), ("0.0.0.0:8470", False)])
def test_only_loopback_listeners_go_without_tls(address, loopback):
    assert on_loopback(address) is loopback


def test_the_service_will_not_start_as_root_nor_before_init(tmp_path):
    config = SiteServiceConfig(state_dir=str(tmp_path))
    if os.geteuid() == 0:
        with pytest.raises(UsageError, match="does not run as root"):
            check_ready(config)
    else:
        with pytest.raises(ConfigError, match="dxflow site init"):
            check_ready(config)
