"""dxflow.edge.http: what a relay writes on the wire again (found by fuzzing the master's relay)."""

from __future__ import annotations

from dxflow.edge.http import request_target, service_response_headers, without_own_cookies


def test_request_target_encodes_the_decoded_path_again():
    # a router hands the path decoded: ?, # and non-ASCII must not reach the wire raw
    assert request_target("api/logs/?$À", "lines=1") == "/api/logs/%3F$%C3%80?lines=1"
    assert request_target("api/files/a b#c") == "/api/files/a%20b%23c"
    assert request_target("proxy/8888/app/x.js", "v=%201") == "/proxy/8888/app/x.js?v=%201"


def test_service_answers_cannot_touch_dxflow_cookies_or_widen_a_service_worker():
    headers = [("Set-Cookie", "dxflow_console=x; Path=/"), ("Set-Cookie", "app=1"), ("Clear-Site-Data", '"*"'),
               ("Service-Worker-Allowed", "/"), ("Content-Type", "text/html")]
    assert service_response_headers(headers) == [("Set-Cookie", "app=1"), ("Content-Type", "text/html")]
    assert without_own_cookies("dxflow_service=s; a=1; dxflow_agent=t") == "a=1"
