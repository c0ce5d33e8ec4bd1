"""MUNGE credentials: who (uid, gid) said what (a payload), vouched for by the cluster's ``munged``.

Every host of a cluster shares one MUNGE key, so a credential made on a node is decoded on the login
node with the uid of the process that made it — and only root can make a credential of uid 0. The
site service (docs/site.md) relies on that twice: the prolog, as root, vouches for an agent's
gateway key (:mod:`dxflow.enroll`), and every ``dxflow`` command proves its user to the site.

libmunge (``libmunge.so.2``) through ctypes is the fast way, one round trip to ``munged`` and no
process; the ``munge``/``unmunge`` commands are the fallback where the library is missing. Every
failure is a :class:`MungeError` (an :class:`~dxflow.errors.AuthError`) saying what went wrong:
expired, replayed, invalid, or ``munged`` not running. A replayed credential is refused here
although MUNGE still tells its payload: a credential proves something once.

Standard library only: the prolog's child imports it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from functools import lru_cache

from dxflow.errors import AuthError

#: libmunge's error codes (munge.h, ``munge_err_t``) that callers may want to tell apart.
SNAFU, BAD_ARG, SOCKET, TIMEOUT, BAD_CRED = 1, 2, 6, 7, 8
CRED_INVALID, CRED_EXPIRED, CRED_REWOUND, CRED_REPLAYED, CRED_UNAUTHORIZED = 14, 15, 16, 17, 18
#: libmunge's context options (munge.h, ``munge_opt_t``).
_OPT_TTL, _OPT_ADDR4, _OPT_ENCODE_TIME, _OPT_SOCKET = 4, 5, 6, 8
#: what each refusal means to the one who sees it, in words that say what to do.
_WHY = {
    SOCKET: "munged is not running (or its socket cannot be reached): start the munge service",
    TIMEOUT: "munged did not answer in time",
    BAD_CRED: "not a MUNGE credential",
    CRED_INVALID: "invalid credential (made with another MUNGE key, or altered)",
    CRED_EXPIRED: "the credential has expired (or the clocks of the hosts differ)",
    CRED_REWOUND: "the credential was made in the future (the clocks of the hosts differ)",
    CRED_REPLAYED: "the credential was already used (replayed)",
    CRED_UNAUTHORIZED: "this user may not decode the credential",
}
#: Seconds a ``munge``/``unmunge`` command may take (fallback only): munged answers in milliseconds.
COMMAND_TIMEOUT = 10.0


class MungeError(AuthError):
    """A MUNGE credential could not be made or was refused; ``code`` is libmunge's error number."""

    def __init__(self, message: str, code: int = SNAFU) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Credential:
    """What a decoded credential proves: the maker's uid and gid, its payload, where and when it was made."""

    uid: int
    gid: int
    payload: bytes
    encode_host: str  # the IPv4 address of the host that made it, as munged saw it
    encode_time: int  # seconds since the epoch
    ttl: int  # seconds it stays valid after encode_time


def encode(payload: bytes = b"", ttl: int | None = None, socket_path: str | None = None) -> str:
    """A new credential of this process's uid and gid carrying ``payload``, valid ``ttl`` seconds
    (None: munged's default, 300 s). MungeError when munged cannot make one."""
    lib = _library()
    if lib is not None:
        return _encode_lib(lib, payload, ttl, socket_path)
    return _encode_command(payload, ttl, socket_path)


def decode(credential: str, socket_path: str | None = None) -> Credential:
    """What ``credential`` proves; MungeError when it is invalid, expired, replayed or munged is away."""
    if not credential or not credential.isascii():
        raise MungeError("not a MUNGE credential", BAD_CRED)
    lib = _library()
    if lib is not None:
        return _decode_lib(lib, credential, socket_path)
    return _decode_command(credential, socket_path)


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("munge") or "libmunge.so.2"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    lib.munge_ctx_create.restype = ctypes.c_void_p
    lib.munge_ctx_destroy.argtypes = [ctypes.c_void_p]
    lib.munge_ctx_strerror.argtypes = [ctypes.c_void_p]
    lib.munge_ctx_strerror.restype = ctypes.c_char_p
    lib.munge_strerror.argtypes = [ctypes.c_int]
    lib.munge_strerror.restype = ctypes.c_char_p
    lib.munge_encode.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.munge_decode.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                 ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_uint),
                                 ctypes.POINTER(ctypes.c_uint)]
    # munge_ctx_set/get are variadic: their argument types are given at each call
    return lib


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


def _context(lib: ctypes.CDLL, socket_path: str | None) -> int:
    ctx = lib.munge_ctx_create()
    if not ctx:
        raise MungeError("libmunge could not allocate a context (out of memory)")
    if socket_path and lib.munge_ctx_set(ctypes.c_void_p(ctx), _OPT_SOCKET, ctypes.c_char_p(socket_path.encode())):
        lib.munge_ctx_destroy(ctx)
        raise MungeError(f"libmunge refused the socket path {socket_path!r}", BAD_ARG)
    return ctx


