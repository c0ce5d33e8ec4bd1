"""The gateway's enrollment of an agent: the prolog's root credential, decoded by ``munged`` once for all replicas.

``munged`` decodes a credential once (its replay cache): a second decode, on any replica of the same
host, is "replayed". An agent's first try may fail after the decode for reasons that pass (the
scheduler does not list the job yet, the store is busy), and an agent dials every replica; so the
first replica to decode a credential records what ``munged`` said (uid, gid, payload, when it was
made, its time to live) in the store, keyed by the SHA-256 of the credential's text (table
:data:`DECODES`), and every later try of the same credential, on any replica, within its time to
live, uses that record instead of ``munged``. Nothing is given away by that: every try must still
carry the signature, by the key the credential names, of ITS OWN SSH session (:func:`dxflow.enroll.offer`,
:func:`dxflow.enroll.claim`), so a credential without its key is worth nothing, the first time or
the tenth. Only root's decodes are recorded (anyone else's is refused for good anyway), and a record
is dropped when the credential expires.

In order, each step before anything costly (:meth:`Enroller.admit`):

1. the password's shape and the signature of this session by the key it offers (no ``munged``);
2. the store: an agent of that name already enrolled with that key is let in as by its key (a
   replica raced another). A store that cannot answer refuses the login, the credential untouched;
3. the credential's decode: the store's record, else ``munged`` (then recorded);
4. the decode: uid 0, names this agent and the offered key; the job's user exists and is not root;
5. the scheduler says the job runs on that node (asked for up to :data:`ENROLL_WAIT` seconds);
6. ``store.enroll`` records the agent with its key: later logins are by key.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import pwd
import threading
import time
from typing import Any

from dxflow import enroll, munge
from dxflow.errors import AuthError, DxflowError

log = logging.getLogger(__name__)

#: Seconds an enrollment waits for the scheduler to say the job runs on the node (it may be
#: allocating still), asking every :data:`ENROLL_ASK_EVERY` seconds.
ENROLL_WAIT = 10.0
ENROLL_ASK_EVERY = 2.0
#: Seconds a replica waits for another's record of a credential ``munged`` calls replayed (the other
#: decoded it a moment ago and is writing the record), looking every :data:`REPLAYED_LOOK_EVERY`.
REPLAYED_WAIT = 2.0
REPLAYED_LOOK_EVERY = 0.25
#: Decodes this replica keeps in memory too (a store that failed to record one: this replica's next try).
REMEMBERED = 4096
#: Expired records are swept this often at most.
SWEEP_EVERY = 60.0

DECODES = """
CREATE TABLE IF NOT EXISTS site_enrollment_decodes (
    credential TEXT PRIMARY KEY,
    uid BIGINT NOT NULL,
    gid BIGINT NOT NULL,
    payload TEXT NOT NULL,
    encode_host TEXT NOT NULL,
    encode_time BIGINT NOT NULL,
    ttl BIGINT NOT NULL,
    expires DOUBLE PRECISION NOT NULL
)"""
_COLUMNS = "uid, gid, payload, encode_host, encode_time, ttl"


class Enroller:
    """Enrollments on one replica; ``store`` is the site's (shared by replicas), ``fleet`` asks the schedulers."""

    def __init__(self, store: Any, fleet: Any) -> None:
        self.store = store
        self.fleet = fleet
        store.ddl([DECODES])
        self._remembered: dict[str, munge.Credential] = {}
        self._lock = threading.Lock()
        self._swept = 0.0

    def admit(self, username: str, password: str, session_id: bytes, peer: str) -> str:
        """Let the agent ``username`` in by its enrollment password (module docstring): "known" when the
        store already holds the key it signed with, "enrolled" when it is recorded now. AuthError when
        refused; DxflowError when the store failed (the agent tries again later)."""
        offered = enroll.offer(username, password, session_id)
        agent = self.store.agent(username)
        if agent is not None and agent.gateway_key == offered.key:
            log.info("gateway: %s from %s let in by its enrolled key %s (enrolled on another replica or an "
                     "earlier try)", username, peer, offered.key)
            return "known"
        claim = enroll.claim(username, offered, self.decoded(offered.credential))
        try:
            uid = pwd.getpwnam(claim.user).pw_uid
        except KeyError as e:
            raise AuthError(f"enrollment of {username} refused: no user {claim.user!r} here") from e
        if uid == 0:
            raise AuthError(f"enrollment of {username} refused: agents never run as root")
        deadline = time.monotonic() + ENROLL_WAIT
        while not self.fleet.job_runs(claim.cluster, claim.job, claim.node, claim.user):
            if time.monotonic() + ENROLL_ASK_EVERY > deadline:
                raise AuthError(f"enrollment of {username} refused: {claim.cluster} does not say job {claim.job} "
                                f"of {claim.user} runs on {claim.node} (the agent may try again with the same "
                                "credential)")
            time.sleep(ENROLL_ASK_EVERY)
        self.store.enroll(claim.cluster, claim.job, claim.node, claim.user, uid, claim.key)
        log.info("gateway: enrolled %s of %s (key %s) from %s", username, claim.user, claim.key, peer)
        return "enrolled"

    def decoded(self, credential: str) -> munge.Credential:
        """What ``munged`` said of ``credential`` the first time any replica asked (MungeError if it
        refused it, or its time to live is over); DxflowError when the store cannot say, before
        ``munged`` is asked (the credential stays good for the next try)."""
        digest = hashlib.sha256(credential.encode()).hexdigest()
        cred = self._recall(digest)
        if cred is None:
            try:
                cred = munge.decode(credential)
            except munge.MungeError as e:
                if e.code != munge.CRED_REPLAYED:
                    raise
                cred = self._await_record(digest, e)  # another replica of this host decoded it just now
            else:
                if cred.uid == 0:
                    self._record(digest, cred)
                return cred
        if time.time() > _expires(cred):
            raise munge.MungeError("MUNGE refused the credential: the credential has expired", munge.CRED_EXPIRED)
        return cred

    def _await_record(self, digest: str, replayed: munge.MungeError) -> munge.Credential:
        deadline = time.monotonic() + REPLAYED_WAIT
        while time.monotonic() < deadline:
            time.sleep(REPLAYED_LOOK_EVERY)
            cred = self._recall(digest)
            if cred is not None:
                return cred
        raise replayed

    def _recall(self, digest: str) -> munge.Credential | None:
        with self._lock:
            cred = self._remembered.get(digest)
        if cred is not None:
            return cred
        row = self.store.query_one(f"SELECT {_COLUMNS} FROM site_enrollment_decodes WHERE credential = ?", (digest,))
        if row is None:
            return None
        uid, gid, payload, host, when, ttl = row
        return munge.Credential(int(uid), int(gid), base64.b64decode(payload), host, int(when), int(ttl))

    def _record(self, digest: str, cred: munge.Credential) -> None:
        """In memory, and in the store for the other replicas (a store error is logged: this replica
        still has it, and the others' ``munged`` calls it replayed until the agent comes back here)."""
        now = time.time()
        with self._lock:
            if len(self._remembered) >= REMEMBERED:
                for k in [k for k, c in self._remembered.items() if _expires(c) < now] or list(self._remembered)[:1]:
                    del self._remembered[k]
            self._remembered[digest] = cred
        try:
            if now - self._swept > SWEEP_EVERY:
                self._swept = now
                self.store.execute("DELETE FROM site_enrollment_decodes WHERE expires < ?", (now,))
            self.store.execute(
                f"INSERT INTO site_enrollment_decodes (credential, {_COLUMNS}, expires) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (credential) DO NOTHING",
                (digest, cred.uid, cred.gid, base64.b64encode(cred.payload).decode(), cred.encode_host,
                 cred.encode_time, cred.ttl, _expires(cred)))
        except DxflowError as e:
            log.error("gateway: cannot record a decoded enrollment credential in the store (other replicas will "
                      "see it replayed until the agent tries this one again): %s", e)


def _expires(cred: munge.Credential) -> float:
    return float(cred.encode_time + max(cred.ttl, 0))
