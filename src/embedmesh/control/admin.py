"""The admin API: JSON over HTTP under ``/admin/v1``, authenticated by the bearer token in
``<state-dir>/admin-token``.

====================================  ==========================================================
``POST /admin/v1/authkeys``           create: ``{reusable, ephemeral, preapproved, tags, expiry}``
``GET /admin/v1/authkeys``            list
``POST /admin/v1/authkeys/{id}/revoke``
``GET /admin/v1/nodes``               list
``GET /admin/v1/nodes/{id}``
``POST /admin/v1/nodes/{id}/approve``
``POST /admin/v1/nodes/{id}/expire``
``POST /admin/v1/nodes/{id}/rename``  ``{name}``
``DELETE /admin/v1/nodes/{id}``
====================================  ==========================================================

Errors are ``{"error": {"code", "message"}}`` with 400, 401, 404, 409 or 413.

Everything here fails closed. The token must be at least :data:`MIN_ADMIN_TOKEN_LENGTH` visible
ASCII characters or the server does not start; a request carries exactly one ``Authorization:
Bearer <token>`` or gets 401. Bodies are at most :data:`MAX_BODY` bytes of JSON nested at most
:data:`MAX_JSON_DEPTH` deep, without ``NaN``/``Infinity``; ids are ASCII digits; expiries are finite
and at most :data:`MAX_EXPIRY`. What a request may store is checked by the rules the wire format and
the CLI read it back with, so no stored value can make a later list, map or restart fail.
"""

from __future__ import annotations

import hmac
import json
import math
import re
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from embedmesh.control.authkeys import AuthKeyRecord
from embedmesh.control.coordinator import DEFAULT_OWNER, MAX_KEY_LIFETIME
from embedmesh.control.errors import (
    AdminError,
    AdminTokenError,
    BadRequestError,
    ConflictError,
    ControlError,
    NotFoundError,
    PayloadTooLargeError,
    UnauthorizedError,
)
from embedmesh.control.store import UserRecord

if TYPE_CHECKING:
    from embedmesh.control.server import ControlServer

PREFIX = "/admin/v1"
_STATUS = {
    NotFoundError: 404,
    ConflictError: 409,
    UnauthorizedError: 401,
    BadRequestError: 400,
    PayloadTooLargeError: 413,
}

#: Shorter tokens are refused at startup (a generated one has 43 characters, 256 bits).
MIN_ADMIN_TOKEN_LENGTH = 32
#: The largest admin request body; the biggest real one (DNS settings) is a few KiB.
MAX_BODY = 64 * 1024
#: Arrays and objects nested deeper than this are refused before parsing (no request needs more
#: than 3; a deep one would otherwise hit Python's recursion limit).
MAX_JSON_DEPTH = 16
#: The longest auth key lifetime: 100 years (the CLI prints expiry dates, which stop at year 9999).
MAX_EXPIRY = MAX_KEY_LIFETIME
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")
_NODE_ID_RE = re.compile(r"[0-9]{1,18}")
_KEY_ID_RE = re.compile(r"[0-9a-f]{12}")
_CREATE_FIELDS = frozenset({"reusable", "ephemeral", "preapproved", "tags", "expiry", "user"})


def new_admin_token() -> bytes:
    """A fresh token for the ``admin-token`` file: 43 URL-safe characters (256 random bits)."""
    return secrets.token_urlsafe(32).encode() + b"\n"


def check_admin_token(data: bytes, path: Path) -> str:
    """The token in ``path`` (surrounding whitespace dropped), or :class:`AdminTokenError` (a
    ``ConfigError``) if it is too short or not visible ASCII: a weak token must stop the server, never guard its admin API."""
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        token = None
    fix = f"delete {path} and restart the server to generate one, or write at least {MIN_ADMIN_TOKEN_LENGTH} random characters there"
    if token is None or _TOKEN_RE.fullmatch(token) is None:
        raise AdminTokenError(
            f"the admin token in {path} is empty or not printable ASCII without spaces: {fix}"
        )
    if len(token) < MIN_ADMIN_TOKEN_LENGTH:
        raise AdminTokenError(
            f"the admin token in {path} has {len(token)} characters, fewer than {MIN_ADMIN_TOKEN_LENGTH}: {fix}"
        )
    return token


