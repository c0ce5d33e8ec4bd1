"""dxflow installed where every user and the scheduler hooks can run it, as a site would.

A venv under ``/opt`` made from Debian's ``/usr/bin/python3`` (root's own python may
be a private build other users cannot run), ``dxflow`` linked into ``/usr/local/bin``,
and the hook scripts copied to ``/etc/dxflow/hooks``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from dxflow.errors import ConfigError
from dxflow.lab.layout import Layout
from dxflow.lab.runner import run
from dxflow.lab.state import LabState

log = logging.getLogger(__name__)

# Used when this dxflow is an installed copy and no source tree (with prolog/ and
# epilog/) is at hand; same as the repository's prolog/slurm and epilog/slurm.
_FALLBACK_HOOK = """#!/bin/sh
# Slurm {kind} installed by `dxflow lab up`. Must never fail the job: always exit 0.
DXFLOW=/usr/local/bin/dxflow
[ -x "$DXFLOW" ] || DXFLOW=/opt/dxflow/venv/bin/dxflow
[ -x "$DXFLOW" ] || exit 0
"$DXFLOW" hook {kind} --scheduler slurm </dev/null >/dev/null 2>&1
exit 0
"""


def find_source_tree() -> Path | None:
    """The checkout this dxflow runs from (the folder holding setup.cfg above the package)."""
    import dxflow

    top = Path(dxflow.__file__).resolve().parent.parent
    if (top / "setup.cfg").is_file() and (top / "dxflow" / "__init__.py").is_file():
        return top
    return None


def ensure_venv(layout: Layout) -> None:
    """Create the shared venv from Debian's python3 when it is missing."""
    python = layout.venv / "bin" / "python"
    if python.exists():
        return
    if not layout.base_python.exists():
        raise ConfigError(f"{layout.base_python} is missing; install Debian's python3 and python3-venv")
    log.info("creating venv %s from %s", layout.venv, layout.base_python)
    layout.venv.parent.mkdir(parents=True, exist_ok=True)
    run([layout.base_python, "-m", "venv", layout.venv], what="creating the dxflow venv", timeout=300)


def install_dxflow(layout: Layout, source: Path | None) -> bool:
    """``pip install`` the checkout into the venv (not editable: other users must read it).

    Returns False when there is no source tree to install from (an installed dxflow
    runs this; it is then left as it is).
    """
    if source is None:
        log.info("dxflow runs from an installed copy; not reinstalling it")
        return False
    if editable_install_of(layout, source):
        # a developer's `pip install -e`: edits are live already; a copy would freeze them
        log.info("the venv runs %s in place (editable install); not reinstalling it", source)
        return False
    log.info("installing dxflow from %s into %s", source, layout.venv)
    # pip rebuilds and reinstalls a local folder every time; dependencies come from
    # pip's cache or index only when missing
    run([layout.venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-warn-script-location", source],
        what="installing dxflow into the venv", timeout=900)
    return True


def editable_install_of(layout: Layout, source: Path) -> bool:
    """True when the venv's dxflow is an editable install of ``source`` (pip's direct_url.json, PEP 610)."""
    for record in layout.venv.glob("lib/python*/site-packages/dxflow-*.dist-info/direct_url.json"):
        try:
            data = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if data.get("dir_info", {}).get("editable") and data.get("url") == source.resolve().as_uri():
            return True
    return False


def make_readable(root: Path) -> None:
    """Let every user read every file and enter every folder (``chmod -R a+rX``)."""
    run(["chmod", "-R", "a+rX", root], what=f"opening {root} to every user")


def link_command(layout: Layout) -> None:
    """``/usr/local/bin/dxflow`` -> the venv's ``dxflow``."""
    target = layout.venv / "bin" / "dxflow"
    link = layout.bin_link
    if link.is_symlink():
        if os.readlink(link) == str(target):
            return
        link.unlink()
    elif link.exists():
        raise ConfigError(f"{link} exists and is not a link; move it away so that "
                          f"{link} can point to {target}")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def install_hooks(layout: Layout, source: Path | None, state: LabState) -> None:
    """Copy the Slurm prolog and epilog to ``/etc/dxflow/hooks`` (root, 0755)."""
    for parent in (layout.hooks_dir.parent, layout.hooks_dir):
        if not parent.exists():
            parent.mkdir(mode=0o755)
            state.remember("dirs_created", str(parent))
    for kind, dest in (("prolog", layout.prolog), ("epilog", layout.epilog)):
        src = source / kind / "slurm" if source else None
        tmp = dest.with_name(dest.name + ".tmp")
        if src is not None and src.is_file():
            shutil.copyfile(src, tmp)
        else:
            tmp.write_text(_FALLBACK_HOOK.format(kind=kind))
        os.chown(tmp, 0, 0)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
        state.remember("hook_files", str(dest))


def remove_hooks(state: LabState) -> None:
    """Remove the hook files and the folders ``install_hooks`` created (when empty)."""
    for name in state.hook_files:
        Path(name).unlink(missing_ok=True)
    for name in sorted(state.dirs_created, key=len, reverse=True):
        try:
            Path(name).rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:  # not empty: something else lives there now
            log.warning("leaving %s in place: %s", name, e)


def install(layout: Layout, state: LabState) -> None:
    """Every step of this module, in order."""
    source = find_source_tree()
    ensure_venv(layout)
    install_dxflow(layout, source)
    make_readable(layout.venv.parent)
    link_command(layout)
    install_hooks(layout, source, state)