def _error(lib: ctypes.CDLL, ctx: int, err: int, doing: str) -> MungeError:
    detail = (lib.munge_ctx_strerror(ctx) or lib.munge_strerror(err) or b"").decode(errors="replace")
    why = _WHY.get(err, detail or f"error {err}")
    if detail and detail != why and err in (SOCKET, TIMEOUT):
        why += f" ({detail})"
    return MungeError(f"MUNGE {doing}: {why}", err)


def _encode_lib(lib: ctypes.CDLL, payload: bytes, ttl: int | None, socket_path: str | None) -> str:
    ctx = _context(lib, socket_path)
    out = ctypes.c_char_p()
    try:
        if ttl is not None and lib.munge_ctx_set(ctypes.c_void_p(ctx), _OPT_TTL, ctypes.c_int(int(ttl))):
            raise MungeError(f"libmunge refused the time to live {ttl!r}", BAD_ARG)
        buf = ctypes.create_string_buffer(payload, len(payload)) if payload else None
        err = lib.munge_encode(ctypes.byref(out), ctx, buf, len(payload))
        if err:
            raise _error(lib, ctx, err, "could not make a credential")
        return (out.value or b"").decode("ascii")
    finally:
        if out:  # munge_encode allocates the credential; the caller frees it
            _libc().free(ctypes.cast(out, ctypes.c_void_p))
        lib.munge_ctx_destroy(ctx)


def _decode_lib(lib: ctypes.CDLL, credential: str, socket_path: str | None) -> Credential:
    ctx = _context(lib, socket_path)
    buf, length = ctypes.c_void_p(), ctypes.c_int(0)
    uid, gid = ctypes.c_uint(0), ctypes.c_uint(0)
    try:
        err = lib.munge_decode(credential.encode("ascii"), ctx, ctypes.byref(buf), ctypes.byref(length),
                               ctypes.byref(uid), ctypes.byref(gid))
        if err:  # a replayed or expired credential still comes with its payload: never used
            raise _error(lib, ctx, err, "refused the credential")
        payload = ctypes.string_at(buf.value, length.value) if buf.value and length.value > 0 else b""
        when, ttl, addr = ctypes.c_long(0), ctypes.c_int(0), ctypes.c_uint32(0)
        pctx = ctypes.c_void_p(ctx)
        lib.munge_ctx_get(pctx, _OPT_ENCODE_TIME, ctypes.byref(when))
        lib.munge_ctx_get(pctx, _OPT_TTL, ctypes.byref(ttl))
        lib.munge_ctx_get(pctx, _OPT_ADDR4, ctypes.byref(addr))
        host = socket.inet_ntoa(bytes(addr))  # struct in_addr: network byte order, as stored
        return Credential(uid.value, gid.value, payload, host, when.value, ttl.value)
    finally:
        if buf.value:  # munge_decode allocates the payload; the caller frees it
            _libc().free(buf)
        lib.munge_ctx_destroy(ctx)


def _run(argv: list[str], data: bytes) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, input=data, capture_output=True, timeout=COMMAND_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as e:
        raise MungeError(f"MUNGE: {argv[0]} did not finish within {COMMAND_TIMEOUT:.0f} s", TIMEOUT) from e
    except OSError as e:
        raise MungeError(f"MUNGE: cannot run {argv[0]}: {e}; install munge", SNAFU) from e


def _command(name: str) -> str:
    path = shutil.which(name, path="/usr/bin:/usr/local/bin:/bin:/usr/sbin")
    if not path:
        raise MungeError(f"MUNGE: neither libmunge.so.2 nor the {name} command is installed: install munge")
    return path


def _encode_command(payload: bytes, ttl: int | None, socket_path: str | None) -> str:
    argv = [_command("munge"), "--input=-"]
    if ttl is not None:
        argv.append(f"--ttl={int(ttl)}")
    if socket_path:
        argv.append(f"--socket={socket_path}")
    done = _run(argv, payload)
    if done.returncode:
        why = _WHY.get(done.returncode, done.stderr.decode(errors="replace").strip())
        raise MungeError(f"MUNGE could not make a credential: {why}", done.returncode)
    return done.stdout.decode("ascii").strip()


#: ``unmunge``'s metadata lines (``UID:             alice (1001)``), then an empty line, then the payload.
_META = re.compile(rb"^([A-Z_]+):\s*(.*)$")


def _decode_command(credential: str, socket_path: str | None) -> Credential:
    argv = [_command("unmunge"), "--numeric"]
    if socket_path:
        argv.append(f"--socket={socket_path}")
    done = _run(argv, credential.encode("ascii"))
    if done.returncode:
        why = _WHY.get(done.returncode, done.stderr.decode(errors="replace").strip())
        raise MungeError(f"MUNGE refused the credential: {why}", done.returncode)
    head, _, payload = done.stdout.partition(b"\n\n")
    meta = {m.group(1).decode(): m.group(2).decode() for line in head.splitlines() if (m := _META.match(line))}
    try:
        return Credential(int(meta["UID"].split()[0]), int(meta["GID"].split()[0]), payload,
                          meta.get("ENCODE_HOST", "").split()[-1].strip("()"),
                          int(meta["ENCODE_TIME"].split()[0]), int(meta.get("TTL", "0")))
    except (KeyError, ValueError, IndexError) as e:
        raise MungeError(f"MUNGE: unexpected output of unmunge: {head[:200]!r}") from e
