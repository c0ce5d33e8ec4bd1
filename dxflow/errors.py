"""The one exception root of dxflow and its few branches.

Every error says what happened and, where it can, what to do about it. The CLI
turns each class into an exit code (see ``EXIT_CODES``).
"""

from __future__ import annotations


class DxflowError(Exception):
    """Root of every error dxflow raises on purpose."""

    exit_code = 1


class UsageError(DxflowError):
    """The user asked for something that cannot be done as asked."""

    exit_code = 2


class ConfigError(DxflowError):
    """The site or user configuration is unreadable or invalid."""

    exit_code = 3


class SchedulerError(DxflowError):
    """A scheduler command failed or printed something unexpected."""

    exit_code = 4

    def __init__(self, message: str, *, argv: list[str] | None = None, returncode: int | None = None,
                 stdout: str = "", stderr: str = "") -> None:
        detail = message
        if argv is not None:
            detail += f" (command: {' '.join(argv)}; exit code {returncode})"
            tail = (stderr or stdout).strip().splitlines()[-3:]
            if tail:
                detail += ": " + " | ".join(tail)
        super().__init__(detail)
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


class NotFound(DxflowError):
    """A job, node, agent or file that was named does not exist."""

    exit_code = 5


class AuthError(DxflowError):
    """A token or identity check failed."""

    exit_code = 6


class AgentUnreachable(DxflowError):
    """An agent or its node could not be reached through its tunnel."""

    exit_code = 7


class MasterUnavailable(DxflowError):
    """The per-user master is not running and could not be started."""

    exit_code = 8


class AccessDenied(DxflowError):
    """A path, port or process lies outside what this job's user may touch."""

    exit_code = 9
