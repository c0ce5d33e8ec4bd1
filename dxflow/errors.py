"""The one exception root of dxflow and its few branches.

Every error says what happened and, where it can, what to do about it. The CLI
exits with the class's ``exit_code``; the HTTP servers answer with its ``http_status``.
The table of exit codes in the README is generated from this module:
``python -m dxflow.errors --markdown`` (:func:`exit_code_table`).
"""

from __future__ import annotations

import sys
from typing import Sequence

#: exit codes of the CLI that no error class carries (``dxflow.cli.main`` returns them).
EXIT_OK = 0
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command ended by Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a writer whose reader went away
EXIT_CONNECTION_LOST = 255  # `exec`/`shell`: the command's own status never arrived (as ssh exits)


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


#: what each exit code means to the user, where a class's docstring does not say it.
_MEANING = {
    EXIT_OK: "success (`dxflow exec` and `dxflow shell`: the remote command's own exit code, whatever it is)",
    1: "an error of no more specific kind (also: a command dxflow ran failed)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
    EXIT_BROKEN_PIPE: "the reader of dxflow's output went away (`dxflow ls` piped into `head -1`)",
    EXIT_CONNECTION_LOST: "`dxflow exec` or `dxflow shell`: the connection broke before the command's exit code arrived",
}
#: what a code also means, beyond its class's docstring.
_ALSO = {3: " `dxflow master status`: no master runs on this login node."}


def exit_codes() -> list[tuple[int, str, str]]:
    """``(code, error classes, meaning)`` for every exit code of the CLI, from the classes above (only
    this module's: which other modules happen to be imported must not change the table; a class
    elsewhere takes its code from one of these, which ``tests/unit/test_generated_docs.py`` checks)."""
    names: dict[int, list[str]] = {}
    meanings: dict[int, str] = {}
    todo: list[type[DxflowError]] = [DxflowError]
    while todo:  # the root first, then each branch: a class that sets its own code defines the row
        cls = todo.pop(0)
        if cls.__module__ != __name__:
            continue
        code = cls.exit_code
        names.setdefault(code, []).append(cls.__name__)
        if "exit_code" in vars(cls) and code not in meanings:
            meanings[code] = (_MEANING.get(code) or (cls.__doc__ or "").strip().splitlines()[0]) + _ALSO.get(code, "")
        todo.extend(sorted(cls.__subclasses__(), key=lambda c: c.__name__))
    rows = [(code, ", ".join(names.get(code, [])), meanings.get(code) or _MEANING[code])
            for code in sorted(set(names) | set(_MEANING))]
    return rows


def exit_code_table() -> str:
    """The exit codes as a Markdown table (what the README shows)."""
    lines = ["| exit code | error | meaning |", "| --- | --- | --- |"]
    lines += [f"| {code} | {', '.join(f'`{n}`' for n in names.split(', ')) if names else ''} | {meaning} |"
              for code, names, meaning in exit_codes()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m dxflow.errors --markdown")
    sys.stdout.write(exit_code_table())
