"""Who listens on an agent's port: the node kernel's table of TCP sockets, read before any byte goes there.

An agent listens on 127.0.0.1 of its node. Once it is gone, any user of that node may bind the
same port, and whatever the master sends there next (a challenge, a token, a user's command)
would reach that user's process. So before the master talks to a port it has not verified on the
tunnel in use, it reads ``/proc/net/tcp`` and ``/proc/net/tcp6`` of the node (through the node's
SSH transport, :meth:`dxflow.master.tunnels.TunnelPool.read_file`) and goes on only if every
socket that would answer a connection to 127.0.0.1:PORT belongs to the user.

The tables are parsed by :mod:`dxflow.edge.tcptable`, as everywhere in dxflow.
"""

from __future__ import annotations

from typing import Iterable

from dxflow.edge.tcptable import PROC_TABLES, REACHES_LOOPBACK4, parse_listeners
from dxflow.master.tunnels import TunnelPool


def owners(tables: Iterable[str], port: int) -> set[int]:
    """The uids of every socket that would answer a connection to 127.0.0.1:PORT."""
    return {lst.uid for text in tables for lst in parse_listeners(text)
            if lst.port == port and lst.address in REACHES_LOOPBACK4}


def refusal(tables: Iterable[str], port: int, uid: int, node: str) -> str:
    """Why nothing may be sent to 127.0.0.1:PORT on NODE ("" when only UID's sockets listen there)."""
    found = owners(tables, port)
    if not found:
        return f"nothing listens on port {port} on {node} (the agent stopped)"
    others = found - {uid}
    if others:
        return (f"port {port} on {node} is held by another user's process (uid "
                f"{', '.join(str(u) for u in sorted(others))}): the agent stopped and someone took its port")
    return ""


def refusal_on(pool: TunnelPool, address: str, port: int, uid: int, node: str, generation: int) -> str:
    """:func:`refusal` for the node at ``address``, its tables read through ``pool`` on that tunnel generation."""
    tables = []
    for path in PROC_TABLES:
        try:
            tables.append(pool.read_file(address, path, generation).decode("ascii", "replace"))
        except FileNotFoundError:  # no IPv6 on that node
            continue
    return refusal(tables, port, uid, node)
