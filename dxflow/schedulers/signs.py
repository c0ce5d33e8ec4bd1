"""Whether a job runs on this node, from a look at the files its scheduler's daemon keeps there (issue #11).

Each adapter lists its signs as data (:attr:`dxflow.schedulers.base.Scheduler.local_signs`, each with its
source); :func:`look` looks for them. No controller call, and nothing but a ``stat`` (or the listing of
one local folder, for a sign with a wildcard) per sign.
"""

from __future__ import annotations

import enum
import glob
import os
from dataclasses import dataclass
from typing import Mapping, Sequence


class Presence(str, enum.Enum):
    """What a look at the job's node tells about the job there (:meth:`Scheduler.job_here`)."""

    LASTING = "lasting"   # a sign kept for the job's whole life on this node is there: it runs here
    PASSING = "passing"   # only the sign of a passing part of it (a step) is there: it runs here now
    ABSENT = "absent"     # the signs' folders can be looked at and none is there
    UNKNOWN = "unknown"   # no sign known, or none can be looked at: only the controller can tell


@dataclass(frozen=True)
class LocalSign:
    """A path the scheduler's daemon on a node keeps while a job, or a part of it, runs there, and which
    the job's user can see. ``pattern``: a glob (wildcards in its last part only) with ``{job}``,
    ``{node}``, ``{uid}``, ``{user}`` and the adapter's own fields (:meth:`Scheduler.local_sign_fields`).
    ``lasting``: there from the job's start on the node to its end there, so that its absence, once it
    was seen, means the job ended here. ``user_owned``: the daemon makes it as the job's user, so a
    match owned by anyone else (made first, by another user, in a shared folder such as /tmp) does not
    count. ``source``: where this is written down. A sign whose fields the adapter cannot tell on this
    node (:meth:`Scheduler.local_sign_fields` leaves them out) is not looked for."""

    pattern: str
    lasting: bool
    source: str
    user_owned: bool = False


def look(signs: Sequence[LocalSign], values: Mapping[str, str]) -> Presence:
    """Look for ``signs`` with their fields filled from ``values``, as this process's user."""
    escaped = {k: glob.escape(v) for k, v in values.items()}  # a value's [ ] * ? are not wildcards
    looked = passing = False
    for sign in signs:
        try:
            folder = os.path.dirname(sign.pattern.format(**values)) or "."
        except KeyError:
            continue  # a field the adapter cannot tell here: this sign is not looked for
        wildcard = any(c in os.path.basename(sign.pattern) for c in "*?[")
        # a folder that cannot be listed (or entered) tells nothing: never read it as "absent"
        if not os.access(folder, os.R_OK | os.X_OK if wildcard else os.X_OK):
            continue
        looked = True
        found = glob.glob(sign.pattern.format(**escaped))
        if sign.user_owned:
            found = [p for p in found if _owner(p) == os.getuid()]
        if found:
            if sign.lasting:
                return Presence.LASTING
            passing = True
    if passing:
        return Presence.PASSING
    return Presence.ABSENT if looked else Presence.UNKNOWN


def _owner(path: str) -> int:
    try:
        return os.lstat(path).st_uid
    except OSError:
        return -1
