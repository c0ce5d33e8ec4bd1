"""Bob, and a hostile web page in alice's own job, against alice's web console (real Chromium, real master).

Alice's 1-node job serves a folder over ``python3 -m http.server``: an attack page, a service worker
that would answer every request it can, and a small app that redirects ``/`` to ``/app/`` and loads
``/static/app.js`` by absolute path (as most notebook and dashboard servers do). The console opens
each service on an origin of its own (``http://pPORT-NODE-JOB.localhost:CONSOLE/``), so:

* the page cannot read the console's config (its CSRF token) nor run a command through the console;
* its service worker cannot intercept the console's pages;
* the absolute-path app works unmodified;
* a session cookie dies with logout and with a restart of the master;
* bob's connections to alice's console port are closed before any HTTP answer, and her console's
  Unix socket lets only her in.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from conftest import Jobs, as_user, dxflow, wait_agents, wait_for
from dxflow.layout import UserLayout
from test_console import TIMEOUT, console_link, shot

ALICE_HOME = Path(os.path.expanduser("~alice"))
MARKER = "hostile-exec-ran"

#: what the attack page tries, on its own origin, against the console's origin
ATTACK_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>attack</title></head><body>
<pre id="out">running</pre>
<script>
const out = {};
const consoleBase = new URLSearchParams(location.search).get('console');
const job = new URLSearchParams(location.search).get('job');
const node = new URLSearchParams(location.search).get('node');
async function attempt(name, f) {
  try { out[name] = await f(); } catch (e) { out[name] = 'error: ' + e.name; }
}
(async () => {
  await attempt('config', async () => {
    const r = await fetch(consoleBase + '/console/config.json', { credentials: 'include' });
    return 'read ' + r.status + ' ' + (await r.text());
  });
  await attempt('config_same_origin', async () => {
    const r = await fetch('/console/config.json', { credentials: 'include' });
    return r.status;
  });
  await attempt('exec', async () => {
    const r = await fetch(consoleBase + '/api/fleet/' + job + '/' + node + '/api/exec', {
      method: 'POST', credentials: 'include', mode: 'no-cors',
      headers: { 'Content-Type': 'text/plain' },
      body: JSON.stringify({ argv: ['touch', '%(marker)s'] }) });
    return 'sent ' + r.type;
  });
  await attempt('agents', async () => {
    const r = await fetch(consoleBase + '/api/agents', { credentials: 'include' });
    return 'read ' + r.status + ' ' + (await r.text()).slice(0, 200);
  });
  await attempt('sw', async () => {
    const reg = await navigator.serviceWorker.register('/sw.js', { scope: '/' });
    await navigator.serviceWorker.ready;
    return 'registered ' + reg.scope;
  });
  document.getElementById('out').textContent = JSON.stringify(out);
  document.title = 'done';
})();
</script></body></html>
"""
#: a service worker that answers every request in its reach, and asks for a wider scope
SERVICE_WORKER = """self.addEventListener('install', (e) => self.skipWaiting());
self.addEventListener('activate', (e) => e.waitUntil(self.clients.claim()));
self.addEventListener('fetch', (e) => e.respondWith(new Response('HIJACKED by the job', {
  headers: { 'Content-Type': 'text/html' } })));
"""
#: a web app with absolute paths: / redirects to /app/, which loads /static/app.js
APP_SERVER = r'''
import http.server, sys
class App(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        sys.stderr.write("request %s\n" % self.path); sys.stderr.flush()
    def send(self, code, body, ctype="text/html", extra=()):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path == "/":
            self.send(302, b"", extra=[("Location", "/app/")])
        elif self.path == "/app/":
            self.send(200, b'<!doctype html><title>app</title><div id="app">loading</div>'
                           b'<script src="/static/app.js"></script>',
                      extra=[("Set-Cookie", "dxflow_console=stolen; Path=/"), ("Set-Cookie", "app_session=ok; Path=/"),
                             ("Service-Worker-Allowed", "/"), ("Clear-Site-Data", '"*"')])
        elif self.path == "/static/app.js":
            self.send(200, b"document.getElementById('app').textContent = 'absolute app works: ' + document.cookie;",
                      "application/javascript")
        else:
            self.send(404, b"not found")
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), App)
print("app port", srv.server_address[1], flush=True)
srv.serve_forever()
'''
SCRIPT = ('d=$HOME/hostile-{tag}; mkdir -p $d/site && cd $d && '
          'python3 -u -m http.server 0 --bind 127.0.0.1 --directory site > http.log 2>&1 & '
          'cd $HOME/hostile-{tag} && python3 -u app.py > app.log 2>&1 & '
          'sleep 900')


