"""An agent's enrollment with the site service's gateways: a key of its own, vouched for by root.

Where ``site_gateways`` is set (docs/site.md), the prolog's launcher (:mod:`dxflow.adopt`), still
root, makes for the agent it is about to become

* a **gateway key** (Ed25519): the agent logs in to every gateway with it (SSH user name = the
  agent's name, ``CLUSTER.JOB.NODE``);
* a **MUNGE credential of uid 0** whose payload names the job, the node, the job's user and the
  gateway key (:func:`payload`). Only root can make a credential of uid 0: a user's own
  ``munge`` makes one of their uid, which the gateway refuses.

Both go to the agent in one file, 0600 and owned by the job's user (written after root is gone:
:func:`write`), whose path the agent finds in ``$DXFLOW_GATEWAY_ENROLLMENT``; the agent reads it
once and removes it (:func:`take`). A gateway that does not know the key yet takes the credential
as the SSH password, together with the key's public half and its signature over the SSH session's id
(:func:`password`): proof that the one who presents the credential holds the key it names, on this
very connection. The gateway's checks are :func:`offer` (before ``munged`` is asked: the password's
shape and the signature) and :func:`claim` (on what ``munged`` decoded); the rest (the decode kept
for retries, the scheduler's word, the store) is :mod:`dxflow.site.enrollment`'s.

Standard library at import: the agent's gunicorn arbiter imports this module and must stay small;
``cryptography`` is imported where a key is made, signed with or checked.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dxflow import munge
from dxflow.config import agent_name
from dxflow.errors import AuthError

#: The agent's environment variable naming its enrollment file.
ENV = "DXFLOW_GATEWAY_ENROLLMENT"
#: Seconds the credential stays valid: munged's longest (-1; 3600 s unless munged's --max-ttl says
#: otherwise), so that an agent whose gateways are all down when its job starts can still enroll later.
CREDENTIAL_TTL = -1
#: What the agent signs, followed by the SSH session id: a signature for nothing else.
SIGNED = b"dxflow-gateway-enrollment\x00"
#: Version of the payload's layout.
PAYLOAD_VERSION = 1
#: The SSH global request that carries an agent's registration (JSON) to a gateway after it logged in.
REGISTER = "dxflow-register@dxflow"
#: An agent's name as the gateway takes it (CLUSTER.JOB.NODE: PBS job ids have dots, LSF's brackets).
NAME = re.compile(r"[A-Za-z0-9][\w.+@:\[\]-]{2,254}\Z", re.ASCII)
#: A MUNGE credential's text (base64 between "MUNGE:" and ":"), of a length munged would make.
CREDENTIAL = re.compile(r"MUNGE:[A-Za-z0-9+/]+={0,2}:\Z")
CREDENTIAL_MAX = 16384


@dataclass(frozen=True)
class Enrollment:
    """What the agent gets from the prolog."""

    name: str  # the agent's name, CLUSTER.JOB.NODE: its SSH user name at the gateways
    private_key: str  # the gateway key, OpenSSH PEM
    public_key: str  # its public half, one OpenSSH line ("ssh-ed25519 AAAA...")
    credential: str  # the root MUNGE credential over :func:`payload`
    made: float = 0.0  # when the credential was made (epoch seconds): the agent enrolls within its TTL

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass(frozen=True)
class Offer:
    """An enrollment password whose shape and signature hold, before ``munged`` is asked anything."""

    credential: str  # the MUNGE credential's text, not decoded yet
    public_key: str  # the key the password was signed with, one OpenSSH line
    key: str  # its fingerprint (:func:`fingerprint`)


@dataclass(frozen=True)
class Claim:
    """What a gateway learns from a checked enrollment password."""

    cluster: str
    job: str
    node: str
    user: str
    key: str  # SHA256 fingerprint of the gateway key (:func:`fingerprint`)
    public_key: str
    credential: munge.Credential


def fingerprint(public_key: str | bytes) -> str:
    """``SHA256:<base64>`` of an SSH public key, as ``ssh-keygen -l`` prints it: from its OpenSSH
    line, or from its wire-format blob (what paramiko's ``PKey.asbytes()`` gives)."""
    if isinstance(public_key, str):
        parts = public_key.split()
        if len(parts) < 2:
            raise ValueError("not an OpenSSH public key line")
        blob = base64.b64decode(parts[1], validate=True)
    else:
        blob = public_key
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def payload(cluster: str, job: str, node: str, user: str, public_key: str) -> bytes:
    """What root vouches for: this job's agent on this node, of this user, holds this key."""
    return json.dumps({"v": PAYLOAD_VERSION, "cluster": cluster, "job": job, "node": node, "user": user,
                       "key": fingerprint(public_key), "public_key": public_key}, sort_keys=True).encode()


def make(cluster: str, job: str, node: str, user: str) -> Enrollment:
    """A new gateway key and root's credential for it (root only: anyone else's credential is refused);
    :class:`~dxflow.munge.MungeError` when munged cannot make one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    made = time.time()
    credential = munge.encode(payload(cluster, job, node, user, public), ttl=CREDENTIAL_TTL)
    return Enrollment(agent_name(cluster, job, node), private, public, credential, made)


def write(folder: Path, enrollment: Enrollment) -> Path:
    """Write the enrollment as a new file of mode 0600 in ``folder`` (made 0700 if missing), as the
    calling user: never as root, in a home root must not write to (root-squashed, or a link the
    user put there)."""
    folder.parent.mkdir(mode=0o700, exist_ok=True)  # ~/.dxflow on a first job: private, as dxflow.layout makes it
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / f"{enrollment.name}.gateway.{secrets.token_hex(4)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(enrollment.to_json())
    return path


def take(path: str | Path) -> Enrollment:
    """Read the enrollment the prolog wrote and remove its file (the agent keeps it in memory).
    ValueError or OSError when it is missing, not the caller's, open to others, or garbled."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise ValueError(f"{path} is not this user's alone (uid {st.st_uid}, mode {st.st_mode & 0o777:o})")
        with os.fdopen(fd, "r") as f:
            fd = -1
            data = json.load(f)
    finally:
        if fd >= 0:
            os.close(fd)
    path.unlink(missing_ok=True)
    return Enrollment(**{k: str(data[k]) for k in ("name", "private_key", "public_key", "credential")},
                      made=float(data.get("made", 0.0)))


def password(enrollment: Enrollment, session_id: bytes) -> str:
    """The SSH password that enrolls: the credential, the key's signature over this session's id, and
    the key's public half (base64 of its SSH blob), separated by spaces."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = serialization.load_ssh_private_key(enrollment.private_key.encode(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError("the gateway key is not an Ed25519 key")
    signature = base64.b64encode(key.sign(SIGNED + session_id)).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{enrollment.credential} {signature} {public.decode().split()[1]}"


def offer(username: str, password_text: str, session_id: bytes) -> Offer:
    """The checks that need no ``munged`` (a refused password leaves the credential undecoded, good for
    the agent's next try), or AuthError: ``username`` is an agent's name, the password is a credential,
    a signature and an Ed25519 key, and that key signed this very SSH session."""
    if not NAME.match(username):
        raise AuthError(f"enrollment of {username[:80]!r} refused: not an agent's name (CLUSTER.JOB.NODE)")
    parts = password_text.split(" ")
    if len(parts) != 3 or len(parts[0]) > CREDENTIAL_MAX or not CREDENTIAL.match(parts[0]):
        raise AuthError(f"enrollment of {username} refused: the password is not a MUNGE credential, a signature "
                        "and a key (an agent of another dxflow version?)")
    credential, signature, blob = parts
    public_key = f"ssh-ed25519 {blob}"
    try:
        key = fingerprint(public_key)
    except ValueError as e:  # binascii.Error is a ValueError
        raise AuthError(f"enrollment of {username} refused: the password's key is not base64") from e
    _check_signature(username, public_key, signature, session_id)
    return Offer(credential, public_key, key)


def claim(username: str, offered: Offer, cred: munge.Credential) -> Claim:
    """What the decoded credential of ``offered`` vouches for, or AuthError: root's (uid 0), an
    enrollment payload naming exactly the agent ``username`` and the very key that signed the session.
    Whether the job runs there is the scheduler's to say (the gateway asks)."""
    if cred.uid != 0:
        raise AuthError(f"enrollment of {username} refused: the credential is of uid {cred.uid}, not root's "
                        "(only the prolog enrolls an agent)")
    try:
        data = json.loads(cred.payload)
        if not isinstance(data, dict) or data.get("v") != PAYLOAD_VERSION:
            raise ValueError("not an enrollment payload")
        fields = {k: data[k] for k in ("cluster", "job", "node", "user", "key", "public_key")}
        if not all(isinstance(v, str) and v for v in fields.values()):
            raise ValueError("a field is empty or not text")
        key_ok = fingerprint(fields["public_key"]) == fields["key"]
    except (ValueError, KeyError, TypeError) as e:
        raise AuthError(f"enrollment of {username} refused: the credential's payload is not an enrollment ({e})") from e
    if agent_name(fields["cluster"], fields["job"], fields["node"]) != username:
        raise AuthError(f"enrollment of {username} refused: the credential is for agent "
                        f"{agent_name(fields['cluster'], fields['job'], fields['node'])}")
    if not key_ok:
        raise AuthError(f"enrollment of {username} refused: the payload's key and fingerprint differ")
    if fields["key"] != offered.key:
        raise AuthError(f"enrollment of {username} refused: the session was signed by key {offered.key}, the "
                        f"credential names {fields['key']} (the credential is the agent's, this connection is not)")
    return Claim(credential=cred, **fields)


def _check_signature(username: str, public_key: str, signature: str, session_id: bytes) -> None:
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        key = serialization.load_ssh_public_key(public_key.encode())
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise ValueError("not an Ed25519 key")
        key.verify(base64.b64decode(signature, validate=True), SIGNED + session_id)
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError) as e:
        raise AuthError(f"enrollment of {username} refused: no valid signature of this session by the key the "
                        "password offers") from e
