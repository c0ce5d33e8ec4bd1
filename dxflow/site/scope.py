"""Whose agents a request sees: job names with their cluster, the store's agents filtered to what the
request's user may see, and the defaults of that policy (:mod:`dxflow.site.users` sets the site's own:
owners see their jobs, admins every job's state and metrics)."""

from __future__ import annotations

from typing import Any, Callable

from flask import g

from dxflow.errors import AuthError, NotFound
from dxflow.site.client import CLUSTER_SEP
from dxflow.site.store import SiteAgent, Store


def split_job(job: str) -> tuple[str | None, str]:
    """``"c1~12"`` -> ``("c1", "12")``; ``"12"`` -> ``(None, "12")``."""
    cluster, sep, job_id = job.rpartition(CLUSTER_SEP)
    return (cluster, job_id) if sep and cluster else (None, job)


def request_user() -> Any:
    """The request's user (an object with ``name`` and ``admin``), as :mod:`dxflow.site.users` sets it."""
    user = g.get("site_user")
    if user is None:
        raise AuthError("no user: the request carried no accepted credential")
    return user


def default_visible(owner: str) -> bool:
    """The job's owner sees it, and an admin."""
    user = request_user()
    return owner == user.name or bool(getattr(user, "admin", False))


def default_check(owner: str, job: str) -> None:
    """Only the job's owner reaches it; anyone else is told it does not exist."""
    if owner != request_user().name:
        raise NotFound(f"no such job: {job}")


class VisibleAgents:
    """The store's agents that the request's user may see, as the master's :class:`Registry` answers."""

    def __init__(self, store: Store, visible: Callable[[str], bool]) -> None:
        self._store = store
        self._visible = visible

    def all(self) -> list[SiteAgent]:
        return [a for a in self._store.agents() if self._visible(a.reg.user)]

    def of_job(self, job: str) -> list[SiteAgent]:
        """The agents of ``CLUSTER~JOB`` or of a bare job id (on any cluster; a PBS id also by its number)."""
        cluster, job_id = split_job(job)
        return [a for a in self._store.agents(cluster=cluster, job_number=job_id)
                if self._visible(a.reg.user)]

    def get(self, name: str) -> SiteAgent | None:
        agent = self._store.agent(name)
        return agent if agent is not None and self._visible(agent.reg.user) else None
