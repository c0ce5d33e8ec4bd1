"""``POST /api/broadcast/JOB/peers``: what the agents of a broadcast need to reach each other.

A broadcast (``dxflow cp FILE JOB:all:PATH``) is passed on from node to node by the agents
(:mod:`dxflow.agent.broadcast`); the login node sends it to the first one only. For each node
the CLI names, the master answers with what it has proven about that node's agent (its address,
port and registered public key, :meth:`~dxflow.master.fleet.Fleet.relay_target`) and a token it
minted for that agent alone (audience: the agent's key; a couple of minutes long). The user's key
stays here: agents never hold it, they pass on the tokens they were handed. A node whose agent is
not proven gets an error instead, and the CLI reports it without sending anything there.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from dxflow import audit
from dxflow.errors import DxflowError, UsageError

#: at most this many agents are checked at once for one answer
CHECKS = 16


def init_app(app, fleet) -> None:
    from flask import jsonify, request

    @app.post("/api/broadcast/<job>/peers")
    def broadcast_peers(job: str):
        data = request.get_json(silent=True)
        nodes = data.get("nodes") if isinstance(data, dict) else None
        if not isinstance(nodes, list) or not nodes or not all(isinstance(n, str) and n for n in nodes):
            raise UsageError("expected {\"nodes\": [NODE, ...]}")
        environ = request.environ  # the threads below have no request context

        def one(node: str) -> dict:
            try:
                agent = fleet.relay_target(job, node)
            except DxflowError as e:
                return {"node": node, "error": str(e)}
            audit.record("relay", "broadcast token", agent.reg, environ)
            return {"node": node, "address": agent.reg.address, "port": agent.reg.port,
                    "public_key": agent.reg.public_key, "token": fleet.token(agent)}

        with ThreadPoolExecutor(max_workers=min(CHECKS, len(nodes))) as pool:
            return jsonify(peers=list(pool.map(one, nodes)))
