"""The Tailscale-protocol API of the coordination server: what tailscaled, tsnet and the apps ask.

Served inside the ts2021 Noise channel (:mod:`embedmesh.tailscale.noiseserver`), where the
handshake has authenticated the caller's machine key:

* ``POST /machine/register``: a RegisterRequest becomes a :meth:`Coordinator.register` (auth key,
  approval, tags, ephemeral, re-registration by node key) or a logout (an expiry in the past);
* ``POST /machine/map``: the long poll. The coordinator's stream for the node yields the same
  messages it gives embedmesh's own clients (a full map, then delta ops of the peers a change
  affects); each becomes a MapResponse (``Node``/``Peers`` first, then ``PeersChanged``,
  ``PeersRemoved``, ``PeersChangedPatch``, ``OnlineChange``), zstd-framed as Tailscale's clients
  expect, with a keep-alive every 50 s. A non-streaming request with ``OmitPeers`` updates the
  node's endpoints and disco key ("lite" update).

Everything else answers 501, as headscale does.

Capability versions: clients older than Tailscale 1.80 (capability version 113, headscale's floor
too) are refused with a message that names their release (the register's Error, a map's 400). Each map stream remembers its client's
version, and :func:`adapt_map_response` gives every message the form that version reads (see the
"Capability versions" table of docs/tailscale-compat.md); a register that the keyless rate limit
refuses is a 429 with Retry-After for clients that handle one (137 on) and an ``Error`` for older.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import logging
import math
import random
import time
from typing import TYPE_CHECKING, Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from embedmesh.control.coordinator import DEFAULT_KEY_EXPIRY
from embedmesh.control.errors import (
    AuthKeyRequiredError,
    ControlError,
    ProtocolVersionError,
    RegistrationLimitError,
)
from embedmesh.control.messages import (
    ErrorMessage,
    LoggedOut,
    RegisterRequest,
    parse_op,
    parse_server_message,
)
from embedmesh.control.netmap import (
    DNSChanged,
    DNSConfig,
    PeerAdded,
    PeerChange,
    PeerInfo,
    PeerRemoved,
    SelfChanged,
)
from embedmesh.tailscale import gojson, mapframe, tailcfg
from embedmesh.tailscale.errors import TailscaleProtocolError
from embedmesh.tailscale.keys import DiscoPublic, MachinePublic, NodePublic

if TYPE_CHECKING:
    from embedmesh.control.coordinator import LiveNode
    from embedmesh.control.server import ControlServer

logger = logging.getLogger("embedmesh.control.server")

#: The oldest client served: Tailscale 1.80 (capability version 113), as headscale's floor.
MIN_CAPABILITY_VERSION = 113
#: From this version on the self node's CapMap carries the tailnet's key lifetime
#: ("tailnet.maxKeyDuration"); older clients read MapResponse.MaxKeyDuration, which 1.102 dropped.
CAPVER_MAX_KEY_DURATION_ATTR = 114
#: From this version clients understand DERPRegion.NoMeasureNoHome; older ones get Avoid instead.
CAPVER_NO_MEASURE_NO_HOME = 115
#: From this version clients wait out a 429 (with Retry-After) to /machine/register.
CAPVER_REGISTER_429 = 137
#: (first capability version, release) of Tailscale's releases (tailcfg.go at each tag), newest
#: first: names a client's release in logs and in the refusal of too-old clients.
TAILSCALE_RELEASES: tuple[tuple[int, str], ...] = (
    (142, "1.102"),
    (141, "1.100"),
    (138, "1.98"),
    (133, "1.96"),
    (131, "1.92"),
    (130, "1.90"),
    (125, "1.88"),
    (123, "1.86.2"),
    (122, "1.86"),
    (116, "1.84"),
    (115, "1.82"),
    (113, "1.80"),
    (109, "1.78"),
    (106, "1.74"),
    (104, "1.72"),
    (102, "1.70"),
    (97, "1.68"),
    (95, "1.66"),
    (90, "1.64"),
)
KEEPALIVE_INTERVAL = 50.0
#: The shortest time between two delta messages on one map stream (bursts of changes coalesce).
BATCH_INTERVAL = 0.1
#: How long a Followup register waits for the admin before answering "not yet" (Go's client asks
#: again at once).
FOLLOWUP_WAIT = 60.0
#: The user id of tagged nodes in maps (tags replace the user's identity).
TAGGED_USER_ID = 2**31 - 1
_ZERO_DISCO = "discokey:" + "0" * 64


def _machine(request: Request) -> MachinePublic:
    key = request.scope["extensions"]["tailscale"]["machine_key"]
    assert isinstance(key, MachinePublic)
    return key


def _registered_connection(request: Request) -> None:
    """This connection's machine is a registered node's: it stops counting against its source's
    cap of not-yet-registered connections (the Noise handshake alone proves nothing: anyone can
    make a machine key)."""
    callback = request.scope["extensions"]["tailscale"].get("registered")
    if callable(callback):
        callback()


def _text(obj: gojson.GoObject | None, name: str) -> str:
    value = obj.get(name) if obj is not None else None
    return value if isinstance(value, str) else ""


def _node_key(obj: gojson.GoObject, name: str) -> NodePublic:
    value = obj.get(name)
    if not isinstance(value, str):
        raise TailscaleProtocolError(f"{name} missing")
    return NodePublic.from_text(value)


def tailscale_release(capver: int) -> str:
    """Which Tailscale a capability version is: "Tailscale 1.80" for a release's own version, "a
    development build after Tailscale 1.78" between two releases, "older than Tailscale 1.64" and
    "newer than Tailscale 1.102" outside the table."""
    newest, name = TAILSCALE_RELEASES[0]
    if capver > newest:
        return f"newer than Tailscale {name}"
    for first, release in TAILSCALE_RELEASES:
        if capver == first:
            return f"Tailscale {release}"
        if capver > first:
            return f"a development build after Tailscale {release}"
    return f"older than Tailscale {TAILSCALE_RELEASES[-1][1]}"


def adapt_map_response(
    message: dict[str, Any], capver: int, *, max_key_duration: float | None = None
) -> dict[str, Any]:
    """A MapResponse in the form a client of capability version ``capver`` reads.

    The maps are built once for every client; what differs between the versions served
    (113 to 142) is put in here. ``message`` is changed in place, the DERP map (shared by every
    stream) is copied before it changes; returns ``message``.

    * the self node carries its client's version in ``Cap``, as Tailscale's server sets it;
    * the tailnet's key lifetime (``max_key_duration`` in seconds, None when it is the default of
      180 days or keys do not expire, which Tailscale's server also leaves out) goes in the self
      node's CapMap from 114 on and in ``MaxKeyDuration`` (Go nanoseconds) before;
    * a DERP region marked ``NoMeasureNoHome`` (understood from 115) is also marked ``Avoid`` for
      older clients, the field they know with that meaning (never home, used to reach a peer).
    """
    node = message.get("Node")
    if isinstance(node, dict):
        node["Cap"] = capver
        if max_key_duration is not None:
            if capver >= CAPVER_MAX_KEY_DURATION_ATTR:
                node["CapMap"] = {
                    **node.get("CapMap", {}),
                    "tailnet.maxKeyDuration": [float(max_key_duration)],
                }
            else:
                message["MaxKeyDuration"] = int(max_key_duration * 1e9)
    derp_map = message.get("DERPMap")
    if capver < CAPVER_NO_MEASURE_NO_HOME and isinstance(derp_map, dict):
        regions = derp_map.get("Regions")
        if isinstance(regions, dict) and any(
            isinstance(r, dict) and r.get("NoMeasureNoHome") is True for r in regions.values()
        ):
            message["DERPMap"] = {
                **derp_map,
                "Regions": {
                    rid: {**r, "Avoid": True}
                    if isinstance(r, dict) and r.get("NoMeasureNoHome") is True
                    else r
                    for rid, r in regions.items()
                },
            }
    return message


def tsapi_app(server: ControlServer) -> Starlette:
    """The Starlette app served inside Noise."""
    coordinator = server.coordinator
    rng = random.Random()

    def user_ids() -> dict[str, int]:
        return {u.name: u.id for u in coordinator.users()}

    def node_json(
        peer: PeerInfo, live: LiveNode, ids: dict[str, int], *, is_self: bool = False
    ) -> dict[str, Any]:
        node: dict[str, Any] = {
            "ID": peer.id,
            "StableID": str(peer.id),
            "Name": peer.fqdn + ".",
            "User": TAGGED_USER_ID if peer.tags else ids.get(peer.user, 1),
            "Key": NodePublic(peer.node_key).to_text(),
            "Machine": MachinePublic(live.rec.machine_key).to_text(),
            "DiscoKey": DiscoPublic(peer.disco_key).to_text() if any(peer.disco_key) else _ZERO_DISCO,
            "Addresses": [f"{a}/{a.max_prefixlen}" for a in peer.addresses],
            "AllowedIPs": [str(n) for n in peer.allowed_ips],
            "Endpoints": list(peer.endpoints),
            "HomeDERP": peer.home_derp,
            "Hostinfo": {"Hostname": peer.hostname, "OS": peer.os},
            "Created": tailcfg.format_time(live.rec.created),
            "MachineAuthorized": peer.authorized and not peer.key_expired,
            # Only the node itself learns it is ephemeral (its peers have no use for it).
            "CapMap": {tailcfg.EPHEMERAL_CAP: None} if is_self and peer.ephemeral else {},
        }
        if peer.key_expiry is not None:
            node["KeyExpiry"] = tailcfg.format_time(peer.key_expiry)
        if peer.key_expired:
            node["Expired"] = True
        if peer.tags:
            node["Tags"] = list(peer.tags)
        if not is_self:
            node["Online"] = peer.online
            # Tailscale's clients read a LastSeen as "offline since" (headscale sends it only then).
            if not peer.online and peer.last_seen is not None:
                node["LastSeen"] = tailcfg.format_time(peer.last_seen)
        return node

    def peer_json(live: LiveNode, ids: dict[str, int]) -> bytes:
        """A peer's JSON as every other node sees it, rendered once per state of the node (the
        coordinator drops ``rendered`` whenever the node changes)."""
        rendered = live.rendered
        if rendered is None:
            rendered = live.rendered = _dumps(node_json(coordinator.peer_info(live), live, ids))
        assert isinstance(rendered, bytes)
        return rendered

    def profile_key(live: LiveNode) -> str:
        return "" if live.rec.tags else live.rec.user

    def profiles(owners: set[str], ids: dict[str, int]) -> list[dict[str, Any]]:
        """UserProfiles for nodes of these owners ("" stands for tagged nodes)."""
        out = [{"ID": ids[u], "LoginName": u, "DisplayName": u} for u in sorted(owners) if u and u in ids]
        if "" in owners:
            out.append({"ID": TAGGED_USER_ID, "LoginName": "tagged-devices", "DisplayName": "Tagged Devices"})
        return out

    def dns_json(dns: DNSConfig) -> dict[str, Any]:
        routes: dict[str, list[dict[str, str]]] = {dns.base_domain: []} if dns.magic_dns else {}
        for domain, upstreams in dns.split_dns:
            routes[domain] = [{"Addr": u} for u in upstreams]
        return {
            "Proxied": dns.magic_dns,
            "Domains": [dns.base_domain, *dns.search_domains],
            "Routes": routes,
            "ExtraRecords": [
                {"Name": name if "." in name else f"{name}.{dns.base_domain}", "Type": kind, "Value": value}
                for name, kind, value in dns.extra_records
            ],
        }

    def full_map(viewer: LiveNode, known: _PeerSet, capver: int) -> bytes:
        """A full map for ``viewer``: each peer's JSON comes from its shared rendering."""
        ids = user_ids()
        peers = sorted(coordinator.visible_peers(viewer), key=lambda n: n.id)
        previous = known.ids()
        known.clear()
        for peer in peers:
            known.add(peer.id)
        rest: dict[str, Any] = {
            "DNSConfig": dns_json(coordinator.dns),
            "Domain": coordinator.dns.base_domain,
            "DERPMap": server.derp_map_json(),
            "PacketFilter": [
                {"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}
            ],
            "UserProfiles": profiles({profile_key(n) for n in (viewer, *peers)}, ids),
            "CollectServices": False,
        }
        # An empty Peers means "unchanged" to Tailscale's clients, so a map sent again (the node
        # left the mesh, or came back) removes what it dropped.
        gone = [i for i in previous if not known.has(i)]
        if gone:
            rest["PeersRemoved"] = gone
        rest["ControlTime"] = tailcfg.format_time(time.time())
        # What differs between client versions is the self node and the DERP map, never a peer:
        # the peers' shared renderings go in as they are.
        message = {"Node": node_json(coordinator.peer_info(viewer), viewer, ids, is_self=True), **rest}
        adapt_map_response(message, capver, max_key_duration=max_key_duration())
        node = message.pop("Node")
        return (
            b'{"Node":'
            + _dumps(node)
            + b',"Peers":['
            + b",".join([peer_json(p, ids) for p in peers])
            + b"],"
            + _dumps(message)[1:]
        )

    # One rendering per op (the coordinator shares an op's bytes among every stream that gets
    # it): keyed by the bytes object's id, checked by identity (an id may be reused).
    op_cache: dict[int, _RenderedOp] = {}

    def render_op(fragment: bytes) -> _RenderedOp:
        op = parse_op(json.loads(fragment))
        rendered = _RenderedOp(fragment)
        if isinstance(op, PeerAdded | PeerChange):
            fields = op.changes() if isinstance(op, PeerChange) else {}
            live = coordinator.find_node(op.peer.id if isinstance(op, PeerAdded) else op.id)
            if live is None:
                # Deleted since: its removal follows in the log.
                rendered.kind = _SKIP
            elif isinstance(op, PeerChange) and set(fields) <= _PATCHABLE:
                rendered.kind = _PATCH
                rendered.peer_id = op.id
                patch: dict[str, Any] = {"NodeID": op.id}
                endpoints = fields.get("endpoints")
                if isinstance(endpoints, tuple):
                    patch["Endpoints"] = list(endpoints)
                derp = fields.get("home_derp")
                if isinstance(derp, int) and derp:
                    patch["DERPRegion"] = derp
                # Offline since when (Tailscale's clients read a LastSeen only for offline peers).
                last_seen = fields.get("last_seen")
                if fields.get("online") is False and isinstance(last_seen, float | int):
                    patch["LastSeen"] = tailcfg.format_time(last_seen)
                if len(patch) > 1:
                    rendered.body = _dumps(patch)
                online = fields.get("online")
                if isinstance(online, bool):
                    rendered.online = online
            else:
                # Rendered from the node's state now, at or after this op: every stream that takes
                # this op takes the later ones too, so its copy of the peer ends where ours is.
                rendered.kind = _CHANGED
                rendered.peer_id = live.id
                ids = user_ids()
                rendered.body = peer_json(live, ids)
                rendered.profile = b",".join(_dumps(p) for p in profiles({profile_key(live)}, ids))
        elif isinstance(op, PeerRemoved):
            rendered.kind = _REMOVED
            rendered.peer_id = op.id
        elif isinstance(op, SelfChanged):
            live = coordinator.find_node(op.node.id)
            if live is not None:
                rendered.kind = _SELF
                rendered.node = node_json(op.node, live, user_ids(), is_self=True)
            return rendered  # a stream's own op: not shared, not cached
        elif isinstance(op, DNSChanged):
            rendered.kind = _DNS
            rendered.body = _dumps(dns_json(op.dns))
        if len(op_cache) >= _OP_CACHE_SIZE:
            for key in list(itertools.islice(op_cache, _OP_CACHE_SIZE // 2)):
                del op_cache[key]
        op_cache[id(fragment)] = rendered
        return rendered

    def delta(ops: list[_RenderedOp], known: _PeerSet, capver: int) -> bytes | None:
        """One MapResponse for a batch of ops (the fields Go's mapSession reads, in its order)."""
        changed: dict[int, bytes] = {}
        owners: dict[bytes, None] = {}
        patches: list[bytes] = []
        removed: list[int] = []
        online: dict[str, bool] = {}
        self_node: dict[str, Any] | None = None
        dns: bytes | None = None
        for op in ops:
            kind = op.kind
            if kind == _CHANGED:
                assert op.body is not None
                changed[op.peer_id] = op.body
                if op.profile:
                    owners[op.profile] = None
                known.add(op.peer_id)
            elif kind == _PATCH:
                if not known.has(op.peer_id):
                    continue
                if op.body is not None:
                    patches.append(op.body)
                if op.online is not None:
                    online[str(op.peer_id)] = op.online
            elif kind == _REMOVED:
                removed.append(op.peer_id)
                changed.pop(op.peer_id, None)
                known.discard(op.peer_id)
            elif kind == _SELF:
                self_node = op.node
            elif kind == _DNS:
                dns = op.body
        parts: list[bytes] = []
        if self_node is not None:
            # The self node in the form this client's version reads (adapt_map_response may add
            # top-level fields beside it, MaxKeyDuration).
            own = adapt_map_response({"Node": dict(self_node)}, capver, max_key_duration=max_key_duration())
            parts += [_dumps(key) + b":" + _dumps(value) for key, value in own.items()]
        if dns is not None:
            parts.append(b'"DNSConfig":' + dns)
        if changed:
            parts.append(b'"PeersChanged":[' + b",".join(changed.values()) + b"]")
            parts.append(b'"UserProfiles":[' + b",".join(owners) + b"]")
        if removed:
            parts.append(b'"PeersRemoved":' + _dumps(removed))
        if patches:
            parts.append(b'"PeersChangedPatch":[' + b",".join(patches) + b"]")
        if online:
            parts.append(b'"OnlineChange":' + _dumps(online))
        if not parts:
            return None
        parts.append(b'"ControlTime":"' + tailcfg.format_time(time.time()).encode() + b'"')
        return b"{" + b",".join(parts) + b"}"

    async def read_json(request: Request, what: str) -> gojson.GoObject:
        body = await request.body()
        obj = gojson.load_object(body, what)
        assert obj is not None
        version = obj.get("Version")
        if not isinstance(version, int) or isinstance(version, bool) or version < MIN_CAPABILITY_VERSION:
            release = f" ({tailscale_release(version)})" if isinstance(version, int) else ""
            raise _ClientTooOld(
                f"unsupported client version {version}{release}: this server serves Tailscale 1.80 "
                f"(capability version {MIN_CAPABILITY_VERSION}) and newer; upgrade the client"
            )
        return obj

    async def read_request(request: Request, what: str) -> tuple[gojson.GoObject, NodePublic] | Response:
        """The request's JSON and its NodeKey, or the answer that says what is wrong: a 400, but a
        too-old client's register gets a RegisterResponse whose Error `tailscale up` prints and
        exits on ("backend error: ..."); after a 400 it only waits out its --timeout, the reason in
        tailscaled's log (seen with tailscaled 1.78.3)."""
        try:
            obj = await read_json(request, what)
            return obj, _node_key(obj, "NodeKey")
        except _ClientTooOld as exc:
            if what == "RegisterRequest":
                return _refused(ProtocolVersionError(str(exc)), None)
            return Response(str(exc), status_code=400)
        except TailscaleProtocolError as exc:
            return Response(f"bad {what}: {exc}", status_code=400)

    async def register(request: Request) -> Response:
        parsed = await read_request(request, "RegisterRequest")
        if isinstance(parsed, Response):
            return parsed
        obj, node_key = parsed
        machine = _machine(request)
        hostinfo = obj.get("Hostinfo")
        hostinfo = hostinfo if isinstance(hostinfo, gojson.GoObject) else None
        auth = obj.get("Auth")
        auth_key = _text(auth if isinstance(auth, gojson.GoObject) else None, "AuthKey") or None
        expiry_text = obj.get("Expiry")
        now = time.time()
        existing = coordinator.node_by_machine(machine.raw)
        if isinstance(expiry_text, str):
            try:
                expiry = tailcfg.parse_time(expiry_text, "Expiry")
            except TailscaleProtocolError:
                expiry = None
            if expiry is not None and expiry <= now and existing is not None and existing.rec.node_key == node_key.raw:
                coordinator.logout_node(existing.id, now)
                return JSONResponse({"NodeKeyExpired": True, "MachineAuthorized": False})
        tags = hostinfo.get("RequestTags") if hostinfo is not None else None
        tags = tuple(t for t in tags if isinstance(t, str)) if isinstance(tags, list) else ()
        disco = existing.rec.disco_key if existing is not None else bytes(32)
        ephemeral = obj.get("Ephemeral") is True
        source = request.client.host if request.client is not None else None
        wanted = RegisterRequest(
            node_key.raw,
            disco,
            _text(hostinfo, "Hostname") or "node",
            os=_text(hostinfo, "OS")[:32],
            tags=tags,
            ephemeral=ephemeral,
            auth_key=auth_key,
        )
        followup = obj.get("Followup")
        if isinstance(followup, str) and followup and auth_key is None:
            return await _follow_login(request, machine.raw, wanted, followup, source)
        try:
            node = coordinator.register(machine.raw, wanted, now, source)
        except AuthKeyRequiredError as exc:
            if auth_key is not None:
                return _refused(exc, obj.get("Version"))
            # No key and none needed for a restart: Tailscale's interactive login. The client
            # shows the AuthURL and asks again with Followup, which waits for an admin.
            login = server.logins.start(machine.raw, wanted, now, source)
            return JSONResponse({"AuthURL": _login_url(request, login.id), "MachineAuthorized": False})
        except ControlError as exc:
            logger.info("refused a Tailscale-protocol registration: %s", exc)
            return _refused(exc, obj.get("Version"))
        _registered_connection(request)
        return registered(node)

    def registered(node: Any) -> JSONResponse:
        ids = user_ids()
        owner = "tagged-devices" if node.rec.tags else node.rec.user
        user_id = TAGGED_USER_ID if node.rec.tags else ids.get(owner, 1)
        return JSONResponse(
            {
                "User": {"ID": user_id, "DisplayName": owner, "Created": tailcfg.format_time(0)},
                "Login": {"ID": user_id, "LoginName": owner, "DisplayName": owner},
                "NodeKeyExpired": node.expired,
                "MachineAuthorized": node.in_mesh,
                "AuthURL": "",
                "Error": "",
            }
        )

    def _login_url(request: Request, login_id: str) -> str:
        scheme = "https" if server.config.tls_cert is not None else "http"
        host = request.headers.get("host") or (server.url or "").split("://", 1)[-1]
        return f"{scheme}://{host}/register/{login_id}"

    async def _follow_login(
        request: Request, machine: bytes, wanted: RegisterRequest, followup: str, source: str | None
    ) -> Response:
        now = time.time()
        login = server.logins.follow(followup, now)
        if login is None:
            login = server.logins.start(machine, wanted, now, source)
            return JSONResponse({"AuthURL": _login_url(request, login.id), "MachineAuthorized": False})
        if login.machine_key != machine:
            return JSONResponse({"Error": "this login belongs to another machine", "MachineAuthorized": False})
        with anyio.move_on_after(FOLLOWUP_WAIT):
            await login.done.wait()
        if login.node_id is None:
            # Not yet: the client asks again with the same URL.
            return JSONResponse({"AuthURL": _login_url(request, login.id), "MachineAuthorized": False})
        _registered_connection(request)
        return registered(coordinator.node(login.node_id))

    async def map_poll(request: Request) -> Response:
        parsed = await read_request(request, "MapRequest")
        if isinstance(parsed, Response):
            return parsed
        obj, node_key = parsed
        node = coordinator.node_by_node_key(node_key.raw)
        if node is None or node.rec.machine_key != _machine(request).raw:
            return Response("node not found: register first", status_code=404)
        _registered_connection(request)
        disco_text = obj.get("DiscoKey")
        endpoints = obj.get("Endpoints")
        updates: dict[str, Any] = {}
        if isinstance(disco_text, str) and disco_text:
            try:
                updates["disco_key"] = DiscoPublic.from_text(disco_text).raw
            except TailscaleProtocolError:
                return Response("bad DiscoKey", status_code=400)
        if isinstance(endpoints, list):
            updates["endpoints"] = tuple(e for e in endpoints if isinstance(e, str) and _is_endpoint(e))[:64]
        hostinfo = obj.get("Hostinfo")
        net_info = hostinfo.get("NetInfo") if isinstance(hostinfo, gojson.GoObject) else None
        preferred = net_info.get("PreferredDERP") if isinstance(net_info, gojson.GoObject) else None
        if isinstance(preferred, int) and not isinstance(preferred, bool) and 0 <= preferred <= 65535:
            updates["home_derp"] = preferred
        coordinator.update_node_session(node.id, **updates)
        if obj.get("Stream") is not True:
            return Response(b"", status_code=200)
        compress = obj.get("Compress") == "zstd"
        capver = obj.get("Version")
        assert isinstance(capver, int)  # read_request refused anything else
        return StreamingResponse(
            _map_stream(node.id, compress, capver), media_type="application/octet-stream"
        )

    def max_key_duration() -> float | None:
        """The tailnet's key lifetime for the map, None when Tailscale's server leaves it out."""
        lifetime = coordinator.config.key_expiry
        return None if lifetime is None or lifetime == DEFAULT_KEY_EXPIRY else lifetime

    async def _map_stream(node_id: int, compress: bool, capver: int) -> Any:
        encoder = mapframe.MapFrameEncoder(compress=compress)
        # The control server runs on asyncio (noiseserver is an asyncio protocol). One event per
        # stream, and one keep-alive timer armed only when the writer parks without one: a message
        # just moves the deadline, so a change reaching 10,000 streams creates no timers.
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        timer: asyncio.TimerHandle | None = None

        def keepalive_due() -> None:
            nonlocal timer
            timer = None
            wake.set()

        stream = coordinator.attach(node_id, wake.set, time.time())
        known = _PeerSet()
        sent_map = False
        last_sent = 0.0
        try:
            next_keepalive = loop.time() + KEEPALIVE_INTERVAL + rng.random() * 9
            while True:
                if coordinator.park(stream):
                    if timer is None:
                        timer = loop.call_at(next_keepalive, keepalive_due)
                    await wake.wait()
                    wake.clear()
                    if loop.time() >= next_keepalive:
                        yield encoder.encode(mapframe.KEEPALIVE_JSON)
                        next_keepalive = loop.time() + KEEPALIVE_INTERVAL + rng.random() * 9
                    continue
                if sent_map:
                    # At most one delta per BATCH_INTERVAL per stream (after a delta): when nodes join or change
                    # in a burst, each stream takes the burst's ops in a few messages instead of
                    # one per op (ten per second instead of three per joining node). A change
                    # after a quiet spell goes out at once.
                    gap = last_sent + BATCH_INTERVAL - loop.time()
                    if gap > 0:
                        await asyncio.sleep(gap)
                batch = coordinator.take_batch(stream)
                for payload in batch.messages:
                    message = parse_server_message(payload)
                    if isinstance(message, ErrorMessage):
                        # Why the stream ends (deleted, refused, replaced): embedmesh's clients
                        # stop with that error; Tailscale's ignore the field and re-register.
                        yield encoder.encode(_dumps({tailcfg.EMBEDMESH_ERROR: error_json(message.code, message.message)}))
                        return
                    if isinstance(message, LoggedOut):
                        return
                frame: bytes | None = None
                if batch.full_map is not None:
                    frame = encoder.encode(full_map(batch.full_map, known, capver))
                    sent_map = True
                elif batch.ops and sent_map:
                    ops = []
                    for fragment in batch.ops:
                        cached = op_cache.get(id(fragment))
                        ops.append(
                            cached
                            if cached is not None and cached.fragment is fragment
                            else render_op(fragment)
                        )
                    if (
                        len(ops) == 1
                        and ops[0].kind in _SHARED
                        and (ops[0].kind != _PATCH or known.has(ops[0].peer_id))
                    ):
                        # The common case of a change reaching everyone: one op alone in a message.
                        # Its frame is the same for every stream (encoders keep no state between
                        # frames), so it is built and compressed once.
                        op = ops[0]
                        frame = op.frames.get(compress)
                        if frame is None:
                            body = delta(ops, known, capver)
                            frame = op.frames[compress] = encoder.encode(body) if body is not None else b""
                        elif op.kind == _CHANGED:
                            known.add(op.peer_id)
                        elif op.kind == _REMOVED:
                            known.discard(op.peer_id)
                    else:
                        body = delta(ops, known, capver)
                        frame = encoder.encode(body) if body is not None else None
                if frame:
                    yield frame
                    now = loop.time()
                    # Only deltas space the next one: the first delta after a full map (a node
                    # that just joined learning who joined with it) goes out at once.
                    last_sent = now if batch.full_map is None else 0.0
                    next_keepalive = now + KEEPALIVE_INTERVAL + rng.random() * 9
                if stream.closing:
                    return
        finally:
            if timer is not None:
                timer.cancel()
            coordinator.detach(stream, time.time())

    async def not_implemented(request: Request) -> Response:
        return Response("not implemented by this control server", status_code=501)

    return Starlette(
        routes=[
            Route("/machine/register", register, methods=["POST"]),
            Route("/machine/map", map_poll, methods=["POST"]),
            Route("/{path:path}", not_implemented, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        ]
    )


def error_json(code: str, message: str) -> dict[str, str]:
    """The EmbedmeshError field's value."""
    return {"Code": code, "Message": message}


class _ClientTooOld(Exception):
    pass


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


#: PeerChange fields that Tailscale's PeersChangedPatch/OnlineChange carry (others: the whole node).
_PATCHABLE = frozenset({"endpoints", "online", "last_seen", "home_derp"})
_SKIP, _CHANGED, _PATCH, _REMOVED, _SELF, _DNS = range(6)
#: Kinds whose rendering is the same for every stream that gets the op.
_SHARED = frozenset({_CHANGED, _PATCH, _REMOVED, _DNS})
#: Rendered ops kept (the coordinator's change log holds them until every stream took them).
_OP_CACHE_SIZE = 65536


class _RenderedOp:
    """One delta op in Tailscale's terms, rendered once for every stream that gets it."""

    __slots__ = ("body", "fragment", "frames", "kind", "node", "online", "peer_id", "profile")

    def __init__(self, fragment: bytes) -> None:
        self.fragment = fragment
        self.kind = _SKIP
        self.peer_id = 0
        #: The node's JSON (changed), the patch (patch), the DNS config (dns).
        self.body: bytes | None = None
        #: A stream's own node (self), adapted to its client's version when sent.
        self.node: dict[str, Any] | None = None
        self.online: bool | None = None
        #: The changed node's UserProfile (JSON), which Tailscale's clients upsert.
        self.profile = b""
        #: This op alone as a framed message, by whether it is compressed.
        self.frames: dict[bool, bytes] = {}


class _PeerSet:
    """The peer ids a stream's client holds (a bitmap: 10,000 peers in 1.25 KiB), to skip patches
    of peers it does not know and to remove everything it knew when a new full map is empty."""

    __slots__ = ("_bits",)

    def __init__(self) -> None:
        self._bits = bytearray()

    def add(self, peer_id: int) -> None:
        index = peer_id >> 3
        if index >= len(self._bits):
            self._bits.extend(bytes(index + 1 - len(self._bits)))
        self._bits[index] |= 1 << (peer_id & 7)

    def discard(self, peer_id: int) -> None:
        index = peer_id >> 3
        if index < len(self._bits):
            self._bits[index] &= ~(1 << (peer_id & 7)) & 0xFF

    def has(self, peer_id: int) -> bool:
        index = peer_id >> 3
        return index < len(self._bits) and bool(self._bits[index] >> (peer_id & 7) & 1)

    def ids(self) -> list[int]:
        return [
            i * 8 + bit for i, byte in enumerate(self._bits) if byte for bit in range(8) if byte >> bit & 1
        ]

    def clear(self) -> None:
        self._bits = bytearray(len(self._bits))


def _refused(exc: ControlError, capver: object) -> Response:
    """A refused registration as the client's version expects it: the keyless rate limit is a 429
    with Retry-After for clients that wait it out (137 on); everything else, and every refusal to
    older clients, is a RegisterResponse whose Error the client shows as it is."""
    retry_after = exc.retry_after if isinstance(exc, RegistrationLimitError) else None
    if retry_after is not None and isinstance(capver, int) and capver >= CAPVER_REGISTER_429:
        return Response(
            str(exc), status_code=429, headers={"retry-after": str(max(1, math.ceil(retry_after)))}
        )
    # Tailscale's clients show Error; embedmesh's raise the error class its code names.
    return JSONResponse(
        {"Error": str(exc), "MachineAuthorized": False, tailcfg.EMBEDMESH_ERROR: error_json(exc.code, str(exc))}
    )


def _is_endpoint(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return False
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True