def token_accepted(headers: list[tuple[bytes, bytes]], expected: str) -> bool:
    """True only for exactly one ``Authorization`` header that is ``Bearer <expected>`` (the
    scheme's case does not matter, RFC 7235; anything else about it does)."""
    values = [value for name, value in headers if name.lower() == b"authorization"]
    if len(values) != 1 or len(expected) < MIN_ADMIN_TOKEN_LENGTH:
        return False
    scheme, space, token = values[0].partition(b" ")
    if scheme.lower() != b"bearer" or not space or not token:
        return False
    return hmac.compare_digest(token, expected.encode())


Handler = Callable[[Request], Awaitable[JSONResponse]]


def describe_auth_key(record: AuthKeyRecord, now: float) -> dict[str, Any]:
    return {
        "id": record.id,
        "state": record.state(now),
        "reusable": record.reusable,
        "ephemeral": record.ephemeral,
        "preapproved": record.preapproved,
        "tags": list(record.tags),
        "created": record.created,
        "expires": record.expires,
        "revoked": record.revoked,
        "uses": record.uses,
        "last_used": record.last_used,
        "user": record.user or DEFAULT_OWNER,
    }


def describe_user(record: UserRecord, nodes: int) -> dict[str, Any]:
    return {
        "id": record.id,
        "name": record.name,
        "display_name": record.display_name,
        "created": record.created,
        "nodes": nodes,
    }


def _error_response(exc: ControlError) -> JSONResponse:
    status = next((code for cls, code in _STATUS.items() if isinstance(exc, cls)), 400)
    return JSONResponse({"error": {"code": exc.code, "message": str(exc)}}, status_code=status)


def _json_depth(raw: bytes) -> int:
    """How deeply arrays and objects nest in ``raw`` (brackets inside strings do not count)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def _body(request: Request) -> dict[str, Any]:
    too_large = PayloadTooLargeError(f"request body larger than {MAX_BODY} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > MAX_BODY:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise too_large
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:
        return {}
    if _json_depth(raw) > MAX_JSON_DEPTH:
        raise BadRequestError(f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        # NaN and Infinity are not JSON (RFC 8259); Python would accept them.
        value = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise BadRequestError("request body is not JSON") from None
    if not isinstance(value, dict):
        raise BadRequestError("request body must be a JSON object")
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise BadRequestError(f"{name} must be true or false")
    return value


def _node_id(request: Request) -> int:
    text = request.path_params["node_id"]
    # Only ASCII digits: str.isdigit() and int() also take "١٢", "+1", " 1" and "1_0".
    if _NODE_ID_RE.fullmatch(text) is None:
        raise BadRequestError(f"node id {text!r} is not a number: see `embedmesh control nodes list`")
    return int(text)


def _key_id(request: Request) -> str:
    text = str(request.path_params["key_id"])
    if _KEY_ID_RE.fullmatch(text) is None:
        raise BadRequestError(
            f"{text!r} is not an auth key id (12 hex digits): see `embedmesh control authkey list`"
        )
    return text


def _expiry(value: object) -> float | None:
    """Seconds from now, finite and positive, or None (never)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequestError("expiry must be a number of seconds or null")
    # An int beyond a float's range, inf (JSON 1e309) and nan all fail here, before float().
    if not (isinstance(value, int) or math.isfinite(value)) or not 0 < value <= MAX_EXPIRY:
        raise BadRequestError(
            f"expiry must be a positive number of seconds up to {MAX_EXPIRY:.0f} (100 years), or null"
        )
    return float(value)


