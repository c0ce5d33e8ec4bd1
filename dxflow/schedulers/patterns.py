"""Output file name patterns (``sbatch -o slurm-%j.out``, ``bsub -o run.%J.%I``), expanded one way for all.

Each adapter states its tokens as data (:attr:`dxflow.schedulers.base.Scheduler.output_patterns`):
token -> the fields that give its value, first known one wins. A field is a generic name —
``job``, ``user``, ``name``, ``node``, ``array_job``, ``array_task`` — or ``=text`` for a
constant. The caller passes what it knows as ``fields``:

- a field **absent** from ``fields`` is unknown: the token is left as it is (an agent on a node
  does not know the job's name or array until the scheduler tells it, and a wrong path is worse
  than an unexpanded one);
- a field present but **empty** is known not to apply (not an array job): the next source is tried.

So Slurm's ``%A`` is ``("array_job", "job")``: the array's id, or the job's own id once it is known
that the job is not an array element (``_expand_wildcard``, src/common/print_fields.c).
"""

from __future__ import annotations

import functools
import re
from typing import Mapping, Sequence

#: Slurm pads a number to at most this many digits (``%12j`` is ``%10j``), print_fields.c.
MAX_WIDTH = 10


def expand(pattern: str, tokens: Mapping[str, Sequence[str]], fields: Mapping[str, str], *,
           width: bool = False, literal: str = "") -> str:
    """``pattern`` with every token of ``tokens`` whose value is known replaced by it.

    ``width``: a number between ``%`` and the letter zero-pads a numeric value (Slurm's ``%4j``).
    ``literal``: a character that, anywhere in the pattern, turns expansion off; the pattern is then
    taken as written, without that character (Slurm's backslash)."""
    if literal and literal in pattern:
        return pattern.replace(literal, "")
    if not tokens or not any(t[0] in pattern for t in tokens):
        return pattern
    return _regex(tuple(tokens), width).sub(lambda m: _one(m, tokens, fields), pattern)


def has_tokens(pattern: str, tokens: Mapping[str, Sequence[str]], *, width: bool = False,
               literal: str = "") -> bool:
    """Whether :func:`expand` would find a token in ``pattern`` (known or not)."""
    if not tokens or (literal and literal in pattern):
        return False
    return _regex(tuple(tokens), width).search(pattern) is not None


@functools.lru_cache(maxsize=16)
def _regex(tokens: tuple[str, ...], width: bool) -> re.Pattern[str]:
    # a width sits between "%" and the letter: "%4j"; longer tokens first ("%%" before "%j" is moot,
    # both are two characters; "^array_index^" before anything shorter)
    parts = []
    for token in sorted(tokens, key=len, reverse=True):
        if width and len(token) == 2 and token[0] == "%" and token[1] != "%":
            parts.append(f"%(?P<w{ord(token[1])}>\\d*){re.escape(token[1])}")
        else:
            parts.append(re.escape(token))
    return re.compile("|".join(parts))


def _one(m: re.Match[str], tokens: Mapping[str, Sequence[str]], fields: Mapping[str, str]) -> str:
    text = m.group(0)
    digits = next((v for k, v in m.groupdict().items() if v is not None), "")
    token = text[0] + text[1 + len(digits):] if digits else text
    value = _value(tokens.get(token, ()), fields)
    if value is None:
        return text
    if digits and value.isdigit():
        return value.zfill(min(int(digits), MAX_WIDTH))
    return value


def _value(sources: Sequence[str], fields: Mapping[str, str]) -> str | None:
    for source in sources:
        if source.startswith("="):
            return source[1:]
        if source not in fields:
            return None          # unknown: leave the token
        if fields[source]:
            return fields[source]
    return None
