"""Shared test setup. Unit tests run anywhere; tests marked ``lab`` need the real lab cluster
(``dxflow lab up`` as root) and run as its users through ``runuser``."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
