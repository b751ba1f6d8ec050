"""The admin API fails closed (issue 8): a weak admin token stops the server, every wrong way of
presenting the token is refused, and hostile input is a 4xx that stores nothing a later read
chokes on (a list route answering 500 forever, a CLI that cannot print a date, a restart that fails).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from control_harness import Admin, start_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedmesh.cli.control import _when
from embedmesh.control.admin import MAX_BODY, MAX_JSON_DEPTH, MIN_ADMIN_TOKEN_LENGTH, new_admin_token
from embedmesh.control.coordinator import Coordinator, CoordinatorConfig
from embedmesh.control.errors import BadRequestError, StoreError
from embedmesh.control.messages import RegisterRequest
from embedmesh.control.server import ControlServer, RunningServer, ServerConfig
from embedmesh.control.store import Store
from embedmesh.errors import ConfigError

CLI = [sys.executable, "-m", "embedmesh.cli.main"]

# ---------------------------------------------------------------------------------------------- the token


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty"),
        (b"\n", "empty"),
        (b"hunter2\n", "has 7 characters, fewer than 32"),
        (b"x" * 31, "has 31 characters"),
        (b"a b c d e f g h i j k l m n o p q r s t", "without spaces"),
        ("é".encode() * 40, "not printable ASCII"),
    ],
)
def test_the_server_refuses_to_start_with_a_weak_admin_token(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    state = tmp_path / "server"
    state.mkdir(mode=0o700)
    token = state / "admin-token"
    token.write_bytes(content)
    token.chmod(0o600)
    with pytest.raises(ConfigError, match=reason) as info:
        ControlServer(ServerConfig(state_dir=state))
    # What applications catch (ConfigError), and still a StoreError for older callers.
    assert isinstance(info.value, StoreError)
    assert f"delete {token}" in str(info.value)
    # Exactly 32 is enough.
    token.write_bytes(b"k" * MIN_ADMIN_TOKEN_LENGTH + b"\n")
    server = ControlServer(ServerConfig(state_dir=state))
    assert server.admin_token == "k" * 32
    server.close()


def test_control_serve_with_an_empty_token_is_one_line(tmp_path: Path) -> None:
    state = tmp_path / "server"
    state.mkdir(mode=0o700)
    (state / "admin-token").write_bytes(b"")
    (state / "admin-token").chmod(0o600)
    result = subprocess.run(
        [*CLI, "control", "serve", "--listen", "127.0.0.1:0", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: the admin token in "), result.stderr
    assert "restart the server to generate one" in lines[0]


def test_the_generated_token_is_long_and_private(tmp_path: Path) -> None:
    assert len(new_admin_token().strip()) >= MIN_ADMIN_TOKEN_LENGTH
    assert len({new_admin_token() for _ in range(100)}) == 100
    server = ControlServer(ServerConfig(state_dir=tmp_path / "server"))
    try:
        token_file = tmp_path / "server" / "admin-token"
        assert len(server.admin_token) >= MIN_ADMIN_TOKEN_LENGTH
        assert token_file.read_text().strip() == server.admin_token
        assert token_file.stat().st_mode & 0o777 == 0o600
    finally:
        server.close()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with start_server(tmp_path_factory.mktemp("admin") / "server") as server:
        yield server


#: Every admin route, with a body where it takes one.
ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/admin/v1/authkeys", {"reusable": True}),
    ("GET", "/admin/v1/authkeys", None),
    ("POST", "/admin/v1/authkeys/0123456789ab/revoke", None),
    ("GET", "/admin/v1/nodes", None),
    ("GET", "/admin/v1/nodes/1", None),
    ("DELETE", "/admin/v1/nodes/1", None),
    ("POST", "/admin/v1/nodes/1/approve", None),
    ("POST", "/admin/v1/nodes/1/expire", None),
    ("POST", "/admin/v1/nodes/1/rename", {"name": "x"}),
    ("GET", "/admin/v1/dns", None),
    ("PUT", "/admin/v1/dns", {"extra_records": []}),
]


def _wrong_forms(token: str) -> dict[str, list[tuple[str, str]]]:
    return {
        "absent": [],
        "empty": [("authorization", "")],
        "scheme only": [("authorization", "Bearer")],
        "scheme and a space": [("authorization", "Bearer ")],
        "no space": [("authorization", f"Bearer{token}")],
        "two spaces": [("authorization", f"Bearer  {token}")],
        "tab": [("authorization", f"Bearer\t{token}")],
        "token alone": [("authorization", token)],
        "basic": [("authorization", f"Basic {token}")],
        "token scheme": [("authorization", f"Token {token}")],
        "wrong token": [("authorization", f"Bearer {'x' * len(token)}")],
        "case of the token": [("authorization", f"Bearer {token.swapcase()}")],
        "prefix": [("authorization", f"Bearer {token[:-1]}")],
        "longer": [("authorization", f"Bearer {token}x")],
        "extra word": [("authorization", f"Bearer {token} {token}")],
        "in another header": [("x-authorization", f"Bearer {token}")],
        "two headers": [("authorization", f"Bearer {token}"), ("authorization", f"Bearer {token}")],
        "wrong then right": [("authorization", "Bearer nope"), ("authorization", f"Bearer {token}")],
    }


FORMS = list(_wrong_forms("t" * 43))


@pytest.mark.parametrize("form", FORMS)
def test_admin_routes_refuse_every_missing_empty_or_wrong_token(running: RunningServer, form: str) -> None:
    headers = _wrong_forms(running.server.admin_token)[form]
    before = len(running.call(running.server.coordinator.store.list_auth_keys))
    host, port = running.url.removeprefix("http://").rsplit(":", 1)
    for method, path, body in ROUTES:
        # http.client, not httpx: it sends header values httpx's h11 refuses ("Bearer ").
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for name, value in headers:
                conn.putheader(name, value)
            data = b"" if body is None else json.dumps(body).encode()
            conn.putheader("content-length", str(len(data)))
            conn.endheaders(data)
            response = conn.getresponse()
            text = response.read()
        finally:
            conn.close()
        assert response.status == 401, (form, method, path, text)
        assert json.loads(text)["error"]["code"] == "unauthorized"
    # Nothing was created on the way.
    assert len(running.call(running.server.coordinator.store.list_auth_keys)) == before


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_right_token_is_accepted_with_any_case_of_the_scheme(running: RunningServer, scheme: str) -> None:
    response = httpx.get(
        f"{running.url}/admin/v1/nodes",
        headers={"authorization": f"{scheme} {running.server.admin_token}"},
        timeout=10,
    )
    assert response.status_code == 200


# ---------------------------------------------------------------------------------------------- input


def _raw(admin: Admin, method: str, path: str, body: bytes | str) -> httpx.Response:
    return admin.http.request(method, f"/admin/v1{path}", content=body)


def _lists_answer(admin: Admin) -> None:
    for path in ("/authkeys", "/nodes", "/dns"):
        response = admin.http.get(f"/admin/v1{path}")
        assert response.status_code == 200, (path, response.text)


@pytest.mark.parametrize(
    "expiry",
    ["1e309", "-1e309", "NaN", "Infinity", "-Infinity", "-5", "0", "-0.0", "1" + "0" * 400, "1e300",
     "4e9", '"1h"', "true", "[]"],
)  # fmt: skip
def test_expiries_must_be_finite_positive_numbers(running: RunningServer, expiry: str) -> None:
    admin = Admin(running)
    response = _raw(admin, "POST", "/authkeys", f'{{"reusable": true, "expiry": {expiry}}}')
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "bad_request"
    _lists_answer(admin)


def test_a_long_finite_expiry_is_fine_and_printable(running: RunningServer) -> None:
    admin = Admin(running)
    response = _raw(admin, "POST", "/authkeys", '{"expiry": 3e9}')
    assert response.status_code == 201, response.text
    assert _when(response.json()["authkey"]["expires"]).startswith("2")


def test_the_coordinator_refuses_nan_and_infinite_expiries_itself() -> None:
    coordinator = Coordinator(Store(None), CoordinatorConfig(), now=0.0, random_bytes=os.urandom)
    for expiry in (math.nan, math.inf, -1.0, 0.0, 1e300):
        with pytest.raises(BadRequestError, match="expiry"):
            coordinator.create_auth_key(expiry=expiry, now=1.0)
    with pytest.raises(BadRequestError, match="at most 64 tags"):
        coordinator.create_auth_key(tags=tuple(f"tag:t{i}" for i in range(65)), now=1.0)
    assert coordinator.store.list_auth_keys() == []


@pytest.mark.parametrize(
    "node_id", ["١٢", "²", "１", "+1", "-1", "1_0", " 1", "1 ", "0x1", "1.0", "9" * 19, "%00"]
)
def test_ids_are_ascii_digits(running: RunningServer, node_id: str) -> None:
    admin = Admin(running)
    quoted = httpx.URL(f"{running.url}/admin/v1/nodes/").join(node_id.replace("%00", "%2500")).raw_path
    for method, suffix in (("GET", ""), ("DELETE", ""), ("POST", "/approve"), ("POST", "/expire")):
        response = admin.http.request(method, quoted.decode() + suffix)
        assert response.status_code == 400, (node_id, method, suffix, response.text)
        assert "is not a number" in response.json()["error"]["message"]


@pytest.mark.parametrize("key_id", ["ZZZZZZZZZZZZ", "0123456789AB", "١٢٣٤٥٦٧٨٩٠١٢", "abc", "0" * 64])
def test_key_ids_are_hex(running: RunningServer, key_id: str) -> None:
    response = Admin(running).http.post(f"/admin/v1/authkeys/{key_id}/revoke")
    assert response.status_code == 400 and "not an auth key id" in response.text


def test_bodies_are_bounded_in_size(running: RunningServer) -> None:
    admin = Admin(running)
    big = json.dumps({"tags": ["tag:a"] * (MAX_BODY // 8)}).encode()
    assert len(big) > MAX_BODY
    response = _raw(admin, "POST", "/authkeys", big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:
        # No Content-Length (chunked): the limit holds while reading.
        for _ in range(MAX_BODY // 1024 + 2):
            yield b" " * 1024

    response = admin.http.put("/admin/v1/dns", content=chunks())
    assert response.status_code == 413
    _lists_answer(admin)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 100, 100_000])
def test_json_nesting_is_bounded(running: RunningServer, depth: int) -> None:
    admin = Admin(running)
    for path, method in (("/authkeys", "POST"), ("/dns", "PUT"), ("/nodes/1/rename", "POST")):
        body = '{"tags": ' + "[" * depth + "]" * depth + "}"
        if len(body) > MAX_BODY:
            body = "[" * depth
        response = _raw(admin, method, path, body)
        assert response.status_code in (400, 413), (depth, path, response.text)
    # Brackets inside strings are text, not nesting.
    response = _raw(admin, "POST", "/authkeys", json.dumps({"tags": ["[" * 100]}))
    assert response.status_code == 400 and "tag:<lowercase-name>" in response.text


def test_unknown_fields_are_refused(running: RunningServer) -> None:
    admin = Admin(running)
    response = _raw(admin, "POST", "/authkeys", '{"expires": 3600}')
    assert response.status_code == 400 and "unknown auth key settings ['expires']" in response.text
    response = _raw(admin, "POST", "/nodes/1/rename", '{"name": "a", "id": 2}')
    assert response.status_code == 400


# ---------------------------------------------------------------------------------------------- property

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["tag:ci", "tag:web", "web", "printer", "A", "CNAME", "192.0.2.9", "corp.example"])
    | st.sampled_from(["10.0.0.53:53", "127.0.0.1:5353", "tag:" + "x" * 70, "", "-", "Web_1"])
)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=24,
)
_numbers = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.sampled_from([math.inf, -math.inf, math.nan, 1e308, 3.2e9, 3600, 0, -1, 10**30])
)
_tag_lists = st.lists(
    st.sampled_from(["tag:ci", "tag:web", "tag:db", "ci", "tag:" + "x" * 70]), max_size=4
) | (st.lists(st.from_regex(r"tag:[a-z0-9][a-z0-9-]{0,8}", fullmatch=True), min_size=60, max_size=70))
_records = st.lists(
    st.tuples(
        st.sampled_from(["printer", "wiki.corp.example.", "web", "x" * 70, "1.2.3.4"]),
        st.sampled_from(["A", "AAAA", "CNAME", "MX", "TXT"]),
        st.sampled_from(["192.0.2.9", "2001:db8::1", "web", "", "999.1.1.1"]),
    ).map(list),
    max_size=3,
)
_routes = st.dictionaries(
    st.sampled_from(["corp.example", "x", "..", "CORP.example"]),
    st.lists(st.sampled_from(["10.0.0.53:53", "10.0.0.53", "[::1]:53", "host:53"]), max_size=2),
    max_size=2,
)
# Anything at all: documents that are no object, objects with any fields, and non-JSON.
_anything = (
    st.fixed_dictionaries(
        {},
        optional={
            name: _json
            for name in ("reusable", "ephemeral", "preapproved", "tags", "expiry", "name", "extra_records")
        },
    )
    | _json
)
# Documents shaped for each route (so requests get past the first checks and store something),
# with values at the edges of each field's type.
_key_settings = st.fixed_dictionaries(
    {},
    optional={
        "reusable": st.booleans(),
        "ephemeral": st.booleans(),
        "preapproved": st.booleans(),
        "tags": _tag_lists,
        "expiry": _numbers,
    },
)
_rename = st.fixed_dictionaries(
    {"name": st.from_regex(r"[a-z0-9][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True) | _scalars}
)
_dns = st.fixed_dictionaries({}, optional={"extra_records": _records, "split_dns": _routes})


def _encoded(documents: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    # json.dumps writes nan and inf as NaN and Infinity, as a careless client would.
    return documents.map(lambda d: json.dumps(d).encode())


_ANY_ROUTE = [
    ("POST", "/authkeys"),
    ("POST", "/nodes/{id}/rename"),
    ("PUT", "/dns"),
    ("POST", "/nodes/{id}/approve"),
    ("POST", "/nodes/{id}/expire"),
    ("POST", "/authkeys/{key}/revoke"),
]
_requests = st.one_of(
    st.tuples(st.just(("POST", "/authkeys")), _encoded(_key_settings)),
    st.tuples(st.just(("POST", "/nodes/{id}/rename")), _encoded(_rename)),
    st.tuples(st.just(("PUT", "/dns")), _encoded(_dns)),
    st.tuples(st.sampled_from(_ANY_ROUTE), _encoded(_anything)),
    st.tuples(st.sampled_from(_ANY_ROUTE), st.binary(max_size=40)),
)


def test_nothing_a_request_stores_breaks_a_later_read() -> None:
    """Arbitrary JSON (and non-JSON) at the create and update routes: each answer is a 2xx or a
    4xx, never a 500, and afterwards the list routes still answer 200 with values the CLI can
    print; at the end a server restarted on the same state directory loads and lists it all."""
    with tempfile.TemporaryDirectory() as folder:
        state = Path(folder) / "server"
        running = start_server(state, approval_required=True)
        try:
            coordinator = running.server.coordinator
            # A node for the node routes to act on.
            record, key = running.call(lambda: coordinator.create_auth_key(reusable=True, now=0.0))
            joining = RegisterRequest(b"n" * 32, b"d" * 32, "target", auth_key=key)
            node_id = running.call(lambda: coordinator.register(b"m" * 32, joining, 1e9).id)
            admin = Admin(running)

            @settings(
                max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
            )
            @given(request=_requests)
            def throw(request: tuple[tuple[str, str], bytes]) -> None:
                (method, template), body = request
                route = (method, template)
                path = template.format(id=node_id, key=record.id)
                response = admin.http.request(method, f"/admin/v1{path}", content=body)
                assert response.status_code < 500, (route, body, response.text)
                assert isinstance(response.json(), dict)
                for listing in ("/authkeys", "/nodes", "/dns", f"/nodes/{node_id}"):
                    answer = admin.http.get(f"/admin/v1{listing}")
                    assert answer.status_code == 200, (route, body, listing, answer.text)
                for entry in admin.http.get("/admin/v1/authkeys").json()["authkeys"]:
                    _when(entry["expires"])  # what `authkey list` prints
                    assert len(entry["tags"]) <= 64

            throw()
        finally:
            running.stop()
        # A restart reads everything the requests stored.
        with start_server(state, approval_required=True) as again:
            admin = Admin(again)
            for listing in ("/authkeys", "/nodes", "/dns"):
                assert admin.http.get(f"/admin/v1{listing}").status_code == 200
            assert again.server.coordinator.node(node_id).rec.machine_key == b"m" * 32
