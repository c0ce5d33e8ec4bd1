"""``/proxy/PORT/...`` of the agent (:mod:`dxflow.agent.proxy`), in-process (Flask's test client)."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time

import pytest


SSE_SERVER = textwrap.dedent("""
    import sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass
        def do_GET(self):
            if self.path.startswith("/events"):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                self.wfile.write(b"data: first\\n\\n"); self.wfile.flush()
                time.sleep(10)
                self.wfile.write(b"data: second\\n\\n")
                return
            body = ("path=" + self.path).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Set-Cookie", "a=1")
            self.send_header("Set-Cookie", "b=2")
            self.end_headers()
            self.wfile.write(body)
        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n)
            auth = self.headers.get("Authorization", "none")
            out = b"got " + body + b" auth=" + auth.encode()
            self.send_response(201)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    s = ThreadingHTTPServer(("127.0.0.1", 0), H)
    print(s.server_address[1], flush=True)
    s.serve_forever()
""")


@pytest.fixture
def backend():
    proc = subprocess.Popen([sys.executable, "-c", SSE_SERVER], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    yield port
    proc.kill()
    proc.wait()


def test_proxy_http(agent, backend):
    client, _, headers = agent
    resp = client.get(f"/proxy/{backend}/some/path?x=1&y=%2F", headers=headers)
    assert resp.status_code == 200 and resp.data == b"path=/some/path?x=1&y=%2F"
    assert resp.headers.getlist("Set-Cookie") == ["a=1", "b=2"]
    assert client.get(f"/proxy/{backend}", headers=headers).data == b"path=/"
    resp = client.post(f"/proxy/{backend}/p", data=b"hello", headers=headers)
    assert resp.status_code == 201 and resp.data == b"got hello auth=none"  # the dxflow token stays here


def test_proxy_sse_first_event_arrives_at_once(agent, backend):
    client, _, headers = agent
    t0 = time.monotonic()
    resp = client.get(f"/proxy/{backend}/events", headers=headers, buffered=False)
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    chunk = next(iter(resp.response))
    assert b"data: first" in chunk and time.monotonic() - t0 < 3
    resp.close()


def test_proxy_refuses_unknown_and_closed_ports(agent):
    client, _, headers = agent
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    resp = client.get(f"/proxy/{port}/", headers=headers)
    assert resp.status_code == 404 and "nothing listens" in resp.get_json()["message"]
    assert client.get("/proxy/0/", headers=headers).status_code == 400


def test_proxy_target_uri():
    from dxflow.agent.proxy import target_uri
    assert target_uri({"RAW_URI": "/proxy/80/a%2Fb?q=1"}, "a/b") == "/a%2Fb?q=1"
    assert target_uri({"RAW_URI": "/proxy/80"}, "") == "/"
    assert target_uri({"RAW_URI": "/proxy/80?x"}, "") == "/?x"
    assert target_uri({"QUERY_STRING": "z=1"}, "p/q") == "/p/q?z=1"


def test_proxy_keeps_dxflow_credentials_to_itself():
    from dxflow.agent.proxy import HOP_HEADERS
    from dxflow.edge.http import forwarded_headers
    headers = {"Authorization": "Bearer x", "Cookie": "dxflow_agent=s1; jupyter=abc; dxflow_console=s2",
               "Accept": "*/*", "Connection": "keep-alive"}
    assert forwarded_headers(headers.items(), HOP_HEADERS) == [("Cookie", "jupyter=abc"), ("Accept", "*/*")]
    assert forwarded_headers({"Cookie": "dxflow_agent=s1; dxflow_service=x"}.items(), HOP_HEADERS) == []
