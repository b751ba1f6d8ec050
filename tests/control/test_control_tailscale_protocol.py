"""embedmesh's control server speaks Tailscale's control protocol (issue 9), checked in-process
with embedmesh's own Tailscale-protocol client (tailscaled and headscale are the interop tests)."""

from __future__ import annotations

import contextlib
import json
import os
import random
from pathlib import Path

import anyio
import httpx
import pytest
from control_harness import Admin, start_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedmesh.control import tsapi
from embedmesh.control.errors import AuthKeyInvalidError, ProtocolVersionError, TagNotPermittedError
from embedmesh.control.netmap import NetworkMap, NodeState, PeerInfo
from embedmesh.tailscale import mapframe, tailcfg
from embedmesh.tailscale.client import TailscaleControlClient
from embedmesh.tailscale.keys import DiscoPrivate, MachinePrivate, NodePrivate
from embedmesh.tailscale.noiseclient import Response, connect_control

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _client(url: str, name: str, key: str | None, **kwargs: object) -> TailscaleControlClient:
    return TailscaleControlClient(
        url,
        machine_key=os.urandom(32),
        node_key=os.urandom(32),
        disco_key=os.urandom(32),
        hostname=name,
        auth_key=key,
        endpoints=["192.0.2.1:41641"],
        **kwargs,  # type: ignore[arg-type]
    )


def _only(netmap: NetworkMap) -> PeerInfo:
    (peer,) = netmap.peers.values()
    return peer


def _view(peers: dict[int, PeerInfo]) -> dict[int, tuple[object, ...]]:
    return {
        p.id: (p.name, p.fqdn, p.addresses, p.endpoints, p.tags, p.node_key, p.disco_key, p.key_expired)
        for p in peers.values()
    }


async def test_register_map_deltas_and_logout(tmp_path: Path) -> None:
    with start_server(tmp_path / "server") as running:
        admin = Admin(running)
        key = admin.key(reusable=True)
        async with _client(running.url, "a", key) as a, _client(running.url, "b", key) as b:
            # b's endpoints come in its first map request, after its registration added it: the
            # server may send them as a later delta (deltas to a stream are spaced 100 ms apart).
            netmap = await a.wait_for_netmap(lambda m: len(m.peers) == 1 and _only(m).endpoints != (), timeout=10)
            assert netmap.self_node.fqdn == "a.mesh.internal" and netmap.state is NodeState.AUTHORIZED
            peer = _only(netmap)
            assert (peer.name, peer.endpoints, peer.user) == ("b", ("192.0.2.1:41641",), "default")
            await b.update_endpoints(["192.0.2.2:41641"])
            await a.wait_for_netmap(lambda m: _only(m).endpoints == ("192.0.2.2:41641",), timeout=10)
            admin.post(f"/nodes/{peer.id}/rename", name="bee")
            await a.wait_for_netmap(lambda m: _only(m).fqdn == "bee.mesh.internal", timeout=10)
            await b.logout()
            await a.wait_for_netmap(lambda m: not m.peers, timeout=10)
            (listed,) = [n for n in admin.nodes() if n["name"] == "bee"]
            assert listed["state"] == "key_expired"


async def test_approval_tags_and_refusals(tmp_path: Path) -> None:
    with start_server(tmp_path / "server", approval_required=True) as running:
        admin = Admin(running)
        async with _client(running.url, "waits", admin.key()) as waiting:
            assert waiting.netmap is not None and waiting.netmap.state is NodeState.PENDING_APPROVAL
            assert waiting.netmap.self_node.addresses == ()
            admin.post(f"/nodes/{waiting.node_id}/approve")
            netmap = await waiting.wait_for_approval(timeout=10)
            assert netmap.self_node.addresses
        ci_key = admin.key(preapproved=True, tags=["tag:ci"])
        async with _client(running.url, "ci", ci_key, tags=["tag:ci"]) as tagged:
            assert tagged.netmap is not None and tagged.netmap.self_node.tags == ("tag:ci",)
        # Refusals raise the class the server's EmbedmeshError code names.
        with pytest.raises(TagNotPermittedError, match="tag:prod"):
            async with _client(running.url, "x", admin.key(preapproved=True), tags=["tag:prod"]):
                pass
        with pytest.raises(AuthKeyInvalidError, match="not recognised"):
            async with _client(running.url, "y", "emk-000000000000-" + "0" * 48):
                pass


