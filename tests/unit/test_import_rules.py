"""The layers of dxflow only look down: a test that fails when an import crosses a boundary.

* ``dxflow.edge`` (raw HTTP, WebSocket and socket plumbing) imports nothing of ``agent``, ``master`` or ``cli``;
* ``dxflow.agent`` and ``dxflow.master`` never import each other (nor the CLI);
* ``dxflow.cli`` reaches the master only through its client, ``dxflow.master.client``, and the site service
  through its client and the admin's commands (``dxflow.site.client``, ``.admin``, ``.config``);
* ``dxflow.site`` (the site service) may build on ``master``, ``edge``, the schedulers; ``agent`` never
  imports it, ``master`` only its client (the one factory every command uses);
* ``dxflow.ssh`` (the OpenSSH side of the tunnels) imports nothing of ``agent``, ``master``, ``cli`` or ``edge``.

Imports are read from the source (every ``import`` statement, at the top or inside a function).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "dxflow"

#: (layer, what it may not import, what it may import all the same)
RULES = [
    ("dxflow.edge", ("dxflow.agent", "dxflow.master", "dxflow.cli"), ()),
    ("dxflow.agent", ("dxflow.master", "dxflow.cli", "dxflow.site"), ()),
    ("dxflow.master", ("dxflow.agent", "dxflow.cli", "dxflow.site"), ("dxflow.site.client",)),
    ("dxflow.cli", ("dxflow.master", "dxflow.site"), ("dxflow.master.client", "dxflow.site.client",
                                                   "dxflow.site.admin", "dxflow.site.config")),
    # the site service builds on the master's relay, the edge, the schedulers; nothing below imports it
    ("dxflow.site", ("dxflow.agent", "dxflow.cli"), ()),
    ("dxflow.ssh", ("dxflow.agent", "dxflow.master", "dxflow.cli", "dxflow.edge"), ()),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every name a file imports, in full (``from a import b`` counts as ``a.b``: b may be a module)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    here = module_name(path).split(".")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = here[:len(here) - node.level + (1 if path.name == "__init__.py" else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.update(f"{mod}.{alias.name}" for alias in node.names)
    return found


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(layer: str, forbidden: tuple[str, ...], allowed: tuple[str, ...]) -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if not within(module_name(path), layer):
            continue
        for name in sorted(imports(path)):
            if any(within(name, f) for f in forbidden) and not any(within(name, a) for a in allowed):
                out.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    return out


@pytest.mark.parametrize("layer, forbidden, allowed", RULES, ids=[r[0] for r in RULES])
def test_layer_imports_only_downwards(layer, forbidden, allowed):
    assert violations(layer, forbidden, allowed) == []


def test_the_rules_catch_a_crossing(tmp_path, monkeypatch):
    """The checker itself: an edge module importing the master is reported."""
    pkg = tmp_path / "dxflow"
    (pkg / "edge").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "edge" / "__init__.py").write_text("")
    (pkg / "edge" / "bad.py").write_text("def f():\n    from dxflow.master.fleet import Fleet\n")
    (pkg / "cli").mkdir()
    (pkg / "cli" / "__init__.py").write_text("")
    (pkg / "cli" / "ok.py").write_text("from dxflow.master.client import MasterClient\nfrom ..master import fleet\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    assert violations("dxflow.edge", RULES[0][1], ()) == ["dxflow/edge/bad.py imports dxflow.master.fleet.Fleet"]
    assert violations("dxflow.cli", RULES[3][1], RULES[3][2]) == ["dxflow/cli/ok.py imports dxflow.master.fleet"]
