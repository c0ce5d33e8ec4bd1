"""The one place where the lab runs commands: argv lists only, failures become errors."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Sequence

from dxflow.errors import CommandError, DxflowError

log = logging.getLogger(__name__)


class LabError(CommandError):
    """Building, checking or tearing down the lab cluster failed."""

    exit_code = 1


def run(argv: Sequence[str | os.PathLike[str]], *, check: bool = True, error: type[DxflowError] = LabError,
        what: str | None = None, timeout: float = 120, input: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (strings or paths) and capture its output as text.

    With ``check`` a non-zero exit raises ``error`` (``LabError`` or ``SchedulerError``;
    both carry argv, exit code, stdout and stderr). ``what`` says, in the user's words,
    what the command was for.
    """
    args = [str(a) for a in argv]
    log.debug("run: %s", " ".join(args))
    full_env = None if env is None else {**os.environ, **env}
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              input=input, env=full_env, stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError as e:
        raise error(f"{what or 'command'} failed: {args[0]} is not installed",
                    argv=args, returncode=127, stderr=str(e)) from e  # type: ignore[call-arg]
    except subprocess.TimeoutExpired as e:
        raise error(f"{what or 'command'} did not finish within {timeout:g} s",
                    argv=args, returncode=None, stdout=_text(e.stdout), stderr=_text(e.stderr)) from e  # type: ignore[call-arg]
    if check and proc.returncode != 0:
        raise error(f"{what or 'command'} failed", argv=args, returncode=proc.returncode,  # type: ignore[call-arg]
                    stdout=proc.stdout, stderr=proc.stderr)
    return proc


def succeeds(argv: Sequence[str], *, timeout: float = 30) -> bool:
    """True when ``argv`` exits 0 (used for existence checks; output is discarded)."""
    try:
        return run(argv, check=False, timeout=timeout).returncode == 0
    except DxflowError:
        return False


def start_daemon(argv: Sequence[str], *, log_file: Path, what: str, timeout: float = 60) -> None:
    """Start a program that puts itself in the background (slurmctld, slurmd, sshd, munged).

    Its early output goes to ``log_file`` (a pipe would keep us waiting for as long
    as the daemon lives); it gets a session of its own so it outlives this command.
    """
    argv = [str(a) for a in argv]
    log.debug("start: %s", " ".join(argv))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:
        try:
            code = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True, timeout=timeout).returncode
        except (OSError, subprocess.TimeoutExpired) as e:
            raise LabError(f"could not start {what}: {e}", argv=argv) from e
    if code != 0:
        raise LabError(f"could not start {what}; see {log_file}", argv=argv, returncode=code,
                       stderr=_tail(log_file))


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
