"""The agent's own RSA key, made in a short-lived process that has cryptography.

Making a 2048-bit key in pure Python (python-rsa) takes seconds; cryptography takes a few
milliseconds but would stay resident in the agent's worker (~11 MiB with PyJWT). So the worker
starts ``python -I -m dxflow.agent.keygen`` as it boots (:func:`start`), loads its app meanwhile,
and reads the key from it (:meth:`Making.key`): the process's memory is gone when it exits.

The user's key pair (``~/.dxflow/id_rsa``, made on first use, as the master would make it) is made
the same way (``--user-key BASE``) when it is missing; when it is there, the agent only checks its
mode and reads its public half, as :func:`dxflow.auth.user_key` and ``user_public_key`` would.

Output: the private key as PKCS#1 PEM (``RSA PRIVATE KEY``, what python-rsa reads), then its public
half as ``PUBLIC KEY`` PEM (what registrations carry); with ``--user-key``, the user's public key.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dxflow import layout
from dxflow.errors import ConfigError
from dxflow.signatures import KEY_BITS, check_key_file, load_private_key

if TYPE_CHECKING:
    import rsa

#: seconds the key may take (it takes ~0.1 s; a node that is swapping hard still gets it)
TIMEOUT = 60.0
PUBLIC_BEGIN = "-----BEGIN PUBLIC KEY-----"


def _argv(*args: str) -> list[str]:
    # -I: the job's PYTHONPATH and the user's site packages have no say in what makes the key
    return [sys.executable, "-I", "-m", "dxflow.agent.keygen", *args]


@dataclass
class Making:
    """A key being made by its own process (:func:`start`)."""

    proc: subprocess.Popen

    def key(self) -> tuple[rsa.PrivateKey, str]:
        """(the private key, PEM of its public half) once the process has printed them."""
        out = _finish(self.proc, "the agent's key")
        private, sep, public = out.partition(PUBLIC_BEGIN)
        if not sep:
            raise ConfigError(f"the agent's key could not be made: {sys.executable} -m dxflow.agent.keygen "
                              "printed no public key")
        return load_private_key(private.encode()), sep + public


def start() -> Making:
    """Start making the agent's key; :meth:`Making.key` waits for it."""
    return Making(subprocess.Popen(_argv(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, cwd="/", text=True))


def user_public_key(base: Path) -> str:
    """PEM of the user's public key in ``base`` (``~/.dxflow``), the key pair made if it is missing.

    ConfigError if the private key is readable by others, or (when it had to be read) not a key.
    """
    private, public = base / layout.KEY, base / layout.PUBLIC_KEY
    if private.exists() and public.exists():
        check_key_file(private)
        return public.read_text()
    proc = subprocess.Popen(_argv("--user-key", str(base)), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd="/", text=True)
    return _finish(proc, "the user's key")


def _finish(proc: subprocess.Popen, what: str) -> str:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise ConfigError(f"{what} could not be made: no answer within {TIMEOUT:.0f} s") from None
    if proc.returncode != 0:
        lines = err.strip().splitlines()
        raise ConfigError(lines[-1] if lines else f"{what} could not be made (exit {proc.returncode})")
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["--user-key"] and len(argv) == 2:
        from dxflow import auth

        base = Path(argv[1])
        try:
            auth.user_key(base)  # made if missing; refused (ConfigError) if open to others or not a key
            print(auth.user_public_key(base), end="")
        except ConfigError as e:
            print(e, file=sys.stderr)
            return e.exit_code
        return 0
    if argv:
        print("usage: python -m dxflow.agent.keygen [--user-key BASE]", file=sys.stderr)
        return 2
    # cryptography alone: dxflow.auth would bring PyJWT along, and this is on the way to "agent answering"
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    sys.stdout.write(private.decode() + public.decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