async def test_old_clients_bad_requests_and_other_endpoints(tmp_path: Path) -> None:
    with start_server(tmp_path / "server") as running:
        machine, node = MachinePrivate.generate(os.urandom(32)), NodePrivate.generate(os.urandom(32))
        async with connect_control(running.url, machine, 130) as conn:
            assert conn.early_payload is not None  # a node-key challenge, as headscale sends
            old = tailcfg.register_request(node.public(), hostinfo={}, version=100)
            reply = await conn.request("POST", "/machine/register", old)
            assert reply.status == 200  # the Error is what `tailscale up` prints
            assert "Tailscale 1.80" in tailcfg.parse_register_response(reply.body).error
            disco = DiscoPrivate.generate(bytes(32)).public()
            old_map = tailcfg.map_request(node.public(), disco, hostinfo={}, version=100)
            reply = await conn.request("POST", "/machine/map", old_map)
            assert reply.status == 400 and b"Tailscale 1.80" in reply.body
            assert (await conn.request("POST", "/machine/register", b"{")).status == 400
            unknown = tailcfg.map_request(node.public(), disco, hostinfo={})
            assert (await conn.request("POST", "/machine/map", unknown)).status == 404
            assert (await conn.request("POST", "/machine/set-dns", b"{}")).status == 501
        # The server keeps serving after all that.
        async with _client(running.url, "fine", Admin(running).key()) as fine:
            assert fine.netmap is not None


async def test_random_changes_reach_every_tailscale_client_as_deltas(tmp_path: Path) -> None:
    """Whatever the admin and the nodes do, each client's map, built from the server's deltas,
    becomes the full map the coordinator would send it."""
    rng = random.Random(9)
    with start_server(tmp_path / "server") as running:
        admin = Admin(running)
        key = admin.key(reusable=True)
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(_client(running.url, f"n{i}", key)) for i in range(4)]
            coordinator = running.server.coordinator
            for step in range(16):
                target = rng.choice(clients)
                action = rng.choice(["rename", "expire", "endpoints", "approve"])
                if action == "rename":
                    admin.post(f"/nodes/{target.node_id}/rename", name=f"r{step}")
                elif action == "expire":
                    admin.post(f"/nodes/{target.node_id}/expire")
                elif action == "approve":
                    admin.post(f"/nodes/{target.node_id}/approve")
                else:
                    await target.update_endpoints([f"198.51.100.{step}:41641"])
                for client in clients:
                    node_id = client.node_id
                    assert node_id is not None
                    with anyio.fail_after(10):
                        while True:
                            expected = _view(
                                dict(running.call(lambda n=node_id: coordinator.network_map(n)).peers)
                            )
                            assert client.netmap is not None
                            if _view(dict(client.netmap.peers)) == expected:
                                break
                            await anyio.sleep(0.02)


