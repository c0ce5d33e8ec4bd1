"""The CLI's client of the site service (dxflow.site.client): replicas tried in order, https pinned to
the published certificate, a fresh MUNGE credential bound to each request — against real TLS servers on
loopback and this host's real munged; and the factory every command uses (dxflow.cli.service)."""

from __future__ import annotations

import datetime as dt
import http.server
import ipaddress
import json
import os
import shutil
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dxflow import config, munge
from dxflow.cli.service import service
from dxflow.errors import ConfigError, MasterUnavailable, NotFound
from dxflow.master.client import MasterClient
from dxflow.site.client import SiteClient, request_payload

needs_munged = pytest.mark.skipif(not Path("/run/munge/munge.socket.2").exists() or not shutil.which("unmunge"),
                                  reason="needs a running munged (the lab's)")


def make_cert(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, as `dxflow site init` makes the site's."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "tls.pem", folder / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every request with what it saw: method, target, Authorization."""

    def do_GET(self) -> None:
        self.answer()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.answer()

    def answer(self) -> None:
        if self.path.startswith("/missing"):
            body = json.dumps({"error": "NotFound", "message": "no such job: 7"}).encode()
            self.send_response(404)
        else:
            body = json.dumps({"method": self.command, "target": self.path,
                               "authorization": self.headers.get("Authorization"),
                               "replica": self.server.name}).encode()  # type: ignore[attr-defined]
            self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def serve(cert: Path | None, key: Path | None, name: str) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    server.name = name  # type: ignore[attr-defined]
    if cert is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there now
    return port


@pytest.fixture
def site(tmp_path):
    """A replica over https with the published certificate in tmp_path/keys."""
    cert, key = make_cert(tmp_path / "keys", "site")
    server = serve(cert, key, "a")
    yield f"https://127.0.0.1:{server.server_address[1]}", tmp_path / "keys"
    server.shutdown()
    server.server_close()


def credential_of(method: str, target: str) -> str:
    return f"cred-for {method} {target}"


def test_every_request_carries_its_own_proof_bound_to_method_and_target(site):
    url, keys = site
    client = SiteClient([url], keys, credential=credential_of)
    got = client.json("GET", "/api/agents?all=1")
    assert got["authorization"] == "MUNGE cred-for GET /api/agents?all=1"
    assert client.json("POST", "/api/console/token", {})["authorization"] == "MUNGE cred-for POST /api/console/token"
    conn = client.connection()  # a request driven by hand gets one too (dxflow cp's uploads, fan-out)
    conn.request("GET", "/api/fleet/1/-/api/node")
    assert json.loads(conn.getresponse().read())["authorization"] == "MUNGE cred-for GET /api/fleet/1/-/api/node"
    conn.close()


def test_a_dead_replica_is_skipped_with_one_line_on_stderr(site, capsys):
    url, keys = site
    dead = f"https://127.0.0.1:{dead_port()}"
    client = SiteClient([dead, url], keys, credential=credential_of)
    assert client.json("GET", "/api/master")["replica"] == "a"
    assert client.json("GET", "/api/master")["replica"] == "a"
    err = capsys.readouterr().err
    assert err.count("does not answer") == 1 and dead in err


def test_no_replica_answering_is_master_unavailable_naming_the_url(tmp_path):
    make_cert(tmp_path / "keys", "site")
    dead = f"https://127.0.0.1:{dead_port()}"
    with pytest.raises(MasterUnavailable, match=f"the site service at {dead} does not answer"):
        SiteClient([dead], tmp_path / "keys", credential=credential_of).json("GET", "/api/master")
    assert SiteClient([dead], tmp_path / "keys", credential=credential_of).info() is None


def test_a_replica_with_another_certificate_is_refused(site, tmp_path):
    """A server showing any certificate but the published one (here: another self-signed one for the
    same address) is not talked to: no credential leaves."""
    _, keys = site
    other_cert, other_key = make_cert(tmp_path / "other", "impostor")
    impostor = serve(other_cert, other_key, "impostor")
    try:
        client = SiteClient([f"https://127.0.0.1:{impostor.server_address[1]}"], keys, credential=credential_of)
        with pytest.raises(MasterUnavailable, match="TLS"):
            client.json("GET", "/api/master")
    finally:
        impostor.shutdown()
        impostor.server_close()


def test_error_answers_are_the_masters_errors(site):
    url, keys = site
    with pytest.raises(NotFound, match="no such job: 7"):
        SiteClient([url], keys, credential=credential_of).json("GET", "/missing")


def test_plain_http_only_on_loopback(tmp_path):
    with pytest.raises(ConfigError, match="loopback"):
        SiteClient(["http://10.77.0.1:8470"], tmp_path)
    with pytest.raises(ConfigError, match="expected https"):
        SiteClient(["ftp://login1"], tmp_path)
    SiteClient(["http://127.0.0.1:8470", "http://[::1]:8470", "http://localhost:8470"], tmp_path)


def test_raw_sockets_get_the_header_for_their_upgrade(site):
    url, keys = site
    client = SiteClient([url], keys, credential=credential_of)
    assert client.auth_headers("GET", "/api/forward/1/-/80") == [("Authorization", "MUNGE cred-for GET /api/forward/1/-/80")]
    sock = client.socket(timeout=10)
    try:
        sock.sendall(b"GET /api/master HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.0 200")
    finally:
        sock.close()
    assert MasterClient.auth_headers(MasterClient.__new__(MasterClient), "GET", "/x") == []


@needs_munged
def test_the_real_credential_is_this_users_for_this_request_only(site):
    url, keys = site
    got = SiteClient([url], keys).json("GET", "/api/fleet/12/n1/api/node?x=%2F")
    scheme, _, cred = got["authorization"].partition(" ")
    decoded = munge.decode(cred)
    assert scheme == "MUNGE" and decoded.uid == os.getuid()
    assert decoded.payload == request_payload("GET", "/api/fleet/12/n1/api/node?x=%2F")
    assert json.loads(decoded.payload) == {"purpose": "dxflow-site-request", "method": "GET",
                                           "target": "/api/fleet/12/n1/api/node?x=%2F"}


def test_commands_use_the_site_when_the_site_config_names_one(tmp_path, monkeypatch):
    site_toml = tmp_path / "dxflow.toml"
    site_toml.write_text(f'site = ["http://127.0.0.1:8470"]\nsite_keys = "{tmp_path}"\n')
    monkeypatch.setattr(config, "SITE_CONFIG", site_toml)
    client = service()
    assert isinstance(client, SiteClient) and client.replicas[0].url == "http://127.0.0.1:8470"
    site_toml.write_text("")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert isinstance(service(), MasterClient)
