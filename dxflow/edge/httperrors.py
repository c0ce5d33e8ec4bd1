"""JSON error answers shared by the agent's and the master's Flask apps."""

from __future__ import annotations

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from dxflow.errors import DxflowError


def install(app: Flask, default_status: int) -> None:
    """Answer every :class:`DxflowError` and HTTP error as ``{"error", "message"}`` JSON."""

    @app.errorhandler(DxflowError)
    def dxflow_error(e: DxflowError):
        return jsonify(error=type(e).__name__, message=str(e)), getattr(e, "http_status", default_status)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        return jsonify(error=e.name.lower().replace(" ", "_"), message=e.description), e.code