async def test_interactive_login_is_completed_by_an_admin(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from embedmesh.cli.control import control

    state = tmp_path / "server"
    with start_server(state) as running:
        admin = Admin(running)
        assert admin.http.post("/admin/v1/users", json={"name": "alice@example.com"}).status_code == 201
        client = _client(running.url, "laptop", None)
        finished = anyio.Event()

        async def hold() -> None:
            async with client:
                await finished.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            with anyio.fail_after(10):
                while not client.auth_url:
                    await anyio.sleep(0.05)
            auth_url = client.auth_url
            assert auth_url.startswith(running.url + "/register/")
            assert client.netmap is None and not admin.nodes()  # nothing stored before the admin acts
            page = httpx.get(client.auth_url)
            assert page.status_code == 200 and "laptop" in page.text and "<script" not in page.text
            login_id = client.auth_url.rsplit("/", 1)[1]
            assert f"auth register {login_id}" in page.text
            listed = CliRunner().invoke(control, ["auth", "list", "--state-dir", str(state), "--json"])
            assert [x["hostname"] for x in json.loads(listed.output)["logins"]] == ["laptop"]
            result = CliRunner().invoke(
                control,
                [
                    "auth",
                    "register",
                    client.auth_url,
                    "--user",
                    "alice@example.com",
                    "--state-dir",
                    str(state),
                ],
            )
            assert result.exit_code == 0 and "joined as alice@example.com" in result.output, result.output
            netmap = await client.wait_for_netmap(timeout=10)
            assert netmap.state is NodeState.AUTHORIZED and netmap.self_node.user == "alice@example.com"
            assert client.auth_url == ""
            assert httpx.get(auth_url).status_code == 404  # a login is used once
            again = CliRunner().invoke(control, ["auth", "register", login_id, "--state-dir", str(state)])
            assert again.exit_code != 0 and "no login waiting" in again.output
            finished.set()


async def test_a_login_completed_before_the_followup_arrives_still_registers_the_device(
    tmp_path: Path,
) -> None:
    # The device shows its AuthURL before it sends the Followup; an admin quick enough (or a
    # device slow enough) completes the login first. The Followup must then get the registration.
    with start_server(tmp_path / "server") as running:
        admin = Admin(running)
        machine, node = MachinePrivate.generate(os.urandom(32)), NodePrivate.generate(os.urandom(32))
        async with connect_control(running.url, machine, 130) as conn:
            body = tailcfg.register_request(node.public(), hostinfo={"Hostname": "slow"})
            first = tailcfg.parse_register_response((await conn.request("POST", "/machine/register", body)).body)
            assert first.auth_url and not first.machine_authorized
            done = admin.http.post(f"/admin/v1/logins/{first.auth_url.rsplit('/', 1)[1]}/register", json={})
            assert done.status_code == 200, done.text
            followup = tailcfg.register_request(node.public(), hostinfo={"Hostname": "slow"}, followup=first.auth_url)
            with anyio.fail_after(10):
                reply = await conn.request("POST", "/machine/register", followup)
            answer = tailcfg.parse_register_response(reply.body)
            assert answer.machine_authorized and not answer.auth_url
            assert [n["name"] for n in admin.nodes()] == ["slow"]


async def test_a_clients_preferred_derp_region_is_its_peers_home_derp(tmp_path: Path) -> None:
    with start_server(tmp_path / "server") as running:
        key = Admin(running).key(reusable=True)
        async with _client(running.url, "viewer", key) as viewer:
            machine, node = MachinePrivate.generate(os.urandom(32)), NodePrivate.generate(os.urandom(32))
            disco = DiscoPrivate.generate(os.urandom(32)).public()
            async with connect_control(running.url, machine, 130) as conn:
                body = tailcfg.register_request(node.public(), hostinfo={"Hostname": "ts"}, auth_key=key)
                assert (await conn.request("POST", "/machine/register", body)).status == 200
                hostinfo = {"Hostname": "ts", "NetInfo": {"PreferredDERP": 900}}
                lite = tailcfg.map_request(
                    node.public(), disco, hostinfo=hostinfo, stream=False, omit_peers=True
                )
                assert (await conn.request("POST", "/machine/map", lite)).status == 200
                netmap = await viewer.wait_for_netmap(
                    lambda m: any(p.home_derp == 900 for p in m.peers.values()), 10
                )
                assert _only(netmap).disco_key == disco.raw
                hostinfo["NetInfo"] = {"PreferredDERP": 901}
                lite = tailcfg.map_request(
                    node.public(), disco, hostinfo=hostinfo, stream=False, omit_peers=True
                )
                assert (await conn.request("POST", "/machine/map", lite)).status == 200
                await viewer.wait_for_netmap(lambda m: _only(m).home_derp == 901, 10)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 200) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "Version",
                    "NodeKey",
                    "OldNodeKey",
                    "Auth",
                    "AuthKey",
                    "Expiry",
                    "Followup",
                    "Hostinfo",
                    "Hostname",
                    "OS",
                    "RequestTags",
                    "NetInfo",
                    "PreferredDERP",
                    "DiscoKey",
                    "Endpoints",
                    "Stream",
                    "OmitPeers",
                    "Ephemeral",
                ]
            ),
            inner,
            max_size=6,
        )
    ),
    max_leaves=16,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(["/machine/register", "/machine/map"]), document=_JSON, version=st.integers(100, 140)
)
def test_any_request_json_gets_an_answer_never_a_crash(
    tmp_path_factory: pytest.TempPathFactory, path: str, document: object, version: int
) -> None:
    """Hostile RegisterRequest/MapRequest JSON from an authenticated machine: 200, 400 or 404."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fuzz"))
    import fuzz_ts_control_api as target

    if isinstance(document, dict):
        document.setdefault("Version", version)
        document["Stream"] = False  # a streaming map would not end
    status = anyio.run(target.call, path, json.dumps(document).encode())
    assert status in (200, 400, 404)


async def _first_map(url: str, version: int, key: str) -> dict[str, object]:
    """Register a fresh machine announcing capability ``version`` (Noise prologue and requests)
    and return the first MapResponse of its stream, as JSON."""
    machine, node = MachinePrivate.generate(os.urandom(32)), NodePrivate.generate(os.urandom(32))
    disco = DiscoPrivate.generate(os.urandom(32)).public()
    async with connect_control(url, machine, version) as conn:
        body = tailcfg.register_request(
            node.public(), hostinfo={"Hostname": f"v{version}"}, auth_key=key, version=version
        )
        assert (await conn.request("POST", "/machine/register", body)).status == 200
        request = tailcfg.map_request(
            node.public(), disco, hostinfo={"Hostname": f"v{version}"}, version=version
        )
        reader = mapframe.MapStreamReader(compressed=True)
        async with conn.stream("POST", "/machine/map", request) as response:
            assert response.status == 200
            with anyio.fail_after(10):
                async for chunk in response:
                    for message in reader.receive_data(chunk):
                        decoded = json.loads(message)
                        assert isinstance(decoded, dict)
                        return decoded
    raise AssertionError("the map stream ended before its first map")


async def test_capability_version_112_is_refused_and_113_is_served(tmp_path: Path) -> None:
    """The floor of the versions served is Tailscale 1.80 (113): one below gets a refusal that
    says so; 113 registers, gets its map and is in its peers' maps."""
    with start_server(tmp_path / "server") as running:
        key = Admin(running).key(reusable=True)
        with pytest.raises(
            ProtocolVersionError,
            match=r"^unsupported client version 112 \(a development build after Tailscale 1\.78\): "
            r"this server serves Tailscale 1\.80 \(capability version 113\) and newer; upgrade the client",
        ):
            async with _client(running.url, "too-old", key, capability_version=112):
                pass
        async with (
            _client(running.url, "oldest", key, capability_version=113) as oldest,
            _client(running.url, "newest", key, capability_version=142) as newest,
        ):
            netmap = await oldest.wait_for_netmap(lambda m: len(m.peers) == 1, timeout=10)
            assert netmap.state is NodeState.AUTHORIZED and _only(netmap).name == "newest"
            netmap = await newest.wait_for_netmap(lambda m: len(m.peers) == 1, timeout=10)
            assert _only(netmap).name == "oldest"
        assert "too-old" not in {n["name"] for n in Admin(running).nodes()}


