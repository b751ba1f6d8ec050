"""DERP admission control: which node keys a DERP server lets in.

derper's ``--verify-client-url URL`` asks an admission controller about every client that logged in
(its ClientInfo box opened) before the client gets any routing state: a ``POST`` of the JSON of
``tailcfg.DERPAdmitClientRequest``::

    {"NodePublic": "nodekey:<64 hex>", "Source": "<the client's IP address>"}

answered with ``200`` and ``tailcfg.DERPAdmitClientResponse`` (``{"Allow": true}``). Anything but
a 200 whose body says ``"Allow": true`` refuses the client; an unreachable controller refuses it
too unless the admitter fails open. This module holds both ends: the JSON codec (Go's
``encoding/json`` reading: case-insensitive names, unknown fields ignored, ``null`` is the zero
value) and :func:`url_admitter`, the client side a :class:`~embedmesh.tailscale.derpserver.DerpServer`
uses. embedmesh's control server answers the request at ``POST /derp/admit``.

Parsers raise only :class:`DerpAdmitError` (a :class:`~embedmesh.errors.ParseError`).
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeAlias

import anyio
import httpx

from embedmesh.tailscale import gojson
from embedmesh.tailscale.errors import TailscaleProtocolError
from embedmesh.tailscale.keys import NodePublic

log = logging.getLogger(__name__)

#: Seconds the server waits for the admission controller (Go's 5-s context).
ADMIT_TIMEOUT = 5.0
#: The most of the controller's answer that is read (Go's ``io.LimitReader(res.Body, 4<<10)``).
MAX_ADMIT_RESPONSE = 4 << 10
#: The most of a request the control server reads (a key and an address are ~120 bytes).
MAX_ADMIT_REQUEST = 4 << 10

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
#: The admission hook of a DERP server: (the client's node key, its (host, port)) -> let it in?
Admit: TypeAlias = Callable[[NodePublic, tuple[str, int]], Awaitable[bool]]


class DerpAdmitError(TailscaleProtocolError):
    """An admission request or answer is not what Go's ``encoding/json`` would accept."""


@dataclass(frozen=True, slots=True)
class AdmitRequest:
    """``tailcfg.DERPAdmitClientRequest``: may ``node`` (connecting from ``source``) use the relay?

    ``source`` None is Go's zero ``netip.Addr`` (an empty string in JSON).
    """

    node: NodePublic
    source: IPAddress | None = None

    def to_json(self) -> bytes:
        """The request body as Go marshals it."""
        source = "" if self.source is None else str(self.source)
        return json.dumps({"NodePublic": self.node.to_text(), "Source": source}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> AdmitRequest:
        """Parse a request body; raises :class:`DerpAdmitError`."""
        obj = _object(data, "DERP admission request")
        raw_key = obj.get("NodePublic")
        if raw_key is None:
            node = NodePublic.zero()
        elif isinstance(raw_key, str):
            try:
                node = NodePublic.from_text(raw_key)
            except TailscaleProtocolError as exc:
                raise DerpAdmitError(f"DERP admission request: NodePublic: {exc}") from None
        else:
            raise DerpAdmitError("DERP admission request: NodePublic is not a string")
        return cls(node, _source(obj.get("Source")))


def _object(data: bytes, what: str) -> gojson.GoObject:
    # Go's json.Decoder reads the first value and ignores what follows it: do the same.
    text = data.decode("utf-8", errors="replace")
    start = len(text) - len(text.lstrip(" \t\r\n"))
    try:
        _, end = json.JSONDecoder().raw_decode(text, start)
    except (ValueError, RecursionError):
        raise DerpAdmitError(f"{what}: not valid JSON") from None
    try:
        obj = gojson.load_object(text[start:end], what)
    except TailscaleProtocolError as exc:
        raise DerpAdmitError(str(exc)) from None
    assert obj is not None
    return obj


def _source(value: object) -> IPAddress | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise DerpAdmitError("DERP admission request: Source is not a string")
    # netip.Addr allows an IPv6 zone ("fe80::1%eth0"); the zone says nothing about admission.
    address, _, zone = value.partition("%")
    if zone and ":" not in address:
        raise DerpAdmitError("DERP admission request: Source has a zone but is not IPv6")
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        raise DerpAdmitError("DERP admission request: Source is not an IP address") from None


def encode_admit_response(allow: bool) -> bytes:
    """``tailcfg.DERPAdmitClientResponse`` as Go marshals it."""
    return b'{"Allow":true}' if allow else b'{"Allow":false}'


def parse_admit_response(data: bytes) -> bool:
    """The ``Allow`` of an admission controller's answer; raises :class:`DerpAdmitError`."""
    allow = _object(data, "DERP admission response").get("Allow")
    if allow is None:
        return False
    if not isinstance(allow, bool):
        raise DerpAdmitError("DERP admission response: Allow is not a boolean")
    return allow


def source_address(host: str) -> IPAddress | None:
    """The IP of a connection's remote host for :class:`AdmitRequest` (None when it is not an IP)."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    # Go parses the remote address of a dual-stack socket as the IPv4 it maps.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def url_admitter(
    url: str,
    *,
    fail_open: bool = False,
    timeout: float = ADMIT_TIMEOUT,
    client: httpx.AsyncClient | None = None,
) -> Admit:
    """An admission hook that asks the controller at ``url``, as derper's ``--verify-client-url``.

    A client is let in only when the controller answers ``200`` with ``"Allow": true``. When the
    controller cannot be reached (no connection, no answer in ``timeout`` seconds) the client is
    refused, unless ``fail_open``: then it is let in and a warning logged. A non-200 answer or a
    body that is not the response JSON refuses it either way, as Go does. ``client`` is the
    ``httpx.AsyncClient`` to use (default: one per request, no redirects followed).
    """

    async def admit(node: NodePublic, source: tuple[str, int]) -> bool:
        body = AdmitRequest(node, source_address(source[0])).to_json()
        try:
            # One deadline for the whole exchange, as Go's context (httpx's timeouts are per step).
            with anyio.fail_after(timeout):
                if client is not None:
                    status, answer = await _post(client, url, body)
                else:
                    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as own:
                        status, answer = await _post(own, url, body)
        except (httpx.TransportError, OSError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            verdict = "letting it in" if fail_open else "refusing it"
            log.warning("DERP admission controller %s unreachable (%s) for %s: %s", url, reason, node.short_string(), verdict)
            return fail_open
        if status != 200:
            log.info("DERP admission controller %s answered %d: refusing %s", url, status, node.short_string())
            return False
        try:
            return parse_admit_response(answer)
        except DerpAdmitError as exc:
            log.info("DERP admission controller %s: %s: refusing %s", url, exc, node.short_string())
            return False

    return admit


async def _post(client: httpx.AsyncClient, url: str, body: bytes) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    async with client.stream("POST", url, content=body, headers=headers) as response:
        answer = b""
        async for chunk in response.aiter_bytes():
            answer += chunk
            if len(answer) >= MAX_ADMIT_RESPONSE:
                answer = answer[:MAX_ADMIT_RESPONSE]
                break
        return response.status_code, answer


__all__ = [
    "ADMIT_TIMEOUT",
    "Admit",
    "AdmitRequest",
    "DerpAdmitError",
    "encode_admit_response",
    "parse_admit_response",
    "source_address",
    "url_admitter",
]