def admin_routes(server: ControlServer) -> list[Route]:
    coordinator = server.coordinator

    def guarded(handler: Handler) -> Handler:
        async def wrapper(request: Request) -> JSONResponse:
            if not token_accepted(request.scope["headers"], server.admin_token):
                return _error_response(
                    UnauthorizedError(
                        "missing or wrong admin token: use the admin-token file in the server's state directory"
                    )
                )
            try:
                return await handler(request)
            except ControlError as exc:
                return _error_response(exc)

        return wrapper

    async def create_key(request: Request) -> JSONResponse:
        body = await _body(request)
        unknown = set(body) - _CREATE_FIELDS
        if unknown:
            raise BadRequestError(
                f"unknown auth key settings {sorted(unknown)}: use {sorted(_CREATE_FIELDS)}"
            )
        tags = body.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise BadRequestError("tags must be a list of strings such as tag:ci")
        user = body.get("user")
        if user is not None and not isinstance(user, str):
            raise BadRequestError("user must be a user name (see `embedmesh control users list`)")
        now = time.time()
        record, text = coordinator.create_auth_key(
            reusable=_flag(body, "reusable"),
            ephemeral=_flag(body, "ephemeral"),
            preapproved=_flag(body, "preapproved"),
            tags=tuple(tags),
            expiry=_expiry(body.get("expiry")),
            user=user,
            now=now,
        )
        return JSONResponse({"key": text, "authkey": describe_auth_key(record, now)}, status_code=201)

    async def list_keys(request: Request) -> JSONResponse:
        now = time.time()
        return JSONResponse(
            {"authkeys": [describe_auth_key(r, now) for r in coordinator.store.list_auth_keys()]}
        )

    async def revoke_key(request: Request) -> JSONResponse:
        now = time.time()
        record = coordinator.revoke_auth_key(_key_id(request), now)
        return JSONResponse({"authkey": describe_auth_key(record, now)})

    async def list_nodes(request: Request) -> JSONResponse:
        return JSONResponse({"nodes": [coordinator.describe(n) for n in coordinator.nodes()]})

    async def get_node(request: Request) -> JSONResponse:
        return JSONResponse({"node": coordinator.describe(coordinator.node(_node_id(request)))})

    async def approve(request: Request) -> JSONResponse:
        node = coordinator.approve(_node_id(request), time.time())
        return JSONResponse({"node": coordinator.describe(node)})

    async def expire(request: Request) -> JSONResponse:
        node = coordinator.expire(_node_id(request), time.time())
        return JSONResponse({"node": coordinator.describe(node)})

    async def rename(request: Request) -> JSONResponse:
        body = await _body(request)
        name = body.get("name")
        if not isinstance(name, str) or set(body) != {"name"}:
            raise BadRequestError('rename needs {"name": "new-name"}')
        node = coordinator.rename(_node_id(request), name)
        return JSONResponse({"node": coordinator.describe(node)})

    def dns_document() -> dict[str, Any]:
        dns = coordinator.dns
        return {
            "base_domain": dns.base_domain,
            "extra_records": [list(r) for r in dns.extra_records],
            "split_dns": {domain: list(upstreams) for domain, upstreams in dns.split_dns},
        }

    async def get_dns(request: Request) -> JSONResponse:
        return JSONResponse({"dns": dns_document()})

    async def put_dns(request: Request) -> JSONResponse:
        body = await _body(request)
        unknown = set(body) - {"extra_records", "split_dns"}
        if unknown:
            raise BadRequestError(f"unknown DNS settings {sorted(unknown)}: use extra_records and split_dns")
        split = body.get("split_dns", {})
        if not isinstance(split, dict):
            raise BadRequestError('split_dns must be an object: {"corp.example": ["10.0.0.53:53"]}')
        coordinator.set_dns(
            {
                "extra_records": body.get("extra_records", []),
                "split_dns": [[domain, upstreams] for domain, upstreams in split.items()],
            }
        )
        return JSONResponse({"dns": dns_document()})

    def users_document() -> dict[str, Any]:
        owned = Counter(n.rec.user for n in coordinator.nodes())
        return {"users": [describe_user(u, owned[u.name]) for u in coordinator.users()]}

    async def list_users(request: Request) -> JSONResponse:
        return JSONResponse(users_document())

    async def create_user(request: Request) -> JSONResponse:
        body = await _body(request)
        name, display = body.get("name"), body.get("display_name")
        if (
            not isinstance(name, str)
            or not isinstance(display, str | None)
            or set(body) - {"name", "display_name"}
        ):
            raise BadRequestError(
                'creating a user needs {"name": "alice", "display_name": "Alice"} (display_name optional)'
            )
        record = coordinator.create_user(name, display, time.time())
        return JSONResponse({"user": describe_user(record, 0)}, status_code=201)

    async def delete_user(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        coordinator.delete_user(name, time.time())
        return JSONResponse({"deleted": name})

    def describe_login(login: Any) -> dict[str, Any]:
        return {
            "id": login.id,
            "hostname": login.request.hostname,
            "os": login.request.os,
            "source": login.source,
            "created": login.created,
        }

    async def list_logins(request: Request) -> JSONResponse:
        return JSONResponse({"logins": [describe_login(x) for x in server.logins.waiting(time.time())]})

    async def complete_login(request: Request) -> JSONResponse:
        body = await _body(request)
        user = body.get("user", DEFAULT_OWNER)
        if not isinstance(user, str) or set(body) - {"user"}:
            raise BadRequestError('completing a login takes {"user": "NAME"} (default: the default user)')
        now = time.time()
        login = server.logins.get(request.path_params["login_id"], now)
        node = coordinator.register_interactive(login.machine_key, login.request, user, now)
        server.logins.finish(login, node.id)
        return JSONResponse({"node": coordinator.describe(node)})

    async def delete(request: Request) -> JSONResponse:
        node_id = _node_id(request)
        coordinator.delete(node_id)
        return JSONResponse({"deleted": node_id})

    return [
        Route(f"{PREFIX}/authkeys", guarded(create_key), methods=["POST"]),
        Route(f"{PREFIX}/authkeys", guarded(list_keys), methods=["GET"]),
        Route(f"{PREFIX}/authkeys/{{key_id}}/revoke", guarded(revoke_key), methods=["POST"]),
        Route(f"{PREFIX}/logins", guarded(list_logins), methods=["GET"]),
        Route(f"{PREFIX}/logins/{{login_id}}/register", guarded(complete_login), methods=["POST"]),
        Route(f"{PREFIX}/users", guarded(list_users), methods=["GET"]),
        Route(f"{PREFIX}/users", guarded(create_user), methods=["POST"]),
        Route(f"{PREFIX}/users/{{name}}", guarded(delete_user), methods=["DELETE"]),
        Route(f"{PREFIX}/nodes", guarded(list_nodes), methods=["GET"]),
        Route(f"{PREFIX}/nodes/{{node_id}}", guarded(get_node), methods=["GET"]),
        Route(f"{PREFIX}/nodes/{{node_id}}", guarded(delete), methods=["DELETE"]),
        Route(f"{PREFIX}/nodes/{{node_id}}/approve", guarded(approve), methods=["POST"]),
        Route(f"{PREFIX}/nodes/{{node_id}}/expire", guarded(expire), methods=["POST"]),
        Route(f"{PREFIX}/nodes/{{node_id}}/rename", guarded(rename), methods=["POST"]),
        Route(f"{PREFIX}/dns", guarded(get_dns), methods=["GET"]),
        Route(f"{PREFIX}/dns", guarded(put_dns), methods=["PUT"]),
    ]


__all__ = [
    "MAX_BODY",
    "MAX_EXPIRY",
    "MAX_JSON_DEPTH",
    "MIN_ADMIN_TOKEN_LENGTH",
    "AdminError",
    "admin_routes",
    "check_admin_token",
    "describe_auth_key",
    "new_admin_token",
    "token_accepted",
]
