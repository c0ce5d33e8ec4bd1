"""The agent's OpenAPI document (:mod:`dxflow.agent.openapi`): every route, every one behind the token."""

from __future__ import annotations


def test_openapi_document(agent):
    client, _, headers = agent
    doc = client.get("/api/openapi.json", headers=headers).get_json()
    assert doc["openapi"].startswith("3.")
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert doc["security"] == [{"bearer": []}]
    for path in ("/api/health", "/api/node", "/api/logs", "/api/logs/{name}/follow", "/api/exec", "/api/ports",
                 "/proxy/{port}/{path}", "/api/openapi.json"):
        assert path in doc["paths"], path
    for ops in doc["paths"].values():
        for op in ops.values():
            assert "401" in op["responses"]
    assert client.get("/api/openapi.json").status_code == 401
