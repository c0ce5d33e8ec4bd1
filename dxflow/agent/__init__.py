"""The agent: a small Flask app per node of a job, one blueprint per area."""

from __future__ import annotations

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from dxflow.agent.state import AgentState
from dxflow.errors import AccessDenied, DxflowError, NotFound, UsageError

#: blueprint modules, in the order they are registered. Each has ``bp`` (and may have ``init_app``).
BLUEPRINTS = ("health", "node", "files", "logs", "exec", "shell", "proxy", "ports", "console", "openapi")


def create_app(state: AgentState, test_config: dict | None = None) -> Flask:
    import importlib

    from dxflow.agent import auth

    app = Flask("dxflow.agent")
    app.config["AGENT"] = state
    app.config["PUBLIC_ENDPOINTS"] = ()
    app.config["MAX_CONTENT_LENGTH"] = None
    if test_config:
        app.config.update(test_config)
    auth.init_app(app)
    for name in BLUEPRINTS:
        try:
            module = importlib.import_module(f"dxflow.agent.{name}")
        except ModuleNotFoundError as e:  # an area not shipped in this build
            if e.name != f"dxflow.agent.{name}":
                raise
            continue
        app.register_blueprint(module.bp)
        if hasattr(module, "init_app"):
            module.init_app(app)

    @app.errorhandler(DxflowError)
    def dxflow_error(e: DxflowError):
        status = 400
        for cls, code in ((AccessDenied, 403), (NotFound, 404), (UsageError, 400)):
            if isinstance(e, cls):
                status = code
                break
        return jsonify(error=type(e).__name__, message=str(e)), status

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        return jsonify(error=e.name.lower().replace(" ", "_"), message=e.description), e.code

    return app
