"""The agent: a small Flask app per node of a job, one blueprint per area."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the agent's arbiter imports this package but never Flask (dxflow.agent.server)
    from types import ModuleType

    from flask import Flask

    from dxflow.agent.state import AgentState

#: blueprint modules, in the order they are registered. Each has ``bp`` (and may have ``init_app``).
BLUEPRINTS = ("health", "node", "files", "broadcast", "logs", "exec", "shell", "proxy", "ports", "console", "top", "openapi")


def load_blueprints() -> list[ModuleType]:
    """The blueprint modules, imported (the worker imports them while its key is being made)."""
    import importlib

    return [importlib.import_module(f"dxflow.agent.{name}") for name in BLUEPRINTS]


def create_app(state: AgentState, config: dict | None = None) -> Flask:
    """The agent's app for ``state``; ``config`` is added to the app's config (the site policy the
    server read once, or a test's settings): what it leaves out, a blueprint reads from the site config."""
    from flask import Flask

    from dxflow.agent import auth
    from dxflow.edge import httperrors

    app = Flask("dxflow.agent")
    app.config["AGENT"] = state
    app.config["PUBLIC_ENDPOINTS"] = ()
    app.config["MAX_CONTENT_LENGTH"] = None
    if config:
        app.config.update(config)
    auth.init_app(app)
    for module in load_blueprints():
        app.register_blueprint(module.bp)
        if hasattr(module, "init_app"):
            module.init_app(app)

    httperrors.install(app, default_status=400)
    return app
