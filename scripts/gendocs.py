#!/usr/bin/env python3
"""Rewrite the generated parts of the docs from their one source each.

A generated part sits between two markers in a Markdown file::

    <!-- BEGIN GENERATED: python -m dxflow.config --markdown -->
    ...
    <!-- END GENERATED -->

and is replaced by what that command prints: the site config keys from ``SiteConfig``
(``dxflow.config``), the exit codes from the error classes (``dxflow.errors``), the site service's
keys from ``SiteServiceConfig`` (``dxflow.site.config``). Run it after changing any; ``--check`` only says which files are out of date (exit 1), as
``tests/unit/test_generated_docs.py`` does.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dxflow.config import site_config_table  # noqa: E402
from dxflow.errors import exit_code_table  # noqa: E402
from dxflow.site.config import site_service_table  # noqa: E402

#: the commands a marker may name, and the function that prints the same.
GENERATORS = {
    "python -m dxflow.config --markdown": site_config_table,
    "python -m dxflow.errors --markdown": exit_code_table,
    "python -m dxflow.site.config --markdown": site_service_table,
}
FILES = ("README.md", "docs/admin-slurm.md", "docs/site.md")
BLOCK = re.compile(r"(<!-- BEGIN GENERATED: (?P<command>[^>]+?) -->\n)(?P<body>.*?)(<!-- END GENERATED -->)", re.S)


def regenerate(text: str, where: str = "") -> str:
    """``text`` with every generated part replaced by its generator's output."""
    def replace(m: re.Match) -> str:
        command = m.group("command")
        if command not in GENERATORS:
            raise SystemExit(f"{where}: no generator for {command!r} (known: {', '.join(GENERATORS)})")
        return m.group(1) + GENERATORS[command]() + m.group(4)
    return BLOCK.sub(replace, text)


def outdated() -> list[str]:
    """The files whose generated parts differ from what their generators print now."""
    return [name for name in FILES
            if (text := (ROOT / name).read_text()) != regenerate(text, name)]


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        stale = outdated()
        for name in stale:
            print(f"{name}: generated part out of date; run scripts/gendocs.py", file=sys.stderr)
        return 1 if stale else 0
    if argv:
        print("usage: scripts/gendocs.py [--check]", file=sys.stderr)
        return 2
    for name in FILES:
        path = ROOT / name
        text = path.read_text()
        new = regenerate(text, name)
        if new != text:
            path.write_text(new)
            print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
