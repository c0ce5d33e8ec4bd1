"""Expand Slurm-style host lists: ``n[1-3,7],gpu[01-02]`` -> n1 n2 n3 n7 gpu01 gpu02."""

from __future__ import annotations

import re

from dxflow.errors import UsageError

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise UsageError(f"unbalanced host list {text!r}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise UsageError(f"unbalanced host list {text!r}")
    parts.append(cur)
    return [p for p in parts if p]


def _expand_one(item: str) -> list[str]:
    start = item.find("[")
    if start < 0:
        return [item]
    end = item.index("]", start)
    prefix, body, rest = item[:start], item[start + 1:end], item[end + 1:]
    out: list[str] = []
    for piece in body.split(","):
        m = _RANGE.match(piece.strip())
        if not m:
            raise UsageError(f"bad range {piece!r} in host list {item!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        width = len(lo)
        if int(hi) - int(lo) > 100_000:
            raise UsageError(f"host range too large in {item!r}")
        for n in range(int(lo), int(hi) + 1):
            out.extend(f"{prefix}{n:0{width}d}{tail}" for tail in _expand_one(rest))
    return out


def expand_hostlist(text: str) -> list[str]:
    """Every host name in a Slurm host list expression, in order."""
    hosts: list[str] = []
    for item in _split_top(text.strip()):
        hosts.extend(_expand_one(item))
    return hosts
