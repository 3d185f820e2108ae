"""The OpenAPI description (Sources/LedgerHTTP/Resources/openapi.yaml) against the code and the live service.

- The document is valid OpenAPI 3.1.
- It describes exactly the (method, path) pairs the service routes: those `ledger routes` prints from the route table
  (Sources/LedgerHTTP/LedgerAPI+routes.swift), checked against the live server too (every documented pair is
  served, every other method on a documented path is 405 with `Allow`).
- Its problem codes are exactly those of the sources, each under its own status.
- GET /openapi.yaml serves the file byte for byte.
- Deterministic requests reach every documented status of every operation (except 500) and each answer is
  validated against the document: status, media type, body schema, required headers, and no header of the
  idempotency protocol (`Idempotent-Replayed`, `Idempotency-TTL`, `Preference-Applied`) where it is undocumented.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse

import pytest
import requests
import yaml
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from referencing import Registry
from referencing.jsonschema import DRAFT202012

import ledgertest as lt  # on the path through conftest.py
from ledgertest import AMOUNT_MAX, REPO, TIMEOUT, Api, uid

OPENAPI_PATH = REPO / "Sources" / "LedgerHTTP" / "Resources" / "openapi.yaml"


def ledger_routes() -> list[tuple[str, str]]:
    """`ledger routes`: the service's route table, one `METHOD /path/{param}` a line, in table order."""
    proc = lt.run_ledger(["routes"], timeout=30)
    assert proc.returncode == 0, f"ledger routes failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    routes = []
    for line in proc.stdout.splitlines():
        assert re.fullmatch(r"(GET|PUT|POST|DELETE|PATCH) /[^ ]*", line), f"unexpected line of ledger routes: {line!r}"
        method, path = line.split(" ")
        routes.append((method, path))
    return routes


# The service's routes, as its route table says. Read once: the parametrized tests below are made from it.
ROUTE_TABLE = ledger_routes()
ROUTES = set(ROUTE_TABLE)

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

DOC_TEXT = OPENAPI_PATH.read_text(encoding="utf-8")
DOC = yaml.safe_load(DOC_TEXT)
DOC_URI = "urn:ledger:openapi"
REGISTRY = Registry().with_resource(DOC_URI, DRAFT202012.create_resource(DOC))


# --------------------------------------------------------------------------------------------------------------------
# Reading the document


def documented_operations() -> set[tuple[str, str]]:
    return {
        (method.upper(), path) for path, item in DOC["paths"].items() for method in item if method in HTTP_METHODS
    }


def resolve(node):
    """Follows `$ref`s of OpenAPI objects (responses, headers, parameters) inside the document."""
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), ref
        target = DOC
        for part in ref[2:].split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
    return node