async def test_each_capability_version_gets_its_form_of_the_map(tmp_path: Path) -> None:
    """The per-version answers on the wire: the self node's Cap; a non-default key lifetime as
    MaxKeyDuration (nanoseconds) below 114 and as the tailnet.maxKeyDuration attribute from 114;
    a NoMeasureNoHome DERP region also marked Avoid below 115."""
    derp_map = tmp_path / "derp-map.json"
    regions = {
        "900": {
            "RegionID": 900,
            "RegionCode": "home",
            "Nodes": [{"Name": "900a", "RegionID": 900, "HostName": "a"}],
        },
        "901": {
            "RegionID": 901,
            "RegionCode": "far",
            "NoMeasureNoHome": True,
            "Nodes": [{"Name": "901a", "RegionID": 901, "HostName": "b"}],
        },
    }
    derp_map.write_text(json.dumps({"Regions": regions}))
    ninety_days = 90 * 86400.0
    with start_server(tmp_path / "server", key_expiry=ninety_days, derp_map=derp_map) as running:
        key = Admin(running).key(reusable=True)
        seen = {v: await _first_map(running.url, v, key) for v in (113, 114, 115, 142)}
    for version, message in seen.items():
        node = message["Node"]
        assert isinstance(node, dict) and node["Cap"] == version
        caps = node["CapMap"]
        if version < 114:
            assert (
                message["MaxKeyDuration"] == int(ninety_days * 1e9) and "tailnet.maxKeyDuration" not in caps
            )
        else:
            assert caps["tailnet.maxKeyDuration"] == [ninety_days] and "MaxKeyDuration" not in message
        got = message["DERPMap"]["Regions"]  # type: ignore[index]
        assert got["901"]["NoMeasureNoHome"] is True and "Avoid" not in got["900"]
        assert got["901"].get("Avoid", False) is (version < 115)
    # The server's own DERP map is not changed by what older clients were sent.
    assert "Avoid" not in running.server.derp_map_json()["Regions"]["901"]


