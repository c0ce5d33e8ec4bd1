"""Which service a command talks to: the site service when the site config names one (``site = [...]``,
docs/site.md), else the user's own master on this login node — one interface for both
(:class:`~dxflow.master.client.MasterClient`, :class:`~dxflow.site.client.SiteClient`), so no command
knows which it has."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dxflow import config
from dxflow.master import client as master_client

if TYPE_CHECKING:
    from dxflow.site.client import SiteClient


def service() -> "master_client.MasterClient | SiteClient":
    """The client of the site service (``site`` set in /etc/dxflow/dxflow.toml), else of the user's master."""
    site = config.SiteConfig.load()
    if site.site:
        # imported here: TLS and MUNGE are loaded only where a site service is used (CLI start-up is measured)
        from dxflow.site.client import SiteClient

        return SiteClient(site.site, site.site_keys)
    return master_client.MasterClient()  # looked up at call time: tests put a fake master in its place
