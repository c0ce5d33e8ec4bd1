"""Host names in schedulers' node lists, for every adapter, and node sets as users write them.

Slurm's host list expressions (``n[1-3,7],gpu[01-02]`` -> n1 n2 n3 n7 gpu01 gpu02), the short,
safe, distinct names that PBS's ``exec_host`` and node files and LSF's ``LSB_HOSTS`` reduce to, and
the node sets of the CLI (``12:n[1-4,7]``, also with clush's operators: ``n[1-8]!n3``). Expanding
and folding is ClusterShell's ``NodeSet`` (the library behind ``clush``, which HPC sites already
trust for it), always without its node groups: ``@group`` would make it read group files or run
their commands, and a hook runs as root.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Iterable, Iterator

from dxflow.errors import UsageError
from dxflow.schedulers.base import SAFE_NAME

#: where ClusterShell looks for its ``defaults.conf`` besides /etc and its own prefix, by environment
_USER_CONFIG = ("CLUSTERSHELL_CFGDIR", "XDG_CONFIG_HOME", "HOME")


@contextlib.contextmanager
def _site_config_only() -> Iterator[None]:
    """ClusterShell reads ``defaults.conf`` when it is imported, from /etc/clustershell, its own prefix,
    and paths the environment names ($CLUSTERSHELL_CFGDIR, $XDG_CONFIG_HOME, ~): a hook runs as root in
    an environment dxflow does not choose, and a broken file there would make the import raise (the
    hook fail). Only the root-owned places are left for it to read."""
    saved = {name: os.environ.pop(name) for name in _USER_CONFIG if name in os.environ}
    os.environ["HOME"] = "/nonexistent"
    try:
        yield
    finally:
        os.environ.pop("HOME", None)
        os.environ.update(saved)


with _site_config_only():
    from ClusterShell.NodeSet import RESOLVER_NOGROUP, NodeSet, NodeSetException
    from ClusterShell.RangeSet import RangeSetException

#: the most nodes one expression may name (a typo such as n[1-100000000] must not eat the login node)
MAX_NODES = 100_000
#: a numeric range inside brackets, checked before NodeSet builds it (it builds every number of it)
_SPAN = re.compile(r"(\d+)\s*-\s*(\d+)")
_BRACKETS = re.compile(r"\[([^\]]*)\]")
#: one node's name: letters, digits and . _ - (what a host name and a scheduler's node name are made of)
HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
#: characters that only clush's set operators use; a scheduler's own list never holds them
_OPERATORS = set("!&^")
_ADDRESS = re.compile(r"^[\d.]+$|:")


def short_host(name: str) -> str:
    """``n1.cluster.example`` -> ``n1`` (node names are compared with the short host name); addresses stay."""
    name = name.strip()
    return name if _ADDRESS.search(name) else name.split(".")[0]


def unique_hosts(names: Iterable[str]) -> list[str]:
    """Short, safe, distinct host names in first-seen order; anything that is not a host name is dropped."""
    out: list[str] = []
    for name in names:
        host = short_host(name)
        if host and SAFE_NAME.match(host) and host not in out:
            out.append(host)
    return out


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


def _nodeset(text: str, what: str) -> NodeSet:
    for body in _BRACKETS.findall(text):
        for lo, hi in _SPAN.findall(body):
            if int(hi) - int(lo) >= MAX_NODES:
                raise UsageError(f"{what} {text!r}: the range {lo}-{hi} is too large (at most {MAX_NODES} nodes)")
    try:
        nodes = NodeSet(text, resolver=RESOLVER_NOGROUP)
    except (NodeSetException, RangeSetException, ValueError) as e:
        raise UsageError(f"{what} {text!r}: {e}") from None
    if len(nodes) > MAX_NODES:
        raise UsageError(f"{what} {text!r} names {len(nodes)} nodes (at most {MAX_NODES})")
    return nodes


def _checked(names: Iterable[str], text: str, what: str) -> list[str]:
    out = list(names)
    for name in out:
        if not HOST.match(name):
            raise UsageError(f"{what} {text!r}: {name!r} is not a node name (letters, digits and . _ - only)")
    return out


def node_set(text: str) -> list[str]:
    """The nodes a node set names (``n[1-4,7]``, ``n1,gpu[01-02]``, ``n[1-8]!n3``), sorted as NodeSet
    sorts; UsageError for a malformed one, an empty one, or one that names no plain node name."""
    text = text.strip()
    if not text:
        raise UsageError("empty node set")
    if "@" in text:
        raise UsageError(f"node set {text!r}: node groups (@name) are not supported; name the nodes")
    names = _checked(_nodeset(text, "node set"), text, "node set")
    if not names:
        raise UsageError(f"node set {text!r} names no node")
    return names


def fold(names: Iterable[str]) -> str:
    """Node names folded into one node set: n1 n2 n3 n7 -> ``n[1-3,7]``."""
    return str(NodeSet.fromlist(list(names), resolver=RESOLVER_NOGROUP))


def sort_hosts(names: Iterable[str]) -> list[str]:
    """Distinct node names in NodeSet's order (n2 before n10)."""
    return list(NodeSet.fromlist(list(names), resolver=RESOLVER_NOGROUP))


def expand_hostlist(text: str) -> list[str]:
    """Every host name in a Slurm host list expression, in the order written (each bracket in
    NodeSet's order)."""
    text = text.strip()
    if _OPERATORS & set(text) or "@" in text:
        raise UsageError(f"host list {text!r}: not a host list expression")
    hosts: list[str] = []
    for item in _split_top(text):
        hosts.extend(_checked(_nodeset(item, "host list"), item, "host list"))
    return hosts
