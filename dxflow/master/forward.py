"""``/api/forward/JOB/NODE/PORT``: a raw TCP pipe from the CLI to a service of the job on a node.

A plain ``GET`` checks, through the agent's ``/api/ports/PORT``, that a process of
the user listens on PORT there (and no other user's could answer) and says where
it leads. With ``Connection: Upgrade`` and ``Upgrade: dxflow-tcp`` the master then
answers ``101 Switching Protocols`` and pipes the connection's bytes both ways
through a direct-tcpip channel of the node's SSH transport. ``dxflow forward``
opens one such pipe per local connection, so anything that speaks TCP works
(HTTP, server-sent events, WebSockets).

Only the standard library is imported at module level: the CLI uses :func:`pipe`.
"""

from __future__ import annotations

import logging

from dxflow import audit
from dxflow.edge.http import FORWARD_UPGRADE, Hijacked
from dxflow.edge.pipes import pipe

log = logging.getLogger(__name__)

UPGRADE = FORWARD_UPGRADE
CHECK_TIMEOUT = 15.0
CONNECT_TIMEOUT = 10.0


def check(fleet, agent, port: int) -> tuple[int, dict]:
    """Ask the agent whether PORT is the user's: (HTTP status, its JSON answer)."""
    return fleet.ask(agent, f"/api/ports/{port}", timeout=CHECK_TIMEOUT)


def open_channel(fleet, agent, connect: str, port: int):
    """A byte stream to ``connect:port`` on the agent's node, through the transport the agent was proven on."""
    return fleet.pool.channel(agent.reg.address, port, timeout=CONNECT_TIMEOUT, host=connect,
                              generation=fleet.proven_generation(agent))


def init_app(app, fleet) -> None:
    from flask import jsonify, request

    @app.get("/api/forward/<job>/<node>/<int:port>")
    def forward(job: str, node: str, port: int):
        agent = fleet.relay_target(job, None if node == "-" else node)
        status, info = check(fleet, agent, port)
        if status != 200:
            return jsonify(info), status
        info.update(job=agent.reg.job, node=agent.reg.node)
        if request.headers.get("Upgrade", "").lower() != UPGRADE:
            return jsonify(info)
        sock = request.environ.get("gunicorn.socket")
        if sock is None:
            return jsonify(error="bad_request", message="this server cannot hand over connections"), 400
        chan = open_channel(fleet, agent, info["connect"], port)
        audit.record("forward", f"port {port}", agent.reg, request.environ, port=port, connect=info["connect"])
        try:
            sock.sendall(f"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {UPGRADE}\r\n"
                         f"X-Dxflow-Agent: {agent.name}\r\n\r\n".encode())
            sock.settimeout(None)
            pipe(sock, chan)
        except OSError as e:
            log.info("forward to %s port %d: %s", agent.name, port, e)
        finally:
            chan.close()
        return Hijacked()