async def test_the_keyless_rate_limit_is_a_429_from_version_137_and_an_error_before(tmp_path: Path) -> None:
    """Clients from 137 on wait out a 429's Retry-After; older ones get the refusal as the
    RegisterResponse's Error (and back off), as before."""
    config = {"approval_required": True, "keyless_burst": 1, "keyless_interval": 60.0}
    with start_server(tmp_path / "server", **config) as running:

        async def register(version: int) -> Response:
            machine, node = MachinePrivate.generate(os.urandom(32)), NodePrivate.generate(os.urandom(32))
            async with connect_control(running.url, machine, version) as conn:
                body = tailcfg.register_request(node.public(), hostinfo={"Hostname": "k"}, version=version)
                return await conn.request("POST", "/machine/register", body)

        waiting = await register(137)  # the burst of one: this node waits for approval
        assert waiting.status == 200 and not tailcfg.parse_register_response(waiting.body).error
        older = await register(136)
        assert older.status == 200
        assert (
            "too many registrations without an auth key" in tailcfg.parse_register_response(older.body).error
        )
        newer = await register(137)
        assert newer.status == 429 and 1 <= int(newer.headers["retry-after"]) <= 60
        assert b"too many registrations without an auth key" in newer.body


def test_release_names_and_map_adaptation_of_odd_input() -> None:
    assert tsapi.tailscale_release(113) == "Tailscale 1.80"
    assert tsapi.tailscale_release(112) == "a development build after Tailscale 1.78"
    assert tsapi.tailscale_release(142) == "Tailscale 1.102"
    assert tsapi.tailscale_release(145) == "newer than Tailscale 1.102"
    assert tsapi.tailscale_release(28) == "older than Tailscale 1.64"
    # A DERP map from the admin's file with odd entries: kept as they are, never a crash.
    odd = {"Regions": {"1": None, "2": [], "3": {"NoMeasureNoHome": "yes"}, "4": {"NoMeasureNoHome": True}}}
    out = tsapi.adapt_map_response({"DERPMap": odd}, 113)
    assert out["DERPMap"]["Regions"] == {**odd["Regions"], "4": {"NoMeasureNoHome": True, "Avoid": True}}
    assert "Avoid" not in odd["Regions"]["4"]
    assert tsapi.adapt_map_response({"DERPMap": {"Regions": []}}, 113) == {"DERPMap": {"Regions": []}}
    # Deltas without a Node or DERPMap are left alone, whatever the version.
    assert tsapi.adapt_map_response({"PeersRemoved": [3]}, 113, max_key_duration=86400.0) == {
        "PeersRemoved": [3]
    }

@given(st.lists(st.tuples(st.sampled_from(["add", "discard", "clear"]), st.integers(0, 3000)), max_size=200))
def test_the_streams_peer_bitmap_is_a_set_of_ids(steps: list[tuple[str, int]]) -> None:
    from embedmesh.control.tsapi import _PeerSet

    bitmap, model = _PeerSet(), set[int]()
    for action, peer_id in steps:
        if action == "add":
            bitmap.add(peer_id)
            model.add(peer_id)
        elif action == "discard":
            bitmap.discard(peer_id)
            model.discard(peer_id)
        else:
            bitmap.clear()
            model.clear()
        assert bitmap.has(peer_id) == (peer_id in model)
    assert bitmap.ids() == sorted(model)