def absolutize(node):
    """A copy of a schema whose local `$ref`s point into the registered document."""
    if isinstance(node, dict):
        return {
            key: DOC_URI + value if key == "$ref" and str(value).startswith("#") else absolutize(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [absolutize(item) for item in node]
    return node


def validate_value(schema: dict, value, what: str) -> None:
    validator = Draft202012Validator(
        absolutize(schema), registry=REGISTRY, format_checker=Draft202012Validator.FORMAT_CHECKER
    )
    errors = sorted(validator.iter_errors(value), key=lambda e: list(e.path))
    assert not errors, f"{what} violates the schema: " + "; ".join(
        f"{list(e.path)}: {e.message}" for e in errors[:5]
    ) + f"\nvalue: {value!r}"


# Headers the service sends on some answers only: each must be documented on every response that carries it.
PROTOCOL_HEADERS = ("Idempotent-Replayed", "Idempotency-TTL", "Preference-Applied")


def check_against(spec: dict, response: requests.Response, what: str):
    """Validates media type, body and headers of `response` against a response object; returns the parsed body."""
    spec = resolve(spec)
    media_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    content = spec.get("content", {})
    if not content:
        assert response.content == b"", f"{what}: a body where the document describes none"
        media_type = None
    if media_type is not None:
        assert media_type in content, f"{what}: Content-Type {media_type!r} is not documented (documented: {list(content)})"
    body = None
    if response.request.method != "HEAD" and media_type is not None:
        if media_type.endswith("json"):
            body = json.loads(response.content)
        elif media_type == "application/yaml":
            body = yaml.safe_load(response.content)
        else:
            body = response.content.decode("utf-8")
        if media_type is not None:
            validate_value(content[media_type]["schema"], body, f"{what} body")
    for name in PROTOCOL_HEADERS:
        if name in response.headers:
            assert name in spec.get("headers", {}), f"{what}: header {name} is sent but not documented"
    for name, header in spec.get("headers", {}).items():
        header = resolve(header)
        value = response.headers.get(name)
        if header.get("required"):
            assert value is not None, f"{what}: required header {name} is missing"
        if value is not None:
            validate_value(header["schema"], value, f"{what} header {name}")
    if media_type == "application/problem+json" and body is not None:
        assert body["type"] == f"urn:ledger:problem:{body['code']}", body
        assert body["status"] == response.status_code, body
    return body


def check(method: str, template: str, response: requests.Response):
    """Validates a response of a documented operation; returns the parsed body."""
    operation = DOC["paths"][template][method.lower()]
    status = str(response.status_code)
    what = f"{method} {template} -> {status}"
    assert status in operation["responses"], f"{what}: status not documented; body: {response.text[:300]}"
    return check_against(operation["responses"][status], response, what)


def problem_code(response: requests.Response):
    try:
        return response.json().get("code")
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------------------------
# Reading the sources


def source_problem_statuses() -> dict[str, int]:
    """Every problem code of LedgerCore's Problems and of the SQL renderers, with its status."""
    codes: dict[str, int] = {}
    found: list[tuple[str, str]] = []
    for path in sorted((REPO / "Sources" / "LedgerCore").glob("*.swift")):
        found += re.findall(r'status: (\d+), code: "([a-z-]+)"', path.read_text(encoding="utf-8"))
    for path in sorted((REPO / "sql").glob("*.sql")):
        text = path.read_text(encoding="utf-8")
        found += re.findall(r"problem_json\((\d+), '([a-z-]+)'", text)
        # Renderers by code: `WHEN 'hold-voided' THEN ledger.problem_json(422, p_code, ...`.
        found += [
            (status, code)
            for code, status in re.findall(r"WHEN '([a-z-]+)' THEN (?:rtrim\()?ledger\.problem_json\((\d+), p_code", text)
        ]
    for status, code in found:
        assert codes.setdefault(code, int(status)) == int(status), code
    return codes


# --------------------------------------------------------------------------------------------------------------------
# The document itself


def test_document_is_valid_openapi_3_1():
    assert DOC["openapi"] == "3.1.0"
    validate(DOC, cls=OpenAPIV31SpecValidator)


def test_document_describes_exactly_the_routes():
    documented = documented_operations()
    assert documented == ROUTES, (
        f"only in the route table: {sorted(ROUTES - documented)}; only in openapi.yaml: {sorted(documented - ROUTES)}"
    )


def test_ledger_routes_prints_each_route_once():
    assert len(ROUTE_TABLE) == len(ROUTES), "a method and path appear twice in the route table"
    assert ("GET", "/health") in ROUTES and any(path.startswith("/v1/") for _, path in ROUTES)


def test_problem_codes_are_exactly_those_of_the_sources():
    documented = set(DOC["components"]["schemas"]["ProblemCode"]["enum"])
    assert documented == set(source_problem_statuses())


def _codes_of(schema) -> list[str]:
    """The codes a documented problem response narrows `code` to (beside its `$ref` to Problem)."""
    code = schema.get("properties", {}).get("code", {})
    return code.get("enum", []) + ([code["const"]] if "const" in code else [])


def test_each_documented_problem_code_sits_under_its_own_status():
    statuses = source_problem_statuses()
    responses = [(f"components.responses.{n}", r) for n, r in DOC["components"]["responses"].items()]
    for path, item in DOC["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                responses += [(f"{method.upper()} {path} {s}", r) for s, r in operation["responses"].items()]
    checked = 0
    for where, response in responses:
        response = resolve(response)
        schema = response.get("content", {}).get("application/problem+json", {}).get("schema")
        if not schema:
            continue
        assert schema.get("$ref") == "#/components/schemas/Problem", where
        status = schema["properties"]["status"]["const"]
        codes = _codes_of(schema)
        assert codes, where
        for code in codes:
            assert statuses[code] == status, f"{where}: {code} is a {statuses[code]}, documented under {status}"
            checked += 1
    assert checked > 40


def test_every_operation_documents_the_shared_failures():
    for method, path in ROUTES:
        responses = DOC["paths"][path][method.lower()]["responses"]
        assert {"413", "500"} <= set(responses), (method, path)
        if path.startswith("/v1/"):
            assert {"401", "503"} <= set(responses), (method, path)
            assert DOC["paths"][path][method.lower()].get("security") is None, "v1 uses the global bearer security"
        else:
            assert DOC["paths"][path][method.lower()]["security"] == [], (method, path)
        for status, response in responses.items():
            assert "X-Request-Id" in resolve(response).get("headers", {}), (method, path, status)


# --------------------------------------------------------------------------------------------------------------------
# The live service: routes


@pytest.fixture(scope="module")
def api(server, tokens) -> Api:
    return Api(server.base, tokens["a"])


@pytest.fixture(scope="module")
def accounts(api):
    """alice and bob in USD (alice credited 100000), eve in EUR, neg in USD with allow_negative."""
    for name, body in [
        ("alice", {"currency": "USD"}),
        ("bob", {"currency": "USD"}),
        ("eve", {"currency": "EUR"}),
        ("neg", {"currency": "USD", "allow_negative": True}),
    ]:
        assert api.request("PUT", f"/v1/accounts/{name}", body=body).status_code in (200, 201)
    seed = {"account": "alice", "amount": 100000, "currency": "USD"}
    key = uid("seed-")
    response = api.request("POST", "/v1/credits", key=key, body=seed)
    assert response.status_code == 201, response.text
    return {"transfer_id": response.json()["id"], "hold_id": place_hold(api)["id"], "key": key}


def place_hold(api, **fields) -> dict:
    """A pending hold of alice's money, to bob unless `fields` say otherwise."""
    body = {"from": "alice", "to": "bob", "amount": 5, "currency": "USD", **fields}
    response = api.request("POST", "/v1/holds", key=uid("hold-"), body=body)
    assert response.status_code == 201, response.text
    return check("POST", "/v1/holds", response)


def concrete(path: str, accounts) -> str:
    if path.startswith("/v1/idempotency-keys/"):
        return path.replace("{key}", urllib.parse.quote(accounts["key"], safe=""))
    if path.startswith("/v1/transfers/"):
        return path.replace("{id}", accounts["transfer_id"])
    if path.startswith("/v1/holds/"):
        return path.replace("{id}", accounts["hold_id"])
    if path.startswith("/v1/webhooks/"):
        return path.replace("{id}", "hook-" + accounts["key"][-8:])
    return path.replace("{id}", "alice")


POST_BODIES = {
    "/v1/credits": {"account": "bob", "amount": 5, "currency": "USD"},
    "/v1/debits": {"account": "alice", "amount": 5, "currency": "USD"},
    "/v1/transfers": {"from": "alice", "to": "bob", "amount": 5, "currency": "USD"},
    "/v1/transfers/batch": {"transfers": [{"from": "alice", "to": "bob", "amount": 5, "currency": "USD"}]},
    "/v1/transfers/{id}/reversals": {"amount": 1},
    "/v1/holds": {"from": "alice", "to": "bob", "amount": 5, "currency": "USD"},
    "/v1/holds/{id}/capture": {},
    "/v1/holds/{id}/void": {},
}


@pytest.mark.parametrize("method,path", sorted(ROUTES))
def test_every_documented_operation_is_served(api, accounts, method, path):
    if method == "POST" and path.startswith("/v1/holds/"):
        # A hold of its own: a hold is captured or voided once.
        target = path.replace("{id}", place_hold(api)["id"])
        response = api.request(method, target, key=uid("route-"), body=POST_BODIES[path])
    elif method == "POST":
        response = api.request(method, concrete(path, accounts), key=uid("route-"), body=POST_BODIES[path])
    elif method == "PUT" and path.startswith("/v1/webhooks/"):
        response = api.request(method, concrete(path, accounts), body={"url": "https://example.com/hook"})
    elif method == "PUT":
        response = api.request(method, concrete(path, accounts), body={"currency": "USD"})
    elif method == "DELETE":
        # A webhook of its own to delete.
        target = path.replace("{id}", uid("del-"))
        assert api.request("PUT", target, body={"url": "https://example.com/hook"}).status_code == 201
        response = api.request(method, target)
    else:
        if path.startswith("/v1/webhooks/"):
            api.request("PUT", concrete(path, accounts), body={"url": "https://example.com/hook"})
        response = api.request(method, concrete(path, accounts))
    assert problem_code(response) not in ("not-found", "method-not-allowed"), response.text
    assert response.status_code in (200, 201, 204), response.text
    check(method, path, response)


@pytest.mark.parametrize("path", sorted({p for _, p in ROUTES}))
def test_other_methods_are_405_with_allow(api, accounts, path):
    documented = {m for m, p in ROUTES if p == path}
    for method in ("GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE"):
        if method in documented:
            continue
        response = api.request(method, concrete(path, accounts))
        assert response.status_code == 405, (method, path, response.status_code, response.text)
        assert {m.strip() for m in response.headers["Allow"].split(",")} == documented, response.headers["Allow"]
        check_against(DOC["components"]["responses"]["MethodNotAllowed"], response, f"{method} {path}")


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/v1",
        "/v1/",
        "/v1/accounts",
        "/v1/accounts/alice/",
        "/v1/accounts/alice/entries/x",
        "/v2/credits",
        "/openapi.json",
        "/health/",
    ],
)
def test_other_paths_are_not_found(api, path):
    response = api.request("GET", path)
    assert response.status_code == 404 and problem_code(response) == "not-found", (path, response.text)
    check_against(DOC["components"]["responses"]["NotFound"], response, f"GET {path}")


def test_served_document_is_the_file_byte_for_byte(server):
    response = requests.get(server.base + "/openapi.yaml", timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/yaml"
    assert response.content == OPENAPI_PATH.read_bytes(), "rebuild (swift build) to ship the edited openapi.yaml"
    check("GET", "/openapi.yaml", response)


# --------------------------------------------------------------------------------------------------------------------
# The live service: every documented status


def test_service_endpoints(server):
    for path in ("/health", "/health/live", "/health/ready"):
        assert check("GET", path, requests.get(server.base + path, timeout=TIMEOUT)) == {"status": "ok"}, path
    metrics = requests.get(server.base + "/metrics", timeout=TIMEOUT)
    assert metrics.headers["Content-Type"].startswith("text/plain")
    assert "ledger_http_requests_total" in check("GET", "/metrics", metrics)
    big = b"x" * (64 * 1024 + 1)
    for path in ("/health", "/health/live", "/health/ready", "/metrics", "/openapi.yaml"):
        response = requests.get(server.base + path, data=big, timeout=TIMEOUT)
        assert problem_code(response) == "body-too-large", path
        check("GET", path, response)


def test_unauthorized_on_every_v1_operation(server, accounts):
    for method, path in sorted(ROUTES):
        if not path.startswith("/v1/"):
            continue
        for headers in ({}, {"Authorization": "Bearer not-a-known-token"}, {"Authorization": "Basic YTpi"}):
            url = server.base + concrete(path, accounts)
            response = requests.request(method, url, headers=headers, timeout=TIMEOUT)
            assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer", (method, path)
            check(method, path, response)


def test_body_too_large_on_every_v1_operation(api, accounts):
    big = b"{" + b" " * (64 * 1024) + b"}"
    big_batch = b"{" + b" " * (1024 * 1024) + b"}"  # a batch may be up to 1 MiB
    for method, path in sorted(ROUTES):
        if path.startswith("/v1/"):
            data = big_batch if path == "/v1/transfers/batch" else big
            response = api.request(method, concrete(path, accounts), raw=data, key=uid())
            assert problem_code(response) == "body-too-large", (method, path, response.text)
            check(method, path, response)
    # Exactly the limit is read (and then judged as JSON).
    at_limit = b"{" + b" " * (64 * 1024 - 2) + b"}"
    response = api.request("PUT", "/v1/accounts/alice", raw=at_limit)
    assert problem_code(response) == "invalid-currency", response.text


def test_put_account(api):
    name = uid("acct-")
    created = api.request("PUT", f"/v1/accounts/{name}", body={"currency": "USD"})
    assert created.status_code == 201
    account = check("PUT", "/v1/accounts/{id}", created)
    assert account["id"] == name and account["balance"] == 0 and account["version"] == 0
    again = api.request("PUT", f"/v1/accounts/{name}", body={"allow_negative": False, "currency": "USD"})
    assert again.status_code == 200 and again.json() == account
    check("PUT", "/v1/accounts/{id}", again)
    cases = [
        (f"/v1/accounts/{name}", {"currency": "EUR"}, None, "account-conflict"),
        ("/v1/accounts/%40world", {"currency": "USD"}, None, "invalid-account-id"),
        ("/v1/accounts/" + "a" * 65, {"currency": "USD"}, None, "invalid-account-id"),
        (f"/v1/accounts/{uid()}", {"currency": "USD", "extra": 1}, None, "invalid-json"),
        (f"/v1/accounts/{uid()}", {"currency": "USD", "allow_negative": "yes"}, None, "invalid-json"),
        (f"/v1/accounts/{uid()}", {"currency": "usd"}, None, "invalid-currency"),
        (f"/v1/accounts/{uid()}", {}, None, "invalid-currency"),
        (f"/v1/accounts/{uid()}", {"currency": "USD"}, {"Content-Type": "text/plain"}, "unsupported-media-type"),
    ]
    for path, body, headers, code in cases:
        response = api.request("PUT", path, body=body, headers=headers)
        assert problem_code(response) == code, (path, body, response.text)
        check("PUT", "/v1/accounts/{id}", response)
    accepted_types = (
        "application/merge-patch+json",
        "application/x-www-form-urlencoded",
        "application/json; charset=utf-8",
    )
    for content_type in accepted_types:
        headers = {"Content-Type": content_type}
        response = api.request("PUT", f"/v1/accounts/{uid()}", body={"currency": "USD"}, headers=headers)
        assert response.status_code == 201, (content_type, response.text)
    response = api.request("PUT", f"/v1/accounts/{uid()}", raw=b'{"currency":"USD","currency":"USD"}')
    assert problem_code(response) == "invalid-json"


def test_get_account(api, tokens, server):
    response = api.request("GET", "/v1/accounts/alice")
    assert check("GET", "/v1/accounts/{id}", response)["id"] == "alice"
    for path, code in [
        ("/v1/accounts/nobody-here", "account-not-found"),
        ("/v1/accounts/.hidden", "invalid-account-id"),
    ]:
        response = api.request("GET", path)
        assert problem_code(response) == code
        check("GET", "/v1/accounts/{id}", response)
    # Another client does not see alice.
    other = Api(server.base, tokens["b"]).request("GET", "/v1/accounts/alice")
    assert problem_code(other) == "account-not-found"


def test_entries_and_cursor(api):
    name = uid("pages-")
    assert api.request("PUT", f"/v1/accounts/{name}", body={"currency": "USD"}).status_code == 201
    for amount in (1, 2, 3):
        credit = {"account": name, "amount": amount, "currency": "USD"}
        assert api.request("POST", "/v1/credits", key=uid(), body=credit).status_code == 201
    first = api.request("GET", f"/v1/accounts/{name}/entries?limit=2")
    page = check("GET", "/v1/accounts/{id}/entries", first)
    assert [e["amount"] for e in page["entries"]] == [3, 2] and isinstance(page["next_cursor"], str)
    second = api.request("GET", f"/v1/accounts/{name}/entries", params={"limit": 2, "cursor": page["next_cursor"]})
    page2 = check("GET", "/v1/accounts/{id}/entries", second)
    assert [e["amount"] for e in page2["entries"]] == [1] and page2["next_cursor"] is None
    cases = [
        (f"/v1/accounts/{name}/entries?limit=0", "invalid-limit"),
        (f"/v1/accounts/{name}/entries?limit=501", "invalid-limit"),
        (f"/v1/accounts/{name}/entries?limit=1.5", "invalid-limit"),
        (f"/v1/accounts/{name}/entries?limit=", "invalid-limit"),
        (f"/v1/accounts/{name}/entries?cursor=abc", "invalid-cursor"),
        (f"/v1/accounts/alice/entries?cursor={page['next_cursor']}", "invalid-cursor"),
        ("/v1/accounts/%2E%2E/entries", "invalid-account-id"),
        ("/v1/accounts/nobody-here/entries", "account-not-found"),
    ]
    for path, code in cases:
        response = api.request("GET", path)
        assert problem_code(response) == code, (path, response.text)
        check("GET", "/v1/accounts/{id}/entries", response)


POST_OPS = ("/v1/credits", "/v1/debits", "/v1/transfers")


def test_post_success_and_replay(api, accounts):
    for path in POST_OPS:
        key = uid("ok-")
        body = dict(POST_BODIES[path], metadata={"n": 1, "s": "x"})
        first = api.request("POST", path, key=key, body=body)
        transfer = check("POST", path, first)
        assert first.status_code == 201 and first.headers["Idempotent-Replayed"] == "false"
        assert re.fullmatch(r"[1-9][0-9]*", transfer["id"])
        # The sf-string form of the same key, members reordered: the same key and fingerprint, so a replay.
        replay = api.request("POST", path, key=f'"{key}"', raw=json.dumps(dict(reversed(list(body.items())))).encode())
        check("POST", path, replay)
        assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
        assert replay.content == first.content
        got = api.request("GET", f"/v1/transfers/{transfer['id']}")
        assert check("GET", "/v1/transfers/{id}", got) == transfer
    credit = api.request("POST", "/v1/credits", key=uid(), body=POST_BODIES["/v1/credits"])
    assert check("POST", "/v1/credits", credit)["from"] == "@world"
    debit = api.request("POST", "/v1/debits", key=uid(), body=POST_BODIES["/v1/debits"])
    assert check("POST", "/v1/debits", debit)["to"] == "@world"
    # The largest amount, onto an account that may go negative.
    largest = {"account": "neg", "amount": AMOUNT_MAX, "currency": "USD"}
    response = api.request("POST", "/v1/debits", key=uid(), body=largest)
    assert response.status_code == 201, response.text
    check("POST", "/v1/debits", response)
    entries = check("GET", "/v1/accounts/{id}/entries", api.request("GET", "/v1/accounts/neg/entries?limit=1"))
    assert entries["entries"][0]["balance_after"] < 0
    assert check("GET", "/v1/accounts/{id}", api.request("GET", "/v1/accounts/neg"))["balance"] < 0


def test_post_bad_requests(api, accounts):
    base = {"account": "alice", "amount": 1, "currency": "USD"}
    cases = [
        (None, base, "idempotency-key-missing"),
        ('"unterminated', base, "idempotency-key-invalid"),
        ("x" * 256, base, "idempotency-key-invalid"),
        ("ok", b"not json", "invalid-json"),
        ("ok", b"[1]", "invalid-json"),
        ("ok", b'{"account":"alice","account":"alice","amount":1,"currency":"USD"}', "invalid-json"),
        ("ok", dict(base, memo="x"), "invalid-json"),
        ("ok", dict(base, account="@world"), "invalid-account-id"),
        ("ok", dict(base, account=7), "invalid-account-id"),
        ("ok", b'{"account":"alice","amount":1.0,"currency":"USD"}', "invalid-amount"),
        ("ok", b'{"account":"alice","amount":1e3,"currency":"USD"}', "invalid-amount"),
        ("ok", dict(base, amount=0), "invalid-amount"),
        ("ok", dict(base, amount=AMOUNT_MAX + 1), "invalid-amount"),
        ("ok", dict(base, amount="1"), "invalid-amount"),
        ("ok", dict(base, currency="US"), "invalid-currency"),
        ("ok", dict(base, metadata=[]), "invalid-metadata"),
        ("ok", dict(base, metadata={"k": "x" * 4089}), "invalid-metadata"),  # 4097 bytes compact
        ("ok", dict(base, metadata={"k": "a\u0000b"}), "invalid-metadata"),
    ]
    for path in POST_OPS:
        for key, body, code in cases:
            if path == "/v1/transfers" and isinstance(body, dict) and "account" in body:
                body = {("from" if k == "account" else k): v for k, v in body.items()}
                body.setdefault("to", "bob")
            if path == "/v1/transfers" and isinstance(body, bytes):
                body = body.replace(b'"account":"alice"', b'"from":"alice","to":"bob"', 1)
                body = body.replace(b'"account":"alice"', b'"from":"alice"')
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            if key == "ok":
                key = uid("bad-")
            response = api.request("POST", path, key=key, raw=data)
            assert problem_code(response) == code, (path, key, body, response.text)
            check("POST", path, response)
    same = {"from": "alice", "to": "alice", "amount": 1, "currency": "USD"}
    response = api.request("POST", "/v1/transfers", key=uid(), body=same)
    assert problem_code(response) == "same-account"
    check("POST", "/v1/transfers", response)
    # Exactly 4096 bytes of compact metadata is fine.
    response = api.request("POST", "/v1/credits", key=uid(), body=dict(base, metadata={"k": "x" * 4088}))
    assert response.status_code == 201, response.text
    response = api.request("POST", "/v1/credits", key=uid(), body=base, headers={"Content-Type": "text/plain"})
    assert problem_code(response) == "unsupported-media-type"
    check("POST", "/v1/credits", response)


def test_post_stored_outcomes_and_reuse(api, accounts):
    cases = [
        ("/v1/credits", {"account": "nobody-here", "amount": 1, "currency": "USD"}, "account-not-found"),
        ("/v1/debits", {"account": "bob", "amount": AMOUNT_MAX, "currency": "USD"}, "insufficient-funds"),
        ("/v1/transfers", {"from": "alice", "to": "eve", "amount": 1, "currency": "USD"}, "currency-mismatch"),
        ("/v1/transfers", {"from": "alice", "to": "nobody-here", "amount": 1, "currency": "USD"}, "account-not-found"),
    ]
    for path, body, code in cases:
        key = uid("stored-")
        first = api.request("POST", path, key=key, body=body)
        assert problem_code(first) == code and first.headers["Idempotent-Replayed"] == "false", first.text
        check("POST", path, first)
        replay = api.request("POST", path, key=key, body=body)
        assert replay.headers["Idempotent-Replayed"] == "true" and replay.content == first.content
        check("POST", path, replay)
        reused = api.request("POST", path, key=key, body=dict(body, amount=2))
        assert problem_code(reused) == "idempotency-key-reused" and "Idempotent-Replayed" not in reused.headers
        check("POST", path, reused)


def test_balance_overflow(api):
    name = uid("big-")
    assert api.request("PUT", f"/v1/accounts/{name}", body={"currency": "JPY"}).status_code == 201
    codes = []
    for _ in range(1025):  # 1024 * (2^53-1) < 2^63-1 < 1025 * (2^53-1)
        credit = {"account": name, "amount": AMOUNT_MAX, "currency": "JPY"}
        response = api.request("POST", "/v1/credits", key=uid(), body=credit)
        codes.append(problem_code(response) if response.status_code != 201 else 201)
        if response.status_code != 201:
            break
    assert codes[-1] == "balance-overflow" and codes.count(201) == 1024, codes[-3:]
    check("POST", "/v1/credits", response)


def test_get_transfer(api, accounts):
    response = api.request("GET", f"/v1/transfers/{accounts['transfer_id']}")
    assert check("GET", "/v1/transfers/{id}", response)["to"] == "alice"
    for raw in ("999999999999", "abc", "99999999999999999999", "-1"):
        response = api.request("GET", f"/v1/transfers/{raw}")
        assert problem_code(response) == "transfer-not-found", raw
        check("GET", "/v1/transfers/{id}", response)


IDEMPOTENCY_KEY_CORPUS = [
    "abc-123",
    "A",
    "x" * 255,
    "x" * 256,
    "!#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "a b",
    'a"b',
    '"',
    '""',
    '"a b"',
    '"a',
    '"a"b"',
    '"a\\"b"',
    '"a\\\\b"',
    '"a\\nb"',
    '"' + "x" * 255 + '"',
    '"' + "x" * 256 + '"',
    '"' + '\\"' * 255 + '"',
    '"' + '\\"' * 256 + '"',
    "caf\u00e9",
    "a\tb",
]


def test_idempotency_key_pattern_agrees_with_the_server(api):
    """For a corpus of header values: the documented pattern matches exactly those the server accepts."""
    pattern = re.compile(resolve(DOC["components"]["parameters"]["IdempotencyKey"])["schema"]["pattern"])
    for value in IDEMPOTENCY_KEY_CORPUS:
        # `{}` passes the header check and then fails the body check: nothing is ever written.
        response = api.request("POST", "/v1/credits", key=value, raw=b"{}")
        accepted = problem_code(response) != "idempotency-key-invalid"
        assert accepted == bool(pattern.search(value)), (value, response.text)


def test_request_id_is_echoed_or_replaced(server):
    echoed = requests.get(server.base + "/health", headers={"X-Request-Id": "trace-42"}, timeout=TIMEOUT)
    assert echoed.headers["X-Request-Id"] == "trace-42"
    for bad in ("x" * 129, "has space"):
        replaced = requests.get(server.base + "/health", headers={"X-Request-Id": bad}, timeout=TIMEOUT)
        assert replaced.status_code == 200 and replaced.headers["X-Request-Id"] != bad
        check("GET", "/health", replaced)


def test_database_unavailable(tokens):
    """A service whose database is unreachable: 503 with Retry-After on /health, /health/ready and /v1; /metrics and
    /health/live still work."""
    dead = f"host=127.0.0.1 port={lt.free_port()} user=postgres dbname=none connect_timeout=2"
    srv = lt.LedgerServer(None, ["--no-migrate", "--connect-timeout-s", "2"], url=dead)
    try:
        srv.wait_healthy(60, answering_only=True)
        api = Api(srv.base, tokens["a"])
        health = requests.get(srv.base + "/health", timeout=TIMEOUT)
        assert problem_code(health) == "database-unavailable" and health.headers["Retry-After"].isdigit()
        check("GET", "/health", health)
        ready = requests.get(srv.base + "/health/ready", timeout=TIMEOUT)
        assert problem_code(ready) == "database-unavailable" and ready.headers["Retry-After"].isdigit()
        check("GET", "/health/ready", ready)
        assert check("GET", "/health/live", requests.get(srv.base + "/health/live", timeout=TIMEOUT)) == {"status": "ok"}
        for method, path in sorted(ROUTES):
            if path.startswith("/v1/"):
                body = POST_BODIES.get(path) or ({"currency": "USD"} if method == "PUT" else None)
                target = path.replace("{id}", "1").replace("{key}", "k")
                response = api.request(method, target, body=body, key=uid())
                assert problem_code(response) == "database-unavailable", (method, path, response.text)
                check(method, path, response)
        check("GET", "/metrics", requests.get(srv.base + "/metrics", timeout=TIMEOUT))
    finally:
        srv.stop()


def test_metadata_numbers_are_measured_as_stored_and_never_a_server_error(api, accounts):
    """jsonb stores numbers without exponents: out-of-range ones and ones that expand past 4096 bytes are 400."""
    for lexeme in ("1e200000", "1e-200000", "1e5000"):
        data = b'{"account":"alice","amount":1,"currency":"USD","metadata":{"x":' + lexeme.encode() + b"}}"
        response = api.request("POST", "/v1/credits", key=uid(), raw=data)
        check("POST", "/v1/credits", response)
        assert problem_code(response) == "invalid-metadata", (lexeme, response.text)
    data = b'{"account":"alice","amount":1,"currency":"USD","metadata":{"x":1.5e2}}'
    response = api.request("POST", "/v1/credits", key=uid(), raw=data)
    assert response.status_code == 201, response.text
    assert response.json()["metadata"] == {"x": 150}


def test_precedence_as_described(api, server):
    """The order the description's Precedence section states."""
    big = b"{" + b" " * (64 * 1024) + b"}"
    anon = Api(server.base, None)
    assert problem_code(anon.request("POST", "/v1/credits", raw=big, key="k")) == "unauthorized"
    assert problem_code(anon.request("GET", "/v1/no-such-route")) == "unauthorized"
    assert problem_code(anon.request("GET", "/no-such-route", raw=big)) == "body-too-large"
    assert problem_code(api.request("GET", "/v1/no-such-route", raw=big)) == "body-too-large"
    assert problem_code(api.request("DELETE", "/v1/credits", raw=b"nonsense")) == "method-not-allowed"
    text = {"Content-Type": "text/plain"}
    assert problem_code(api.request("POST", "/v1/credits", raw=b"nonsense", headers=text)) == "idempotency-key-missing"
    response = api.request("POST", "/v1/credits", key=uid(), raw=b"nonsense", headers=text)
    assert problem_code(response) == "unsupported-media-type"
    assert problem_code(api.request("PUT", "/v1/accounts/%40x", raw=b"nonsense", headers=text)) == "invalid-account-id"
    assert problem_code(api.request("GET", "/v1/accounts/%40x/entries?limit=0")) == "invalid-account-id"
    assert problem_code(api.request("GET", "/v1/accounts/nobody-here/entries?limit=0")) == "invalid-limit"
    assert problem_code(api.request("GET", "/v1/accounts/nobody-here/entries?limit=1&cursor=x")) == "invalid-cursor"
    body = {"from": "@x", "to": "@x", "amount": 1.5, "currency": "usd", "metadata": [], "extra": 1}
    steps = [
        ("invalid-json", lambda b: b.pop("extra")),
        ("invalid-account-id", lambda b: b.update({"from": "p1", "to": "p1"})),
        ("invalid-amount", lambda b: b.update({"amount": 1})),
        ("invalid-currency", lambda b: b.update({"currency": "USD"})),
        ("same-account", lambda b: b.update({"to": "p2"})),
        ("invalid-metadata", lambda b: b.update({"metadata": {}})),
    ]
    for code, fix in steps:
        assert problem_code(api.request("POST", "/v1/transfers", key=uid(), body=body)) == code, body
        fix(body)
    # All fixed: the accounts do not exist, a stored outcome.
    assert problem_code(api.request("POST", "/v1/transfers", key=uid(), body=body)) == "account-not-found"


# --------------------------------------------------------------------------------------------------------------------
# The live service: holds, reversals and conditional requests


def test_holds_lifecycle(api, accounts):
    name = uid("payer-")
    assert api.request("PUT", f"/v1/accounts/{name}", body={"currency": "USD"}).status_code == 201
    credit = {"account": name, "amount": 1000, "currency": "USD"}
    assert api.request("POST", "/v1/credits", key=uid(), body=credit).status_code == 201
    body = {"from": name, "amount": 600, "currency": "USD", "expires_in_s": 3600, "metadata": {"order": "1"}}
    key = uid("place-")
    placed = api.request("POST", "/v1/holds", key=key, body=body)
    hold = check("POST", "/v1/holds", placed)
    assert placed.status_code == 201 and placed.headers["Idempotent-Replayed"] == "false"
    assert hold["status"] == "pending" and hold["to"] == "@world" and hold["transfer_id"] is None
    replay = api.request("POST", "/v1/holds", key=key, body=body)
    assert replay.headers["Idempotent-Replayed"] == "true" and replay.content == placed.content
    check("POST", "/v1/holds", replay)
    account = check("GET", "/v1/accounts/{id}", api.request("GET", f"/v1/accounts/{name}"))
    assert (account["balance"], account["held"], account["available"], account["version"]) == (1000, 600, 400, 1)
    assert check("GET", "/v1/holds/{id}", api.request("GET", f"/v1/holds/{hold['id']}")) == hold
    # Funds checks use available.
    short = api.request("POST", "/v1/debits", key=uid(), body={"account": name, "amount": 401, "currency": "USD"})
    assert problem_code(short) == "insufficient-funds"
    check("POST", "/v1/debits", short)
    # Capture part of it: a transfer carrying hold_id, the whole hold leaves held.
    captured = api.request("POST", f"/v1/holds/{hold['id']}/capture", key=uid(), body={"amount": 250})
    after = check("POST", "/v1/holds/{id}/capture", captured)
    assert captured.status_code == 200 and after["status"] == "captured" and after["captured_amount"] == 250
    transfer = check("GET", "/v1/transfers/{id}", api.request("GET", f"/v1/transfers/{after['transfer_id']}"))
    assert transfer["hold_id"] == hold["id"] and transfer["amount"] == 250 and transfer["metadata"] == {"order": "1"}
    account = check("GET", "/v1/accounts/{id}", api.request("GET", f"/v1/accounts/{name}"))
    assert (account["balance"], account["held"], account["available"]) == (750, 0, 750)
    # Void of another hold; then both are no longer pending.
    other = place_hold(api, **{"from": name, "to": "bob", "amount": 100})
    voided = api.request("POST", f"/v1/holds/{other['id']}/void", key=uid())
    assert voided.status_code == 200 and check("POST", "/v1/holds/{id}/void", voided)["status"] == "voided"
    cases = [
        (f"/v1/holds/{hold['id']}/capture", "/v1/holds/{id}/capture", None, "hold-captured"),
        (f"/v1/holds/{hold['id']}/void", "/v1/holds/{id}/void", None, "hold-captured"),
        (f"/v1/holds/{other['id']}/capture", "/v1/holds/{id}/capture", {}, "hold-voided"),
        (f"/v1/holds/{other['id']}/void", "/v1/holds/{id}/void", {}, "hold-voided"),
        ("/v1/holds/999999999999/capture", "/v1/holds/{id}/capture", None, "hold-not-found"),
        ("/v1/holds/abc/void", "/v1/holds/{id}/void", None, "hold-not-found"),
    ]
    for path, template, payload, code in cases:
        key = uid()
        first = api.request("POST", path, key=key, body=payload)
        assert problem_code(first) == code and first.headers["Idempotent-Replayed"] == "false", (path, first.text)
        check("POST", template, first)
        again = api.request("POST", path, key=key, body=payload)
        assert again.headers["Idempotent-Replayed"] == "true" and again.content == first.content
        check("POST", template, again)
    big = place_hold(api, **{"from": name, "amount": 10})
    response = api.request("POST", f"/v1/holds/{big['id']}/capture", key=uid(), body={"amount": 11})
    assert problem_code(response) == "capture-exceeds-hold"
    check("POST", "/v1/holds/{id}/capture", response)
    # A hold past its expiry reads expired and can no longer be captured.
    short_lived = place_hold(api, **{"from": name, "amount": 1, "expires_in_s": 1})
    deadline = time.monotonic() + 10
    while True:
        read = check("GET", "/v1/holds/{id}", api.request("GET", f"/v1/holds/{short_lived['id']}"))
        if read["status"] == "expired" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert read["status"] == "expired"
    response = api.request("POST", f"/v1/holds/{short_lived['id']}/void", key=uid())
    assert problem_code(response) == "hold-expired"
    check("POST", "/v1/holds/{id}/void", response)
    for path in ("/v1/holds/999999999999", "/v1/holds/x"):
        response = api.request("GET", path)
        assert problem_code(response) == "hold-not-found"
        check("GET", "/v1/holds/{id}", response)
    # The payer's holds, newest first, paged and filtered.
    page = check("GET", "/v1/accounts/{id}/holds", api.request("GET", f"/v1/accounts/{name}/holds?limit=2"))
    assert [h["id"] for h in page["holds"]] == [short_lived["id"], big["id"]] and page["next_cursor"]
    rest = api.request("GET", f"/v1/accounts/{name}/holds", params={"limit": 2, "cursor": page["next_cursor"]})
    assert [h["id"] for h in check("GET", "/v1/accounts/{id}/holds", rest)["holds"]] == [other["id"], hold["id"]]
    voided_only = api.request("GET", f"/v1/accounts/{name}/holds?status=voided")
    assert [h["id"] for h in check("GET", "/v1/accounts/{id}/holds", voided_only)["holds"]] == [other["id"]]
    for path, code in [
        (f"/v1/accounts/{name}/holds?status=open", "invalid-status"),
        (f"/v1/accounts/{name}/holds?limit=0", "invalid-limit"),
        (f"/v1/accounts/{name}/holds?cursor=abc", "invalid-cursor"),
        ("/v1/accounts/%40world/holds", "invalid-account-id"),
        ("/v1/accounts/nobody-here/holds", "account-not-found"),
    ]:
        response = api.request("GET", path)
        assert problem_code(response) == code, (path, response.text)
        check("GET", "/v1/accounts/{id}/holds", response)


def test_hold_bad_requests_and_outcomes(api, accounts):
    base = {"from": "alice", "to": "bob", "amount": 1, "currency": "USD"}
    cases = [
        (None, base, "idempotency-key-missing"),
        ("ok", dict(base, extra=1), "invalid-json"),
        ("ok", dict(base, to=None), "invalid-account-id"),
        ("ok", dict(base, to="@world"), "invalid-account-id"),
        ("ok", dict(base, amount=0), "invalid-amount"),
        ("ok", dict(base, currency="usd"), "invalid-currency"),
        ("ok", dict(base, to="alice"), "same-account"),
        ("ok", dict(base, metadata=[]), "invalid-metadata"),
        ("ok", dict(base, expires_in_s=0), "invalid-expiry"),
        ("ok", dict(base, expires_in_s=2592001), "invalid-expiry"),
        ("ok", dict(base, expires_in_s=1.5), "invalid-expiry"),
        ("ok", dict(base, **{"from": "nobody-here"}), "account-not-found"),
        ("ok", dict(base, to="eve"), "currency-mismatch"),
        ("ok", dict(base, amount=AMOUNT_MAX), "insufficient-funds"),
    ]
    for key, body, code in cases:
        response = api.request("POST", "/v1/holds", key=uid() if key == "ok" else key, body=body)
        assert problem_code(response) == code, (body, response.text)
        check("POST", "/v1/holds", response)
    hold = accounts["hold_id"]
    for path, template in [
        (f"/v1/holds/{hold}/capture", "/v1/holds/{id}/capture"),
        (f"/v1/transfers/{accounts['transfer_id']}/reversals", "/v1/transfers/{id}/reversals"),
    ]:
        for raw, code in [
            (b"[]", "invalid-json"),
            (b'{"memo":1}', "invalid-json"),
            (b'{"amount":0}', "invalid-amount"),
            (b'{"amount":1.0}', "invalid-amount"),
            (b'{"metadata":[]}', "invalid-metadata"),
        ]:
            response = api.request("POST", path, key=uid(), raw=raw)
            assert problem_code(response) == code, (path, raw, response.text)
            check("POST", template, response)
    for raw in (b'{"amount":1}', b"[]"):
        response = api.request("POST", f"/v1/holds/{hold}/void", key=uid(), raw=raw)
        assert problem_code(response) == "invalid-json", response.text
        check("POST", "/v1/holds/{id}/void", response)
    response = api.request("POST", f"/v1/holds/{hold}/void", raw=b"{}")
    assert problem_code(response) == "idempotency-key-missing"
    check("POST", "/v1/holds/{id}/void", response)
    # The same key for another hold operation: reused.
    key = uid()
    assert api.request("POST", "/v1/holds", key=key, body=base).status_code == 201
    for path, template in [
        (f"/v1/holds/{hold}/capture", "/v1/holds/{id}/capture"),
        (f"/v1/holds/{hold}/void", "/v1/holds/{id}/void"),
        (f"/v1/transfers/{accounts['transfer_id']}/reversals", "/v1/transfers/{id}/reversals"),
    ]:
        response = api.request("POST", path, key=key)
        assert problem_code(response) == "idempotency-key-reused" and "Idempotent-Replayed" not in response.headers
        check("POST", template, response)


def test_reversals(api, accounts):
    name = uid("refund-")
    assert api.request("PUT", f"/v1/accounts/{name}", body={"currency": "USD"}).status_code == 201
    payment = {"from": "alice", "to": name, "amount": 100, "currency": "USD"}
    original = check("POST", "/v1/transfers", api.request("POST", "/v1/transfers", key=uid(), body=payment))
    assert (original["hold_id"], original["reverses"], original["reversed_amount"]) == (None, None, 0)
    key = uid("rev-")
    first = api.request("POST", f"/v1/transfers/{original['id']}/reversals", key=key, body={"amount": 30})
    reversal = check("POST", "/v1/transfers/{id}/reversals", first)
    assert first.status_code == 201 and first.headers["Idempotent-Replayed"] == "false"
    assert (reversal["from"], reversal["to"], reversal["reverses"]) == (name, "alice", original["id"])
    replay = api.request("POST", f"/v1/transfers/{original['id']}/reversals", key=key, body={"amount": 30})
    assert replay.headers["Idempotent-Replayed"] == "true" and replay.content == first.content
    got = check("GET", "/v1/transfers/{id}", api.request("GET", f"/v1/transfers/{original['id']}"))
    assert got["reversed_amount"] == 30
    # An empty body reverses the rest.
    rest = api.request("POST", f"/v1/transfers/{original['id']}/reversals", key=uid())
    assert check("POST", "/v1/transfers/{id}/reversals", rest)["amount"] == 70
    cases = [
        (original["id"], None, "reversal-exceeds-transfer"),
        (reversal["id"], None, "transfer-not-reversible"),
        ("999999999999", None, "transfer-not-found"),
        ("abc", {}, "transfer-not-found"),
    ]
    for transfer_id, payload, code in cases:
        key = uid()
        response = api.request("POST", f"/v1/transfers/{transfer_id}/reversals", key=key, body=payload)
        assert problem_code(response) == code and response.headers["Idempotent-Replayed"] == "false", response.text
        check("POST", "/v1/transfers/{id}/reversals", response)
        again = api.request("POST", f"/v1/transfers/{transfer_id}/reversals", key=key, body=payload)
        assert again.headers["Idempotent-Replayed"] == "true" and again.content == response.content
    # The payer of a reversal needs funds: name spent what it got.
    second = check("POST", "/v1/transfers", api.request("POST", "/v1/transfers", key=uid(), body=payment))
    spend = {"account": name, "amount": 100, "currency": "USD"}
    assert api.request("POST", "/v1/debits", key=uid(), body=spend).status_code == 201
    response = api.request("POST", f"/v1/transfers/{second['id']}/reversals", key=uid())
    assert problem_code(response) == "insufficient-funds", response.text
    check("POST", "/v1/transfers/{id}/reversals", response)


def test_conditional_requests(api, accounts):
    name = uid("cond-")
    assert api.request("PUT", f"/v1/accounts/{name}", body={"currency": "USD"}).status_code == 201
    read = api.request("GET", f"/v1/accounts/{name}")
    assert read.headers["ETag"] == '"0"' and check("GET", "/v1/accounts/{id}", read)["version"] == 0
    for value in ('"0"', 'W/"0"', '*', '"5", "0"'):
        response = api.request("GET", f"/v1/accounts/{name}", headers={"If-None-Match": value})
        assert response.status_code == 304 and response.headers["ETag"] == '"0"', value
        check("GET", "/v1/accounts/{id}", response)
    response = api.request("GET", f"/v1/accounts/{name}", headers={"If-None-Match": '"1"'})
    assert response.status_code == 200
    check("GET", "/v1/accounts/{id}", response)
    credit = {"account": name, "amount": 50, "currency": "USD"}
    ok = api.request("POST", "/v1/credits", key=uid(), body=credit, headers={"If-Match": '"0"'})
    assert ok.status_code == 201, ok.text
    check("POST", "/v1/credits", ok)
    bodies = {
        "/v1/credits": credit,
        "/v1/debits": {"account": name, "amount": 1, "currency": "USD"},
        "/v1/transfers": {"from": name, "to": "bob", "amount": 1, "currency": "USD"},
        "/v1/holds": {"from": name, "to": "bob", "amount": 1, "currency": "USD"},
    }
    for path, body in bodies.items():
        version = api.request("GET", f"/v1/accounts/{name}").json()["version"]
        assert version >= 1
        key = uid()
        stale = api.request("POST", path, key=key, body=body, headers={"If-Match": '"0"'})
        assert stale.status_code == 412 and stale.json()["current_version"] == version, stale.text
        assert stale.headers["Idempotent-Replayed"] == "false"
        check("POST", path, stale)
        again = api.request("POST", path, key=key, body=body, headers={"If-Match": '"0"'})
        assert again.headers["Idempotent-Replayed"] == "true" and again.content == stale.content
        check("POST", path, again)
        other = api.request("POST", path, key=key, body=body, headers={"If-Match": f'"{version}"'})
        assert problem_code(other) == "idempotency-key-reused"
        check("POST", path, other)
        for value in ('W/"1"', "*", '"01"', "1", '"1", "2"'):
            response = api.request("POST", path, key=uid(), body=body, headers={"If-Match": value})
            assert problem_code(response) == "invalid-if-match", (path, value, response.text)
            check("POST", path, response)
        current = api.request("POST", path, key=uid(), body=body, headers={"If-Match": f'"{version}"'})
        assert current.status_code == 201, (path, current.text)
        check("POST", path, current)


# --------------------------------------------------------------------------------------------------------------------
# The live service: idempotency seen from the client


KEYED_POSTS = sorted(POST_BODIES)


def keyed_target(api, accounts, path: str) -> str:
    """A concrete path of a keyed POST; captures and voids get a pending hold of their own."""
    if path.startswith("/v1/holds/"):
        return path.replace("{id}", place_hold(api)["id"])
    return concrete(path, accounts)


def key_path(key: str) -> str:
    return "/v1/idempotency-keys/" + urllib.parse.quote(key, safe="")


@pytest.mark.parametrize("path", KEYED_POSTS)
def test_idempotency_ttl_and_preference_applied_on_every_keyed_post(api, accounts, path):
    key = uid("ttl-")
    target = keyed_target(api, accounts, path)
    prefer = {"Prefer": "wait=2"}
    first = api.request("POST", target, key=key, body=POST_BODIES[path], headers=prefer)
    assert first.status_code in (200, 201), first.text
    check("POST", path, first)
    assert first.headers["Idempotency-TTL"].isdigit() and first.headers["Preference-Applied"] == "wait=2"
    replay = api.request("POST", target, key=key, body=POST_BODIES[path])
    check("POST", path, replay)
    assert replay.headers["Idempotent-Replayed"] == "true" and replay.headers["Idempotency-TTL"].isdigit()
    assert "Preference-Applied" not in replay.headers
    # Not stored: no Idempotency-TTL, but Preference-Applied on whatever is answered.
    body = json.dumps(POST_BODIES[path]).encode()
    for headers, key_sent, data, status in [
        (prefer, None, body, 400),
        (dict(prefer, **{"Content-Type": "text/plain"}), uid(), body, 415),
        (prefer, accounts["key"], body, 422),  # the key of another request: reused
    ]:
        response = api.request("POST", target, key=key_sent, raw=data, headers=headers)
        assert response.status_code == status, (status, response.text)
        assert "Idempotency-TTL" not in response.headers and response.headers["Preference-Applied"] == "wait=2"
        check("POST", path, response)
    # A malformed preference is ignored: no Preference-Applied.
    ignored = api.request("POST", target, key=key, body=POST_BODIES[path], headers={"Prefer": "wait=soon"})
    assert ignored.status_code == first.status_code and "Preference-Applied" not in ignored.headers
    check("POST", path, ignored)


def test_stored_problems_carry_idempotency_ttl(api, accounts):
    cases = [
        ("/v1/credits", "/v1/credits", {"account": "nobody-here", "amount": 1, "currency": "USD"}, None, 404),
        ("/v1/debits", "/v1/debits", {"account": "bob", "amount": AMOUNT_MAX, "currency": "USD"}, None, 422),
        ("/v1/debits", "/v1/debits", {"account": "bob", "amount": 1, "currency": "USD"}, '"999"', 412),
        ("/v1/holds/999999999999/void", "/v1/holds/{id}/void", {}, None, 404),
        ("/v1/transfers/999999999999/reversals", "/v1/transfers/{id}/reversals", {}, None, 404),
    ]
    for target, template, body, if_match, status in cases:
        headers = {"Prefer": "wait=1", **({"If-Match": if_match} if if_match else {})}
        key = uid("stored-ttl-")
        for _ in range(2):
            response = api.request("POST", target, key=key, body=body, headers=headers)
            assert response.status_code == status, response.text
            assert response.headers["Idempotency-TTL"].isdigit() and response.headers["Preference-Applied"] == "wait=1"
            check("POST", template, response)


def test_in_progress_answers_at_once_with_prefer_wait_0(api, accounts, database):
    key = uid("busy-")
    with lt.holding_key_lock(database, "openapi-a", key):
        response = api.request("POST", "/v1/credits", key=key, body=POST_BODIES["/v1/credits"],
                               headers={"Prefer": "wait=0"})
        assert problem_code(response) == "idempotency-key-in-progress", response.text
        assert response.headers["Preference-Applied"] == "wait=0" and "Idempotency-TTL" not in response.headers
        check("POST", "/v1/credits", response)
        state = api.request("GET", key_path(key))
        assert check("GET", "/v1/idempotency-keys/{key}", state)["state"] == "in_progress"


def test_get_idempotency_key(api, accounts, tokens, server, database):
    template = "/v1/idempotency-keys/{key}"
    # Completed: a transfer, and a stored failure; a key with a space and a slash, sent as an sf-string.
    key = "order 42/" + uid()
    credit = api.request("POST", "/v1/credits", key=f'"{key}"', body=POST_BODIES["/v1/credits"])
    assert credit.status_code == 201, credit.text
    state = check("GET", template, api.request("GET", key_path(key)))
    assert state["key"] == key and state["state"] == "completed" and state["transfer_id"] == credit.json()["id"]
    assert (state["method"], state["path"], state["status"]) == ("POST", "/v1/credits", 201)
    failed_key = uid("failed-")
    failed = api.request("POST", "/v1/debits", key=failed_key, body={"account": "bob", "amount": AMOUNT_MAX, "currency": "USD"})
    assert problem_code(failed) == "insufficient-funds"
    state = check("GET", template, api.request("GET", key_path(failed_key)))
    assert (state["state"], state["status"], state["transfer_id"]) == ("completed", 422, None)
    # Consumed: the stored outcome purged, the transfer made. A purged failure is not found.
    lt.psql(database, f"DELETE FROM ledger.idempotency_keys WHERE client_id = 'openapi-a' "
                      f"AND key IN ({lt.sql_literal(key)}, {lt.sql_literal(failed_key)})")
    state = check("GET", template, api.request("GET", key_path(key)))
    assert state == {"key": key, "state": "consumed", "method": None, "path": None, "status": None,
                     "created_at": None, "expires_at": None, "transfer_id": credit.json()["id"]}
    for path, code in [
        (key_path(failed_key), "idempotency-key-not-found"),
        (key_path(uid("never-")), "idempotency-key-not-found"),
        ("/v1/idempotency-keys/" + "x" * 256, "idempotency-key-invalid"),
        ("/v1/idempotency-keys/a%01b", "idempotency-key-invalid"),
        ("/v1/idempotency-keys/%C3%A9", "idempotency-key-invalid"),
        ("/v1/idempotency-keys/%FF", "idempotency-key-invalid"),
    ]:
        response = api.request("GET", path)
        assert problem_code(response) == code, (path, response.text)
        check("GET", template, response)
    # Another client's key.
    other = Api(server.base, tokens["b"]).request("GET", key_path(accounts["key"]))
    assert problem_code(other) == "idempotency-key-not-found"
    check("GET", template, other)
    # Reading a key sends none of the POSTs' headers.
    read = api.request("GET", key_path(accounts["key"]), headers={"Prefer": "wait=1"})
    assert not set(PROTOCOL_HEADERS) & set(read.headers), read.headers