@pytest.fixture(scope="module")
def job(lab):
    tag = f"{os.getpid()}"
    folder = ALICE_HOME / f"hostile-{tag}"
    (folder / "site").mkdir(parents=True, exist_ok=True)
    (folder / "app.py").write_text(APP_SERVER)
    (folder / "site" / "attack.html").write_text(ATTACK_PAGE % {"marker": str(folder / MARKER)})
    (folder / "site" / "sw.js").write_text(SERVICE_WORKER)
    shutil.chown(folder, "alice", "alice")
    for path in folder.rglob("*"):
        shutil.chown(path, "alice", "alice")
    jobs = Jobs()
    job = jobs.submit("alice", SCRIPT.format(tag=tag))
    try:
        jobs.wait_running(job, timeout=180)
        node = wait_agents("alice", job, 1, timeout=60)[0]["node"]
        ports = {}
        ports["site"] = int(wait_for(lambda: re.search(r"port (\d+)", _read(folder / "http.log")), 30,
                                     what="the job's http.server port").group(1))
        ports["app"] = int(wait_for(lambda: re.search(r"app port (\d+)", _read(folder / "app.log")), 30,
                                    what="the job's app port").group(1))
        yield {"job": job, "node": node, "folder": folder, "ports": ports}
    finally:
        jobs.cancel_all()
        shutil.rmtree(folder, ignore_errors=True)


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _login(browser) -> dict:
    link = console_link()
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    page.goto(link["url"])
    page.wait_for_url(re.compile(r"/console/"))
    return {"context": context, "page": page, "base": f"http://127.0.0.1:{link['port']}", "link": link}


def _open_service(session: dict, job: str, node: str, port: int):
    """Press Open in the node's Services tab; the popup is the service's page."""
    page = session["page"]
    page.goto(f"{session['base']}/console/#/node/{job}/{node}/services")
    row = page.locator(f'table.services tr[data-port="{port}"]')
    row.wait_for(timeout=TIMEOUT)
    with page.expect_popup() as popup:
        row.get_by_role("link").click()
    service = popup.value
    service.wait_for_load_state()
    return service


def test_a_job_page_cannot_read_the_console_or_run_commands(browser, job):
    session = _login(browser)
    try:
        service = _open_service(session, job["job"], job["node"], job["ports"]["site"])
        origin = re.match(r"(http://[^/]+)/", service.url).group(1)
        assert origin == f"http://p{job['ports']['site']}-{job['node']}-{job['job']}.localhost:{session['link']['port']}"
        service.goto(f"{origin}/attack.html?console={session['base']}&job={job['job']}&node={job['node']}")
        wait_for(lambda: service.title() == "done", 30, what="the attack page to finish")
        result = json.loads(service.locator("#out").inner_text())
        shot(service, "hostile-attack-page")
        # the console's answers cannot be read from the service's origin
        assert result["config"].startswith("error:"), result
        assert result["agents"].startswith("error:"), result
        # /console/config.json on its own origin is the job's own server's 404, not the console's
        assert result["config_same_origin"] == 404, result
        # the exec request left the browser but did nothing: no cookie went with it, and its Origin is refused
        time.sleep(1)
        assert not (job["folder"] / MARKER).exists()
        # the page's service worker is confined to the service's origin
        assert result["sw"].startswith("registered " + origin), result
        service.reload()
        assert "HIJACKED" in service.content()  # it does control its own origin ...
        console = session["context"].new_page()
        console.goto(f"{session['base']}/console/")
        console.locator("#user").wait_for(timeout=TIMEOUT)
        assert "HIJACKED" not in console.content()  # ... and nothing of the console's
        assert "alice" in console.locator("#user").inner_text()
    finally:
        session["context"].close()


