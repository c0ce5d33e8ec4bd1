"""The one exception root of dxflow and its few branches.

Every error says what happened and, where it can, what to do about it. The CLI
exits with the class's ``exit_code``; the HTTP servers answer with its ``http_status``.
"""

from __future__ import annotations

from typing import Sequence


class DxflowError(Exception):
    """Root of every error dxflow raises on purpose."""

    exit_code = 1


class UsageError(DxflowError):
    """The user asked for something that cannot be done as asked."""

    exit_code = 2
    http_status = 400


class ConfigError(DxflowError):
    """The site or user configuration is unreadable or invalid."""

    exit_code = 3


class CommandError(DxflowError):
    """A command dxflow ran failed; carries its argv, exit code, stdout and stderr."""

    def __init__(self, message: str, *, argv: Sequence[str] | None = None, returncode: int | None = None,
                 stdout: str = "", stderr: str = "") -> None:
        detail = message
        if argv is not None:
            detail += f" (command: {' '.join(argv)}; exit code {returncode})"
            tail = (stderr or stdout).strip().splitlines()[-3:]
            if tail:
                detail += ": " + " | ".join(tail)
        super().__init__(detail)
        self.argv = list(argv) if argv is not None else None
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


class SchedulerError(CommandError):
    """A scheduler command failed or printed something unexpected."""

    exit_code = 4


class NotFound(DxflowError):
    """A job, node, agent or file that was named does not exist."""

    exit_code = 5
    http_status = 404


class AuthError(DxflowError):
    """A token or identity check failed."""

    exit_code = 6
    http_status = 401


class AgentUnreachable(DxflowError):
    """An agent or its node could not be reached through its tunnel."""

    exit_code = 7
    http_status = 502


class AgentLost(AgentUnreachable):
    """An agent is not proven to be the registered one on the tunnel in use (stopped, or its port taken):
    nothing is sent to its port until a check proves the port is the user's again."""


class AgentStarting(AgentUnreachable):
    """An agent is still being checked (its first identity check has not passed yet): try again in a moment."""


class MasterUnavailable(DxflowError):
    """The per-user master is not running and could not be started."""

    exit_code = 8


class AccessDenied(DxflowError):
    """A path, port or process lies outside what this job's user may touch."""

    exit_code = 9
    http_status = 403
