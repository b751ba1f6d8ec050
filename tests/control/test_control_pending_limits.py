"""Keyless registrations under approval (issue 8's security review): anyone who can reach the
server can register a node that waits for an admin, so such nodes are capped in total and per
source address, and a waiting node does not keep a name a real node later asks for (500 keyless
pending nodes once took 500 addresses and one named ``web`` pushed a later real ``web`` to
``web-1``)."""

from __future__ import annotations

import random

import pytest

from embedmesh.control.coordinator import Coordinator, CoordinatorConfig
from embedmesh.control.errors import RegistrationLimitError, error_from_code
from embedmesh.control.messages import RegisterRequest
from embedmesh.control.netmap import NodeState
from embedmesh.control.store import Store

T0 = 1_700_000_000.0


def _coordinator(**config: object) -> Coordinator:
    rng = random.Random(7)
    return Coordinator(
        Store(None),
        CoordinatorConfig(approval_required=True, **config),  # type: ignore[arg-type]
        now=T0,
        random_bytes=lambda n: bytes(rng.randrange(256) for _ in range(n)),
    )


def _request(n: int, hostname: str, key: str | None = None) -> RegisterRequest:
    return RegisterRequest(
        n.to_bytes(2, "big") * 16, (n + 50000).to_bytes(2, "big") * 16, hostname, auth_key=key
    )


def _machine(n: int) -> bytes:
    return n.to_bytes(4, "big") * 8


def test_a_pending_node_does_not_keep_a_name_a_real_node_asks_for() -> None:
    c = _coordinator()
    squatter = c.register(_machine(1), _request(1, "web"), T0, "198.51.100.7")
    assert squatter.state is NodeState.PENDING_APPROVAL and squatter.rec.name == "web"
    _, key = c.create_auth_key(preapproved=True, now=T0)
    real = c.register(_machine(2), _request(2, "web", key), T0, "192.0.2.1")
    assert real.rec.name == "web" and real.in_mesh
    assert squatter.rec.name == "web-1"
    assert c.peer_info(real).fqdn == "web.mesh.internal"
    # Approved later, the waiting node picks again: its hostname is taken, so a suffix.
    c.approve(squatter.id, T0 + 1)
    assert squatter.in_mesh and squatter.rec.name == "web-1"


def test_an_approved_node_takes_its_hostname_when_it_is_free_by_then() -> None:
    c = _coordinator()
    first = c.register(_machine(1), _request(1, "db"), T0, "198.51.100.7")
    second = c.register(_machine(2), _request(2, "db"), T0, "198.51.100.8")
    assert (first.rec.name, second.rec.name) == ("db", "db-1")
    c.delete(first.id)
    c.approve(second.id, T0 + 1)
    assert second.rec.name == "db"


def test_pending_nodes_are_capped_in_total() -> None:
    c = _coordinator(max_pending=10, keyless_burst=1000)
    for n in range(10):
        c.register(_machine(n), _request(n, f"p{n}"), T0, f"198.51.100.{n}")
    with pytest.raises(RegistrationLimitError, match=r"10 nodes already wait for approval.*auth key"):
        c.register(_machine(99), _request(99, "late"), T0, "198.51.100.99")
    assert len(c) == 10
    # A node with a (pre-approved) auth key is not held back by the waiting ones.
    _, key = c.create_auth_key(preapproved=True, now=T0)
    assert c.register(_machine(100), _request(100, "real", key), T0, "198.51.100.99").rec.name == "real"
    # Approving one makes room for another.
    c.approve(next(n for n in c.nodes() if not n.rec.authorized).id, T0)
    c.register(_machine(101), _request(101, "next"), T0, "198.51.100.101")


def test_keyless_registrations_are_rate_limited_per_source() -> None:
    c = _coordinator(keyless_burst=3, keyless_interval=60.0)
    for n in range(3):
        c.register(_machine(n), _request(n, f"a{n}"), T0, "203.0.113.5")
    with pytest.raises(RegistrationLimitError, match=r"from 203\.0\.113\.5: try again in 60 s"):
        c.register(_machine(10), _request(10, "a10"), T0, "203.0.113.5")
    # Another source is not affected; one IPv6 /64 counts as one source.
    c.register(_machine(11), _request(11, "b"), T0, "203.0.113.6")
    for n in range(3):
        c.register(_machine(20 + n), _request(20 + n, f"v{n}"), T0, f"2001:db8:1:2::{n + 1}")
    with pytest.raises(RegistrationLimitError):
        c.register(_machine(30), _request(30, "v9"), T0, "2001:db8:1:2:ffff::9")
    # One more token per interval.
    c.register(_machine(10), _request(10, "a10"), T0 + 60, "203.0.113.5")
    with pytest.raises(RegistrationLimitError):
        c.register(_machine(12), _request(12, "a12"), T0 + 61, "203.0.113.5")
    # A waiting node that reconnects is not a new registration: never limited.
    again = c.register(_machine(0), _request(0, "a0"), T0 + 61, "203.0.113.5")
    assert again.rec.name == "a0"


def test_the_refusal_travels_as_its_own_error() -> None:
    assert type(error_from_code("registration_limit", "x")) is RegistrationLimitError


def test_500_keyless_nodes_from_one_source_take_at_most_the_burst() -> None:
    c = _coordinator()
    refused = 0
    for n in range(500):
        try:
            c.register(_machine(n), _request(n, "web"), T0 + n * 0.01, "198.51.100.1")
        except RegistrationLimitError:
            refused += 1
    assert len(c) == CoordinatorConfig().keyless_burst and refused == 500 - len(c)


def test_a_pending_node_holds_no_address_until_it_is_approved() -> None:
    c = _coordinator(keyless_burst=1000)
    waiting = [c.register(_machine(n), _request(n, f"p{n}"), T0, f"198.51.100.{n}") for n in range(5)]
    for node in waiting:
        info = c.peer_info(node)
        assert node.rec.ipv4 is None and info.addresses == () and info.allowed_ips == ()
    assert len(c._pool) == 0  # nothing taken from the pool by the waiting ones
    _, key = c.create_auth_key(preapproved=True, now=T0)
    real = c.register(_machine(50), _request(50, "real", key), T0, "192.0.2.1")
    assert str(c.peer_info(real).addresses[0]) == "100.64.0.1"
    c.approve(waiting[3].id, T0 + 1)
    approved = c.peer_info(waiting[3])
    assert [str(a) for a in approved.addresses] == ["100.64.0.2", "fd7a:115c:a1e0::6440:2"]
    # The approved node appears in the real node's map with its new address.
    assert c.network_map(real.id).peers[waiting[3].id].addresses == approved.addresses
    # Deleting a waiting node frees nothing it did not hold; re-approving keeps the address.
    c.delete(waiting[0].id)
    c.approve(waiting[3].id, T0 + 2)
    assert c.peer_info(waiting[3]).addresses == approved.addresses
    assert len(c._pool) == 2


def test_a_pending_node_that_reauthenticates_with_a_key_gets_an_address() -> None:
    c = _coordinator()
    node = c.register(_machine(1), _request(1, "late"), T0, "198.51.100.1")
    assert node.rec.ipv4 is None
    _, key = c.create_auth_key(preapproved=True, now=T0)
    # A new node key with the key (as `up --auth-key` after a reset does).
    request = RegisterRequest(b"\x77" * 32, b"\x78" * 32, "late", auth_key=key)
    again = c.register(_machine(1), request, T0 + 1, "198.51.100.1")
    assert again.id == node.id and again.in_mesh
    assert str(c.peer_info(again).addresses[0]) == "100.64.0.1"