def test_an_app_with_absolute_paths_works_from_the_services_tab(browser, job):
    session = _login(browser)
    try:
        service = _open_service(session, job["job"], job["node"], job["ports"]["app"])
        assert re.fullmatch(rf"http://p{job['ports']['app']}-{job['node']}-{job['job']}\.localhost:\d+/app/", service.url), \
            service.url
        text = wait_for(lambda: (t := service.locator("#app").inner_text()) != "loading" and t, 20,
                        what="the app's absolute-path script")
        assert text.startswith("absolute app works: ")
        assert "app_session=ok" in text  # its own cookie is kept ...
        cookies = {c["name"] for c in session["context"].cookies(re.match(r"(http://[^/]+)/", service.url).group(1))}
        assert "dxflow_console" not in cookies  # ... and it cannot plant dxflow's
        shot(service, "hostile-absolute-app")
    finally:
        session["context"].close()


def test_cookies_die_with_logout_and_with_the_master(browser, job):
    session = _login(browser)
    base = session["base"]
    try:
        cookie = next(c for c in session["context"].cookies(base) if c["name"] == "dxflow_console")
        replay = browser.new_context()
        replay.add_cookies([{**cookie}])
        assert replay.request.get(base + "/api/agents").status == 200
        # logout (the console's button) ends the session on the server: the captured cookie is dead
        page = session["page"]
        page.goto(base + "/console/")
        page.locator("#logout").click()
        page.wait_for_url(re.compile(r"/login"))
        assert replay.request.get(base + "/api/agents").status == 401
        replay.close()
    finally:
        session["context"].close()
    # a session alive before the master restarts is dead after it
    session = _login(browser)
    try:
        cookie = next(c for c in session["context"].cookies(base) if c["name"] == "dxflow_console")
        dxflow("alice", "master", "stop")
        dxflow("alice", "master", "start")
        wait_for(lambda: console_port() == session["link"]["port"], 20, what="the master's console again")
        replay = browser.new_context()
        replay.add_cookies([{**cookie}])
        assert replay.request.get(base + "/api/agents").status == 401
        replay.close()
    finally:
        session["context"].close()


def console_port() -> int | None:
    try:
        return json.loads(UserLayout.of(ALICE_HOME).console_state.read_text())["port"]
    except (OSError, ValueError, KeyError):
        return None


PROBE = r"""
import socket, sys, json
out = {}
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
try:
    s.sendall(b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    data = s.recv(65536)
    out["bytes"] = len(data)
except OSError as e:
    out["bytes"] = 0
    out["error"] = type(e).__name__
print(json.dumps(out))
"""


def test_bob_gets_nothing_from_alices_console(job):
    link = console_link()
    # over TCP: closed at accept, before any HTTP answer (not even the login page)
    bob = json.loads(as_user("bob", ["python3", "-c", PROBE, str(link["port"])]).stdout)
    assert bob["bytes"] == 0, bob
    alice = json.loads(as_user("alice", ["python3", "-c", PROBE, str(link["port"])]).stdout)
    assert alice["bytes"] > 0, alice
    # over the console's Unix socket: bob cannot even connect; alice gets her console
    sock = link["socket"]
    curl = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket", sock, "http://127.0.0.1/login"]
    assert as_user("alice", curl).stdout == "200"
    refused = as_user("bob", curl, check=False)
    assert refused.stdout in ("", "000") and refused.returncode != 0
