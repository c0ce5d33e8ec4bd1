"""``/api/openapi.json`` on the master: the OpenAPI 3 document of the master's own API.

The relay ``/api/fleet/{job}/{node}/{path}`` passes any request on to that agent's ``/{path}``;
each agent describes its own API at ``/api/openapi.json`` (reach it as
``/api/fleet/{job}/-/api/openapi.json``).
"""

from __future__ import annotations

from flask import Flask, jsonify

from dxflow import API_VERSION, __version__

_ERR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_JSON_OBJECT = {"content": {"application/json": {"schema": {"type": "object"}}}}
_JOB = {"name": "job", "in": "path", "required": True, "schema": {"type": "string"}}
_NODE = {"name": "node", "in": "path", "required": True, "schema": {"type": "string"},
         "description": "a node of the job, or `-` for its first node"}

PATHS = {
    "/api/master": {"get": {"summary": "this master: pid, user, version, tunnels, number of agents",
                            "operationId": "master", "tags": ["master"],
                            "responses": {"200": {"description": "the master", **_JSON_OBJECT}}}},
    "/api/agents": {"get": {
        "summary": "the user's agents (gone ones only with all=1)", "operationId": "agents", "tags": ["fleet"],
        "parameters": [{"name": "all", "in": "query", "required": False, "schema": {"type": "string", "enum": ["0", "1"]}},
                       {"name": "refresh", "in": "query", "required": False, "schema": {"type": "string"}}],
        "responses": {"200": {"description": "one object per agent", "content": {"application/json": {
            "schema": {"type": "array", "items": {"type": "object"}}}}}}}},
    "/api/console": {"get": {"summary": "where the web console listens", "operationId": "consoleStatus",
                             "tags": ["console"], "responses": {"200": {"description": "port, socket, url",
                                                                        **_JSON_OBJECT}}}},
    "/api/console/token": {"post": {
        "summary": "a one-time login token for the web console (on the CLI's socket only)",
        "operationId": "consoleToken", "tags": ["console"],
        "responses": {"200": {"description": "token, expiry, url", **_JSON_OBJECT},
                      "403": {"description": "not on the CLI's socket", **_ERR}}}},
    "/api/forward/{job}/{node}/{port}": {"get": {
        "summary": "check that PORT on the node is the user's; with `Upgrade: dxflow-tcp`, a raw TCP pipe to it",
        "operationId": "forward", "tags": ["fleet"],
        "parameters": [_JOB, _NODE, {"name": "port", "in": "path", "required": True,
                                     "schema": {"type": "integer", "minimum": 1, "maximum": 65535}}],
        "responses": {"200": {"description": "where the port leads", **_JSON_OBJECT},
                      "403": {"description": "not the user's port", **_ERR},
                      "404": {"description": "no such agent, or nothing listens", **_ERR},
                      "502": {"description": "the agent cannot be reached, or is lost", **_ERR}}}},
    "/api/metrics/{job}": {"get": {
        "summary": "a job's usage over its life, every node merged (docs/metrics.md)", "operationId": "jobMetrics",
        "tags": ["metrics"],
        "parameters": [_JOB,
                       {"name": "since", "in": "query", "required": False, "schema": {"type": "string"},
                        "description": "a duration back (10m, 90s, 2h) or an epoch time"},
                       {"name": "node", "in": "query", "required": False, "schema": {"type": "string"},
                        "description": "nodes to keep, comma-separated"}],
        "responses": {"200": {"description": "one series per node, and the nodes that did not answer", **_JSON_OBJECT},
                      "400": {"description": "bad since", **_ERR},
                      "404": {"description": "no agent of that job", **_ERR}}}},
    "/api/report/{job}": {"get": {
        "summary": "a job's efficiency report (written to ~/.dxflow/reports/JOB.json as well)",
        "operationId": "jobReport", "tags": ["metrics"], "parameters": [_JOB],
        "responses": {"200": {"description": "the report", **_JSON_OBJECT},
                      "400": {"description": "not a job id", **_ERR},
                      "404": {"description": "no report and no agent of that job", **_ERR}}}},
    "/api/top/{job}": {"get": {
        "summary": "what a job runs on each node now: CPU, memory, load, GPUs, busiest processes (dxflow top)",
        "operationId": "jobTop", "tags": ["metrics"],
        "parameters": [_JOB,
                       {"name": "node", "in": "query", "required": False, "schema": {"type": "string"},
                        "description": "nodes to keep, comma-separated"},
                       {"name": "processes", "in": "query", "required": False,
                        "schema": {"type": "integer", "minimum": 0, "maximum": 50}},
                       {"name": "sort", "in": "query", "required": False,
                        "schema": {"type": "string", "enum": ["cpu", "memory"]}}],
        "responses": {"200": {"description": "one row per node; a node that did not answer says why", **_JSON_OBJECT},
                      "404": {"description": "no agent of that job, or nodes not of the job", **_ERR}}}},
    "/api/jobs/{job}/nodes": {"get": {
        "summary": "the job's nodes as the scheduler lists them among the user's jobs (JOB:all means these)",
        "operationId": "jobNodes", "tags": ["fleet"], "parameters": [_JOB],
        "responses": {"200": {"description": '{"job", "state" (running, pending, ended, unknown…), "nodes", '
                                             '"node_set", "scheduler", "why"}', **_JSON_OBJECT},
                      "400": {"description": "not a job id", **_ERR}}}},
    "/api/broadcast/{job}/peers": {"post": {
        "summary": "for a broadcast (dxflow cp FILE JOB:all:PATH): each node's agent address, port, public key and "
                   "a token minted for that agent alone, or why it cannot be reached",
        "operationId": "broadcastPeers", "tags": ["fleet"], "parameters": [_JOB],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["nodes"],
            "properties": {"nodes": {"type": "array", "minItems": 1, "items": {"type": "string"}}}}}}},
        "responses": {"200": {"description": '{"peers": [{"node", "address", "port", "public_key", "token"} '
                                             'or {"node", "error"}]}', **_JSON_OBJECT},
                      "400": {"description": "no list of nodes", **_ERR}}}},
    "/metrics": {"get": {
        "summary": "the live per-job series of the user's agents, Prometheus text format",
        "operationId": "prometheus", "tags": ["metrics"],
        "responses": {"200": {"description": "text/plain; version=0.0.4",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    "/api/openapi.json": {"get": {"summary": "this document", "operationId": "openapi", "tags": ["master"],
                                  "responses": {"200": {"description": "OpenAPI 3 document", **_JSON_OBJECT}}}},
}


def document() -> dict:
    return {"openapi": "3.0.3",
            "info": {"title": "dxflow master", "version": __version__,
                     "description": f"The per-user master's API (agent API version {API_VERSION}); the relay "
                                    "/api/fleet/{job}/{node}/{path} reaches each agent's own API."},
            "paths": PATHS,
            "components": {"schemas": {"Error": {"type": "object", "required": ["error", "message"], "properties": {
                "error": {"type": "string"}, "message": {"type": "string"}}}}}}


def init_app(app: Flask, fleet) -> None:
    @app.get("/api/openapi.json")
    def openapi():
        return jsonify(document())
