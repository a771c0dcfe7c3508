"""schemathesis against the cloud's own OpenAPI document: no input may produce a 500, and every
refusal is a clear error. Device requests are signed and operators and users logged in, so the
generated cases get past the 401s to the code behind them."""

import json
import secrets
import time
import urllib.parse

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.core import NOT_SET

import contract as p

EXAMPLES = 30


@pytest.mark.slow
def test_no_generated_request_gets_a_500(cloud):
    """On SQLite and on PostgreSQL (which refuses what SQLite takes: NUL characters, NaN in JSON, huge numbers)."""
    dev = cloud.provision("FZ1")
    user = cloud.user("13900000000", balance_fen=500)
    schema = schemathesis.openapi.from_dict(cloud.app.openapi())
    problems: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        op = result.ok()
        if op.path.endswith(("/logout", "/revoke", "/revoke-key")):
            continue                          # they would lock the fuzzer's own credentials out (tested elsewhere)
        operations += 1

        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def check(case):
            query = dict(case.query or {})
            if "wait_ms" in query or case.formatted_path == "/device/v1/commands":
                query["wait_ms"] = 0                  # keep long-polls short in a fuzz run (the default: below)
            path = case.formatted_path
            if query:
                path += "?" + urllib.parse.urlencode(query, doseq=True)
            body = b"" if case.body is NOT_SET else json.dumps(case.body).encode()
            headers = {"Content-Type": "application/json"} if body else {}
            if path.startswith("/device/"):
                headers.update(p.signed_headers(dev.secret, dev.machine_id, case.method, path, body,
                                                timestamp_ms=time.time_ns() // 1_000_000,
                                                nonce=secrets.token_hex(16)))
            elif path.startswith(("/api/v1/operator", "/api/v1/dev")):
                headers["Authorization"] = f"Bearer {cloud.admin}"
            elif path.startswith("/api/"):
                headers["Authorization"] = f"Bearer {user.token}"
            r = requests.request(case.method, cloud.url + path, data=body, headers=headers, timeout=30)
            where = f"{case.method} {path} {body[:200]!r}"
            if r.status_code >= 500:
                problems.append(f"{r.status_code} for {where}: {r.text[:300]}")
            elif r.status_code >= 400:
                err = r.json()
                if not (isinstance(err, dict) and err.get("error") and err.get("message")):
                    problems.append(f"unclear {r.status_code} for {where}: {r.text[:300]}")

        check()
    # a poll without wait_ms (the default, a 25 s wait) is answered at once when a command is waiting: the
    # default is accepted without holding the run for 25 s
    quiet = cloud.provision("FZ2")
    assert cloud.op("PATCH", "/api/v1/operator/machines/FZ2", json={"price_fen_per_l": 321}).status_code == 200
    r = quiet.request("GET", "/device/v1/commands")
    assert r.status_code == 200 and [c["kind"] for c in r.json()["commands"]] == ["price"], r.text
    assert operations >= 15
    assert problems == [], "\n".join(problems[:20])
