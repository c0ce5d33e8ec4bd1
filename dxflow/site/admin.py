"""The site admin's commands: ``dxflow site init`` (as root, once), ``site serve``, ``site status``.

``init`` makes what the service needs and publishes what everyone else pins (docs/site.md):

=======================  ==========================  =========================================
private, in state_dir    0600, the service account   published in publish_dir (0644, root)
=======================  ==========================  =========================================
``gateway_host_key``     Ed25519 (OpenSSH format)    ``gateway_host_key.pub`` (agents pin it)
``token_key.pem``        RSA, signs agents' tokens   ``token_key.pem`` (its public half: agents)
``tls.key``/``tls.pem``  self-signed certificate     ``tls.pem`` (the CLI pins it over https)
=======================  ==========================  =========================================

Running it again changes nothing that exists (a new key would break every pin); it fixes owners and
modes, and publishes again what is missing. The CLI reaches this module and the site's client only
(tests/unit/test_import_rules.py).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pwd
import socket
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from dxflow.auth import new_key, private_pem, public_pem
from dxflow.errors import ConfigError, UsageError
from dxflow.site.config import GATEWAY_HOST_KEY, TLS_CERT, TOKEN_KEY, SiteServiceConfig, host_port

#: days the self-signed certificate is valid (the CLI pins the certificate itself, not a CA)
TLS_DAYS = 3650


@dataclass
class InitReport:
    made: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    published: list[str] = field(default_factory=list)


def init(config: SiteServiceConfig, extra_names: list[str] | None = None) -> InitReport:
    """Make the state folder, keys and certificate, publish the public halves (as root; idempotent)."""
    if os.geteuid() != 0:
        raise UsageError("`dxflow site init` runs as root: it makes the service account's private folder "
                         f"{config.state_dir} and publishes keys in {config.publish_dir}")
    try:
        account = pwd.getpwnam(config.service_user)
    except KeyError:
        raise ConfigError(f"no account {config.service_user!r} for the site service: create it first "
                          f"(useradd --system --home-dir {config.state_dir} --shell /usr/sbin/nologin "
                          f"{config.service_user})") from None
    if account.pw_uid == 0:
        raise ConfigError(f"service_user {config.service_user!r} is root: the site service never runs as root")
    report = InitReport()
    state, publish = config.state, config.publish
    state.mkdir(parents=True, exist_ok=True)
    os.chown(state, account.pw_uid, account.pw_gid)
    os.chmod(state, 0o700)
    publish.mkdir(parents=True, exist_ok=True)
    os.chmod(publish, 0o755)

    def private(path: Path, make) -> bytes:
        if path.exists():
            report.kept.append(str(path))
            data = path.read_bytes()
        else:
            data = make()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            report.made.append(str(path))
        os.chown(path, account.pw_uid, account.pw_gid)
        os.chmod(path, 0o600)
        return data

    def public(name: str, data: bytes) -> None:
        path = publish / name
        if not path.exists() or path.read_bytes() != data:
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_bytes(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
            report.published.append(str(path))

    host_key = private(config.gateway_host_key, _new_host_key)
    public(GATEWAY_HOST_KEY + ".pub", _host_public(host_key))
    token_key = private(config.token_key, lambda: private_pem(new_key()))
    signing = serialization.load_pem_private_key(token_key, None)
    if not isinstance(signing, rsa.RSAPrivateKey):
        raise ConfigError(f"{config.token_key} is not an RSA key: move it away and run `dxflow site init` again")
    public(TOKEN_KEY, public_pem(signing).encode())
    tls_key = private(config.tls_key, _new_tls_key)
    cert = private(config.tls_cert, lambda: _self_signed(tls_key, names(config, extra_names or [])))
    os.chmod(config.tls_cert, 0o644)
    public(TLS_CERT, cert)
    return report


def names(config: SiteServiceConfig, extra: list[str]) -> list[str]:
    """Host names and addresses the certificate is for: this host's, each listen address, and ``extra``."""
    out = ["localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn()]
    for address in (config.listen, config.console_listen):
        host, _ = host_port(address)
        if host not in ("0.0.0.0", "::"):
            out.append(host)
    return list(dict.fromkeys(out + extra))


def _new_host_key() -> bytes:
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())


def _host_public(private_openssh: bytes) -> bytes:
    key = serialization.load_ssh_private_key(private_openssh, password=None)
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + b" dxflow-site\n"


def _new_tls_key() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _self_signed(key_pem: bytes, hosts: list[str]) -> bytes:
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    alt: list[x509.GeneralName] = []
    for name in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dxflow site service")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=TLS_DAYS))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


# -- serve -------------------------------------------------------------------------------------------
def drop_to(user: str) -> None:
    """Become ``user`` (root only): groups, gid, uid, HOME; a process that cannot get back."""
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"no account {user!r} to run the site service as") from None
    if account.pw_uid == 0:
        raise UsageError("--user root: the site service never runs as root")
    os.initgroups(user, account.pw_gid)
    os.setgid(account.pw_gid)
    os.setuid(account.pw_uid)
    os.environ.update(HOME=account.pw_dir, USER=user, LOGNAME=user)


def serve(config: SiteServiceConfig, user: str | None = None) -> int:
    if user and os.geteuid() == 0:
        drop_to(user)
    elif user and pwd.getpwuid(os.geteuid()).pw_name != user:
        raise UsageError(f"--user {user}: only root can switch to another account")
    from dxflow.site import server  # gunicorn, flask, the fleet: only the service loads them

    return server.serve(config)


# -- status ------------------------------------------------------------------------------------------
def status(config: SiteServiceConfig) -> dict:
    """What an admin checks first: the files init makes, whether each listener answers, the database."""
    files = {}
    for path in (config.gateway_host_key, config.token_key, config.tls_key, config.tls_cert):
        files[str(path)] = _exists(path)
    for name in (GATEWAY_HOST_KEY + ".pub", TOKEN_KEY, TLS_CERT):
        files[str(config.publish / name)] = _exists(config.publish / name)
    listeners = {key: _answers(getattr(config, key)) for key in ("listen", "console_listen", "gateway_listen")}
    return {"replica": config.replica_name, "listeners": listeners, "files": files,
            "database": "postgresql" if config.database else f"sqlite {config.database_url}",
            "clusters": {name: c.scheduler for name, c in sorted(config.clusters.items())},
            "running": all(listeners.values())}


def _exists(path: Path) -> str:
    try:
        st = path.stat()
    except PermissionError:
        return "present (not readable by this account)"
    except FileNotFoundError:
        return "missing: run `dxflow site init`"
    return f"present, mode {st.st_mode & 0o777:o}, owner uid {st.st_uid}"


def _answers(address: str, timeout: float = 2.0) -> bool:
    host, port = host_port(address)
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
