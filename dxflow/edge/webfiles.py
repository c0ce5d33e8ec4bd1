"""Where the web console's static files (``web/`` in the source tree) are.

An installed package has them in ``<prefix>/share/dxflow/web`` (setup.cfg's
``data_files``); a checkout run in place has them in ``web/`` beside the package.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

from dxflow.errors import ConfigError

#: a folder is the console only if it has this file.
MARKER = "index.html"


def candidates() -> list[Path]:
    """Folders that may hold the console, in the order they are tried."""
    found = []
    env = os.environ.get("DXFLOW_WEB_ROOT")
    if env:
        found.append(Path(env))
    found.append(Path(__file__).resolve().parents[2] / "web")  # a checkout
    for prefix in (sys.prefix, sysconfig.get_path("data"), sys.base_prefix, os.path.expanduser("~/.local")):
        if prefix:
            path = Path(prefix) / "share" / "dxflow" / "web"
            if path not in found:
                found.append(path)
    return found


def web_root() -> Path:
    """The console's folder; :class:`ConfigError` naming the places looked at when there is none."""
    tried = candidates()
    for path in tried:
        if (path / MARKER).is_file():
            return path
    raise ConfigError("the web console's files are not installed (looked in "
                      f"{', '.join(str(p) for p in tried)}); reinstall dxflow from its source tree")
