"""Print constraints.txt: the versions installed in a venv of dxflow's dependencies, direct and indirect.

    /opt/dxflow/venv/bin/python scripts/constraints.py > constraints.txt

Run with the venv the tests passed in. The requirements are read from setup.cfg (install_requires and
every extra), then followed through the installed packages' own metadata; a requirement that is not
installed (pyslurm, nvidia-ml-py on a machine without them) is left out: pip then resolves it freely.
"""

from __future__ import annotations

import configparser
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    for value in cfg["options.extras_require"].values():
        lines += value.splitlines()
    return [Requirement(line) for line in (x.split("#")[0].strip() for x in lines) if line]


def needs(dist: metadata.Distribution, extras: set[str]) -> list[Requirement]:
    out = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
            continue
        out.append(req)
    return out


def main() -> int:
    pins: dict[str, str] = {}
    todo = [(r.name, set(r.extras)) for r in declared()]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (key(name), frozenset(extras)) in done:
            continue
        done.add((key(name), frozenset(extras)))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        pins[key(name)] = dist.version
        todo += [(r.name, set(r.extras)) for r in needs(dist, extras)]
    print("# dxflow's dependencies at the versions its tests passed with (scripts/constraints.py);")
    print("# pip install -c constraints.txt ...: see docs/install.md")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
