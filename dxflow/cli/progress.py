"""Progress bars for transfers: tqdm on a terminal's stderr, nothing anywhere else."""

from __future__ import annotations

import sys


class _Silent:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def bar(total: int, initial: int = 0, desc: str = "", enabled: bool = True):
    """A byte counter shown on stderr while it is a terminal (pipes and logs stay clean)."""
    if not enabled or not sys.stderr.isatty():
        return _Silent()
    from tqdm import tqdm  # only when a bar is shown: the CLI must start fast

    if len(desc) > 30:
        desc = "…" + desc[-29:]
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, dynamic_ncols=True, leave=True, miniters=1, mininterval=0.2)
