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

Errors are ``{"error": {"code", "message"}}`` with 400, 401, 404 or 409.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from embedmesh.control.authkeys import AuthKeyRecord
from embedmesh.control.errors import (
    AdminError,
    BadRequestError,
    ConflictError,
    ControlError,
    NotFoundError,
    UnauthorizedError,
)

if TYPE_CHECKING:
    from embedmesh.control.server import ControlServer

PREFIX = "/admin/v1"
_STATUS = {NotFoundError: 404, ConflictError: 409, UnauthorizedError: 401, BadRequestError: 400}

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
    }


def _error_response(exc: ControlError) -> JSONResponse:
    status = next((code for cls, code in _STATUS.items() if isinstance(exc, cls)), 400)
    return JSONResponse({"error": {"code": exc.code, "message": str(exc)}}, status_code=status)


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
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
    if not text.isdigit():
        raise BadRequestError(f"node id {text!r} is not a number: see `embedmesh control nodes list`")
    return int(text)


def admin_routes(server: ControlServer) -> list[Route]:
    coordinator = server.coordinator

    def guarded(handler: Handler) -> Handler:
        async def wrapper(request: Request) -> JSONResponse:
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.encode(), server.admin_token.encode()
            ):
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
        tags = body.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise BadRequestError("tags must be a list of strings such as tag:ci")
        expiry = body.get("expiry")
        if expiry is not None and (isinstance(expiry, bool) or not isinstance(expiry, int | float)):
            raise BadRequestError("expiry must be a number of seconds or null")
        now = time.time()
        record, text = coordinator.create_auth_key(
            reusable=_flag(body, "reusable"),
            ephemeral=_flag(body, "ephemeral"),
            preapproved=_flag(body, "preapproved"),
            tags=tuple(tags),
            expiry=None if expiry is None else float(expiry),
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
        record = coordinator.revoke_auth_key(request.path_params["key_id"], now)
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
        if not isinstance(name, str):
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

    async def delete(request: Request) -> JSONResponse:
        node_id = _node_id(request)
        coordinator.delete(node_id)
        return JSONResponse({"deleted": node_id})

    return [
        Route(f"{PREFIX}/authkeys", guarded(create_key), methods=["POST"]),
        Route(f"{PREFIX}/authkeys", guarded(list_keys), methods=["GET"]),
        Route(f"{PREFIX}/authkeys/{{key_id}}/revoke", guarded(revoke_key), methods=["POST"]),
        Route(f"{PREFIX}/nodes", guarded(list_nodes), methods=["GET"]),
        Route(f"{PREFIX}/nodes/{{node_id}}", guarded(get_node), methods=["GET"]),
        Route(f"{PREFIX}/nodes/{{node_id}}", guarded(delete), methods=["DELETE"]),
        Route(f"{PREFIX}/nodes/{{node_id}}/approve", guarded(approve), methods=["POST"]),
        Route(f"{PREFIX}/nodes/{{node_id}}/expire", guarded(expire), methods=["POST"]),
        Route(f"{PREFIX}/nodes/{{node_id}}/rename", guarded(rename), methods=["POST"]),
        Route(f"{PREFIX}/dns", guarded(get_dns), methods=["GET"]),
        Route(f"{PREFIX}/dns", guarded(put_dns), methods=["PUT"]),
    ]


__all__ = ["AdminError", "admin_routes", "describe_auth_key"]
