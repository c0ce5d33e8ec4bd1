"""``/api/openapi.json``: the OpenAPI 3 document of this agent's API.

Each blueprint module may describe its own routes in a module-level ``OPENAPI``
dict (an OpenAPI "paths" fragment) and add schemas in ``OPENAPI_SCHEMAS``; this
module merges them, in the order of ``BLUEPRINTS``. Health and node are described
here.
"""

from __future__ import annotations

import copy
import importlib
import logging

from flask import Blueprint, jsonify

from dxflow import API_VERSION, __version__

log = logging.getLogger(__name__)
bp = Blueprint("openapi", __name__)

ERROR_SCHEMA = {"type": "object", "required": ["error", "message"], "properties": {
    "error": {"type": "string"}, "message": {"type": "string"}}}
_ERR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}

#: health and node, whose modules belong to the core of the agent.
CORE_PATHS = {
    "/api/health": {"get": {
        "summary": "alive; with ?challenge=S, the agent's RSA-SHA256 signature of S (proves its identity)",
        "operationId": "health", "tags": ["agent"],
        "parameters": [{"name": "challenge", "in": "query", "required": False,
                        "schema": {"type": "string", "maxLength": 256}}],
        "responses": {
            "200": {"description": "the agent", "content": {"application/json": {"schema": {
                "type": "object", "properties": {
                    "status": {"type": "string"}, "job": {"type": "string"}, "node": {"type": "string"},
                    "user": {"type": "string"}, "api_version": {"type": "integer"}, "version": {"type": "string"},
                    "uptime": {"type": "number"},
                    "signature": {"type": "string",
                                  "description": "base64 PKCS#1 v1.5 signature of the challenge"}}}}}},
            "400": {"description": "challenge longer than 256 characters", **_ERR}}}},
    "/api/heartbeat": {"get": {
        "summary": "a never-ending stream, one line every few seconds: while it is open, the agent lives",
        "operationId": "heartbeat", "tags": ["agent"],
        "responses": {"200": {"description": "text/plain lines, until the agent stops",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    "/api/node": {"get": {
        "summary": "this node: hostname, job, user, CPUs, memory, load, uptime, GPUs", "operationId": "node",
        "tags": ["agent"],
        "responses": {"200": {"description": "the node", "content": {"application/json": {"schema": {
            "type": "object", "properties": {
                "hostname": {"type": "string"}, "node": {"type": "string"}, "job": {"type": "string"},
                "cluster": {"type": "string"}, "scheduler": {"type": "string"}, "user": {"type": "string"},
                "cpus": {"type": "integer"}, "cpus_allowed": {"type": "integer"},
                "cpu_percent": {"type": "number"}, "memory_total": {"type": "integer"},
                "memory_available": {"type": "integer"}, "load": {"type": "array", "items": {"type": "number"}},
                "uptime": {"type": "number"}, "agent_uptime": {"type": "number"},
                "gpus": {"type": "array", "items": {"type": "object"}}}}}}}}}},
    "/api/metrics": {"get": {
        "summary": "the job's own usage on this node over its life (dxflow.metrics): columns, rows, summary",
        "operationId": "metrics", "tags": ["agent"],
        "parameters": [{"name": "since", "in": "query", "required": False, "schema": {"type": "string"},
                        "description": "a duration back (10m, 90s, 2h) or an epoch time; default: the whole life"}],
        "responses": {"200": {"description": "the series and its summary",
                              "content": {"application/json": {"schema": {"type": "object"}}}},
                      "400": {"description": "since is neither a duration nor an epoch time", **_ERR},
                      "404": {"description": "sampling is off at this site (metrics_interval = 0)", **_ERR}}}},
    "/api/openapi.json": {"get": {
        "summary": "this document", "operationId": "openapi", "tags": ["agent"],
        "responses": {"200": {"description": "OpenAPI 3 document",
                              "content": {"application/json": {"schema": {"type": "object"}}}}}}},
}


def document() -> dict:
    """The whole OpenAPI document: core paths plus every blueprint module's ``OPENAPI``."""
    from dxflow.agent import BLUEPRINTS

    paths: dict = {}
    schemas: dict = {"Error": ERROR_SCHEMA}
    for name in BLUEPRINTS:
        if name in ("health", "node", "openapi"):
            continue
        module = importlib.import_module(f"dxflow.agent.{name}")
        for path, ops in copy.deepcopy(getattr(module, "OPENAPI", None) or {}).items():
            paths.setdefault(path, {}).update(ops)
        schemas.update(getattr(module, "OPENAPI_SCHEMAS", None) or {})
    for path, ops in copy.deepcopy(CORE_PATHS).items():
        paths.setdefault(path, {}).update(ops)
    unauthorized = {"description": "missing or invalid bearer token", **_ERR}
    for ops in paths.values():
        for op in ops.values():
            if isinstance(op, dict) and "responses" in op:
                op["responses"].setdefault("401", unauthorized)
    return {
        "openapi": "3.0.3",
        "info": {"title": "dxflow agent", "version": f"{API_VERSION} ({__version__})",
                 "description": "The API of the agent dxflow runs on each node of a job. Every request carries "
                                "a bearer token (JWT, RS256) signed by the user's ~/.dxflow/id_rsa and addressed "
                                "to this agent's key fingerprint."},
        "servers": [{"url": "/"}],
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
                       "schemas": schemas},
        "security": [{"bearer": []}],
        "paths": dict(sorted(paths.items())),
    }


@bp.get("/api/openapi.json")
def openapi():
    return jsonify(document())
