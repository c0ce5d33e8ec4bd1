"""How the CLI talks to the site service (``site = [...]`` in ``/etc/dxflow/dxflow.toml``): the same
interface as :class:`dxflow.master.client.MasterClient`, so every command works unchanged.

* **Who asks.** Every request carries ``Authorization: MUNGE <credential>``, a credential made for this
  one request (:func:`request_credential`): its payload names the request's method and target, so a
  credential seen on the wire cannot be used for another request, and the site refuses one it has seen
  before (:mod:`dxflow.site.users`). A raw socket (``dxflow shell``'s WebSocket, ``dxflow forward``'s
  pipe) sends the same header on its upgrade request (:meth:`SiteClient.auth_headers`).
* **Which replica.** The ``site`` URLs are tried in order, each time a connection is made: one that does
  not answer is skipped (said once on stderr), so a dead replica costs a refused connection, and a
  command goes on through the next. A request whose connection was made is never sent twice.
* **Whom it trusts.** ``https://`` URLs are verified against the site's own certificate, published in
  ``site_keys/tls.pem``, and nothing else (pinned: no CA, no host name); ``http://`` is accepted for
  loopback addresses only, where nobody else's traffic passes.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import socket
import ssl
import sys
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote, unquote, urlsplit

from dxflow import munge
from dxflow.errors import ConfigError, DxflowError, MasterUnavailable
from dxflow.master.client import JsonRequests
from dxflow.site.config import is_loopback

log = logging.getLogger(__name__)

#: the scheme of the Authorization header the site's user API accepts
AUTH_SCHEME = "MUNGE"
#: what the payload of a request's credential says it is for (never an enrollment's JSON)
PURPOSE = "dxflow-site-request"
#: seconds a request's credential stays valid: made just before the request, used at once
CREDENTIAL_TTL = 60
#: seconds to connect to one replica before the next is tried
CONNECT_TIMEOUT = 5.0
#: the site's user-API certificate, in the folder ``site_keys`` the site admin publishes
TLS_CERT = "tls.pem"
#: ``agent_path``'s JOB of a job of a named cluster: ``CLUSTER~JOB`` (a "/" would be decoded before routing)
CLUSTER_SEP = "~"


def bound_target(target: str) -> str:
    """The request target as a credential binds it: the path percent-decoded, the query as sent.

    The server sees the path decoded (WSGI's PATH_INFO) and the query raw; both sides bind this form."""
    path, sep, query = target.partition("?")
    return unquote(path) + (f"?{query}" if query else "")


def request_payload(method: str, target: str) -> bytes:
    """The payload of a request's credential: its purpose, method and target (:func:`bound_target`)."""
    return json.dumps({"purpose": PURPOSE, "method": method.upper(), "target": bound_target(target)},
                      sort_keys=True, separators=(",", ":")).encode()


def request_credential(method: str, target: str) -> str:
    """A fresh MUNGE credential of this user for one request (MungeError when munged cannot make one)."""
    return munge.encode(request_payload(method, target), ttl=CREDENTIAL_TTL)


class Replica:
    """One ``site`` URL: where it is and how to connect to it."""

    def __init__(self, url: str, keys_dir: Path) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"site URL {url!r}: expected https://HOST:PORT (or http://127.0.0.1:PORT)")
        if parts.scheme == "http" and not is_loopback(parts.hostname):
            raise ConfigError(f"site URL {url!r}: http is for loopback addresses only (credentials and files "
                              f"would cross the network in the clear); use https://{parts.netloc}")
        self.url = url.rstrip("/")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.tls = parts.scheme == "https"
        self.cert = keys_dir / TLS_CERT
        self._context: ssl.SSLContext | None = None

    def context(self) -> ssl.SSLContext:
        """TLS that trusts the site's own certificate only (the file the admin published)."""
        if self._context is None:
            try:
                ctx = ssl.create_default_context(cafile=str(self.cert))
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"cannot read the site's certificate {self.cert}: {e}; ask the site admin "
                                  "(`dxflow site init` publishes it)") from e
            # pinned below to this exact certificate, whatever name it was made for: the URL may name
            # the login node by an alias or an address the certificate does not list
            ctx.check_hostname = False
            self._context = ctx
        return self._context

    def connect(self, timeout: float | None) -> socket.socket:
        """A connected socket (TLS-wrapped and pinned for https); OSError when the replica does not answer."""
        sock = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT)
        try:
            if self.tls:
                sock = self.context().wrap_socket(sock, server_hostname=self.host)
                self.pin(sock)
            sock.settimeout(timeout)
        except BaseException:
            sock.close()
            raise
        return sock

    def pin(self, sock: ssl.SSLSocket) -> None:
        """Refuse any certificate but the published one (even one its key signed)."""
        der = sock.getpeercert(binary_form=True) or b""
        want = ssl.PEM_cert_to_DER_cert(self.cert.read_text())
        if hashlib.sha256(der).digest() != hashlib.sha256(want).digest():
            raise ssl.SSLError(f"{self.url} showed a certificate other than the site's ({self.cert})")


class SiteHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to the first replica that answers; every request on it carries its own
    MUNGE credential (added in :meth:`putrequest`, so requests driven by hand get one too)."""

    def __init__(self, site: "SiteClient", timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.site = site

    def connect(self) -> None:
        self.sock, replica = self.site.connect(self.timeout)
        self.host = replica.host

    def putrequest(self, method: str, url: str, skip_host: bool = False,
                   skip_accept_encoding: bool = False) -> None:
        super().putrequest(method, url, skip_host=skip_host, skip_accept_encoding=skip_accept_encoding)
        for key, value in self.site.auth_headers(method, url):
            self.putheader(key, value)


class SiteClient(JsonRequests):
    """The site service at ``urls`` (replicas, tried in order), trusted through ``keys_dir``."""

    #: `dxflow forward` relays HTTP through the agent (``--http``): the site's connection to an agent
    #: carries channels to the agent's own port only (docs/site.md), never a raw TCP pipe to another
    raw_forward = False

    def __init__(self, urls: list[str], keys_dir: str | Path,
                 credential: Callable[[str, str], str] = request_credential) -> None:
        if not urls:
            raise ConfigError("no site URL: set `site = [\"https://HOST:8470\"]` in /etc/dxflow/dxflow.toml")
        self.replicas = [Replica(u, Path(keys_dir)) for u in urls]
        self.credential = credential
        self._skipped: set[str] = set()

    # -- what MasterClient offers: there is nothing to start -------------------------------------
    def ensure(self) -> "SiteClient":
        return self

    def running(self) -> bool:
        return self.info() is not None

    def info(self) -> dict | None:
        """The site's ``/api/master`` answer (pid, version, replica, ...), None when no replica answers."""
        try:
            return self.json("GET", "/api/master", timeout=10)
        except (OSError, ValueError, DxflowError):
            return None

    # -- connections --------------------------------------------------------------------------------
    def connect(self, timeout: float | None) -> tuple[socket.socket, Replica]:
        """A connection to the first replica that answers; MasterUnavailable when none does."""
        failures = []
        for replica in self.replicas:
            try:
                sock = replica.connect(timeout)
            except ssl.SSLError as e:  # a replica that answers with the wrong certificate is not skipped
                raise MasterUnavailable(f"the site service at {replica.url} failed the TLS check: {e}") from e
            except OSError as e:
                failures.append((replica, e))
                continue
            for skipped, why in failures:
                if skipped.url not in self._skipped:  # once per replica and process: one line, not one per request
                    self._skipped.add(skipped.url)
                    print(f"dxflow: the site service at {skipped.url} does not answer ({why}); "
                          f"using {replica.url}", file=sys.stderr, flush=True)
            return sock, replica
        if len(failures) == 1:
            replica, why = failures[0]
            raise MasterUnavailable(f"the site service at {replica.url} does not answer ({why}): ask the "
                                    "site admin, or try again in a moment")
        names = "; ".join(f"{r.url}: {why}" for r, why in failures)
        raise MasterUnavailable(f"no replica of the site service answers ({names}): ask the site admin")

    def auth_headers(self, method: str, target: str) -> list[tuple[str, str]]:
        """The header that proves this user to the site for one request (``method target``)."""
        return [("Authorization", f"{AUTH_SCHEME} {self.credential(method, target)}")]

    def socket(self, timeout: float | None = 60.0) -> socket.socket:
        """A raw connection to a replica, for a protocol that takes the connection over; its upgrade
        request must carry :meth:`auth_headers`."""
        return self.connect(timeout)[0]

    def connection(self, timeout: float | None = 60.0) -> SiteHTTPConnection:
        """An HTTP connection to a replica (connected on first use), for a request driven by hand."""
        return SiteHTTPConnection(self, timeout)

    def request(self, method: str, path: str, body: Any = None, headers: dict | None = None,
                timeout: float | None = 60.0) -> http.client.HTTPResponse:
        conn = self.connection(timeout)
        conn.connect()  # MasterUnavailable here, before any of the body was read
        try:
            conn.request(method, path, body=body, headers=headers or {})
            return conn.getresponse()
        except BaseException:
            conn.close()
            raise

    def agent_path(self, job: str, node: str | None, path: str) -> str:
        return f"/api/fleet/{quote(job, safe='')}/{quote(node or '-', safe='')}/{path.lstrip('/')}"
