"""The coordinator on its own (no network, explicit clock): registration rules, timers, and the
property that a node's map, built from the deltas it was sent, always equals a freshly computed map."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedmesh.control.coordinator import (
    Coordinator,
    CoordinatorConfig,
    LiveNode,
    Policy,
    Stream,
    sanitize_hostname,
)
from embedmesh.control.errors import (
    AuthKeyRequiredError,
    ConflictError,
    NotFoundError,
)
from embedmesh.control.messages import (
    DeltaMessage,
    FullMap,
    RegisterRequest,
    RegisterResponse,
    parse_server_message,
)
from embedmesh.control.netmap import NetworkMap, NodeState
from embedmesh.control.store import Store

T0 = 1_700_000_000.0


def _coordinator(**config: object) -> Coordinator:
    rng = random.Random(1)
    return Coordinator(
        Store(None),
        CoordinatorConfig(**config),  # type: ignore[arg-type]
        now=T0,
        random_bytes=lambda n: bytes(rng.randrange(256) for _ in range(n)),
    )


def _request(n: int, hostname: str = "node", key: str | None = None, **kw: object) -> RegisterRequest:
    return RegisterRequest(bytes([n, 1]) * 16, bytes([n, 2]) * 16, hostname, auth_key=key, **kw)  # type: ignore[arg-type]


class Observer:
    """A fake connected node: applies what the coordinator queues for it, like the client does."""

    def __init__(self, coordinator: Coordinator, node_id: int, now: float) -> None:
        self.coordinator = coordinator
        self.stream: Stream = coordinator.attach(node_id, lambda: None, now)
        self.netmap: NetworkMap | None = None
        self.messages = 0

    def drain(self) -> None:
        for payload in self.coordinator.take(self.stream):
            self.messages += 1
            message = parse_server_message(payload)
            if isinstance(message, FullMap):
                self.netmap = message.netmap
            elif isinstance(message, DeltaMessage):
                assert self.netmap is not None
                self.netmap = self.netmap.apply(message.delta)


def test_hostnames_become_unique_dns_labels() -> None:
    assert sanitize_hostname("My Laptop.local") == "my-laptop"
    assert sanitize_hostname("---") == "node"
    assert sanitize_hostname("x" * 80) == "x" * 63
    c = _coordinator()
    _, key = c.create_auth_key(reusable=True, now=T0)
    names = [c.register(bytes([i]) * 32, _request(i, "web", key), T0).rec.name for i in range(1, 4)]
    assert names == ["web", "web-1", "web-2"]
    long = [c.register(bytes([i]) * 32, _request(i, "y" * 70, key), T0).rec.name for i in range(10, 12)]
    assert long == ["y" * 63, "y" * 61 + "-1"]


def test_registration_rules() -> None:
    c = _coordinator()
    machine = b"m" * 32
    with pytest.raises(AuthKeyRequiredError):
        c.register(machine, _request(1), T0)
    _, key = c.create_auth_key(now=T0)
    node = c.register(machine, _request(1, key=key), T0)
    # Same machine and node key: no key needed, same node.
    assert c.register(machine, _request(1), T0 + 1) is node
    # Same machine, new node key without an auth key: refused.
    with pytest.raises(AuthKeyRequiredError, match="another node key"):
        c.register(machine, _request(2), T0 + 2)
    # Someone else's node key: refused.
    with pytest.raises(ConflictError):
        c.register(b"x" * 32, _request(1, key=c.create_auth_key(now=T0)[1]), T0)
    with pytest.raises(NotFoundError):
        c.approve(99, T0)


def test_key_expiry_on_the_clock_cuts_off_and_approval_restores() -> None:
    c = _coordinator(key_expiry=100.0)
    _, key = c.create_auth_key(reusable=True, now=T0)
    a = c.register(b"a" * 32, _request(1, "a", key), T0)
    b = c.register(b"b" * 32, _request(2, "b", key), T0 + 50)
    oa, ob = Observer(c, a.id, T0), Observer(c, b.id, T0 + 50)
    oa.drain(), ob.drain()
    assert c.next_deadline() == T0 + 100
    c.handle_timeout(T0 + 99)
    oa.drain()
    assert oa.netmap is not None and oa.netmap.state is NodeState.AUTHORIZED
    c.handle_timeout(T0 + 100)
    oa.drain(), ob.drain()
    assert oa.netmap is not None and oa.netmap.state is NodeState.KEY_EXPIRED and not oa.netmap.peers
    assert ob.netmap is not None and not ob.netmap.peers
    # A restart without a key does not revive an expired node.
    assert c.register(b"a" * 32, _request(1, "a"), T0 + 101).state is NodeState.KEY_EXPIRED
    c.approve(a.id, T0 + 110)
    oa.drain(), ob.drain()
    assert oa.netmap == c.network_map(a.id) and len(oa.netmap.peers) == 1
    assert ob.netmap is not None and list(ob.netmap.peers) == [a.id]
    assert a.rec.key_expiry == T0 + 210


def test_ephemeral_reaper_and_address_reuse() -> None:
    c = _coordinator(ephemeral_timeout=60.0)
    _, key = c.create_auth_key(reusable=True, ephemeral=True, now=T0)
    _, plain = c.create_auth_key(reusable=True, now=T0)
    watcher = c.register(b"w" * 32, _request(9, "w", plain), T0)
    ow = Observer(c, watcher.id, T0)
    job = c.register(b"j" * 32, _request(1, "job", key), T0)
    address = job.rec.ipv4
    stream = c.attach(job.id, lambda: None, T0)
    c.detach(stream, T0 + 1)
    c.handle_timeout(T0 + 60)
    assert job.id in {n.id for n in c.nodes()}
    # Reconnecting in time cancels the reaping.
    stream = c.attach(job.id, lambda: None, T0 + 30)
    c.handle_timeout(T0 + 62)
    assert job.id in {n.id for n in c.nodes()}
    c.detach(stream, T0 + 70)
    c.handle_timeout(T0 + 130)
    assert job.id not in {n.id for n in c.nodes()}
    ow.drain()
    assert ow.netmap is not None and not ow.netmap.peers
    assert c.register(b"k" * 32, _request(2, "job2", key), T0 + 131).rec.ipv4 == address


def test_restart_reloads_state_and_schedules_ephemeral_reaping(tmp_path: object) -> None:
    store = Store(None)
    c = Coordinator(store, CoordinatorConfig(ephemeral_timeout=10), now=T0, random_bytes=os.urandom)
    _, key = c.create_auth_key(reusable=True, now=T0)
    kept = c.register(b"a" * 32, _request(1, "a", key), T0)
    c.register(b"e" * 32, _request(2, "e", key, ephemeral=True), T0)
    again = Coordinator(store, CoordinatorConfig(ephemeral_timeout=10), now=T0 + 5, random_bytes=os.urandom)
    assert {n.rec.name for n in again.nodes()} == {"a", "e"}
    again.handle_timeout(T0 + 16)
    assert [n.id for n in again.nodes()] == [kept.id]


def test_endpoint_change_costs_one_op_per_viewer() -> None:
    c = _coordinator()
    _, key = c.create_auth_key(reusable=True, now=T0)
    nodes = [c.register(bytes([i]) * 32, _request(i, f"n{i}", key), T0) for i in range(1, 21)]
    observers = [Observer(c, n.id, T0) for n in nodes]
    for o in observers:
        o.drain()
    before = dict(c.counters)
    c.update_endpoints(observers[0].stream, ("1.2.3.4:5",), T0)
    # Queueing is one log append, whatever the number of viewers ...
    assert c.counters["broadcasts"] - before["broadcasts"] == 1
    # ... and each viewer gets exactly that op (the source only its own entry).
    payloads = [c.take(o.stream) for o in observers]
    assert c.counters["ops_sent"] - before["ops_sent"] == 19 + 1
    assert len({p[0] for p in payloads[1:]}) == 1 and all(len(p) == 1 for p in payloads)
    assert c.counters["full_maps"] == before["full_maps"]


def test_take_batch_shares_each_op_and_a_changed_node_drops_its_rendering() -> None:
    """A map API that renders its own format gets the same op bytes object on every stream (so it
    can render an op once), a full map as the node to render, and a node's cached rendering is
    dropped as soon as the node changes."""
    c = _coordinator()
    _, key = c.create_auth_key(reusable=True, now=T0)
    nodes = [c.register(bytes([i]) * 32, _request(i, f"n{i}", key), T0) for i in range(1, 6)]
    streams = [c.attach(n.id, lambda: None, T0) for n in nodes]
    first = [c.take_batch(s) for s in streams]
    assert [b.full_map for b in first] == nodes and all(not b.ops for b in first)
    assert all(isinstance(parse_server_message(b.messages[0]), RegisterResponse) for b in first)
    peers = sorted(p.id for p in c.visible_peers(nodes[0]))
    assert peers == [n.id for n in nodes[1:]]
    nodes[0].rendered = b"cached"
    nodes[1].rendered = b"cached"
    c.update_endpoints(streams[0], ("1.2.3.4:5",), T0)
    assert nodes[0].rendered is None and nodes[1].rendered == b"cached"
    batches = [c.take_batch(s) for s in streams[1:]]
    assert all(b.full_map is None and len(b.ops) == 1 for b in batches)
    assert len({id(b.ops[0]) for b in batches}) == 1
    # take() is the same batch in the coordinator's own encoding.
    c.update_endpoints(streams[0], ("1.2.3.4:6",), T0)
    delta = parse_server_message(c.take(streams[1])[0])
    assert isinstance(delta, DeltaMessage) and len(delta.delta.ops) == 1


def test_parked_writers_are_woken_once_and_busy_ones_batch() -> None:
    c = _coordinator()
    _, key = c.create_auth_key(reusable=True, now=T0)
    wakes: dict[int, int] = {}
    streams = []
    for i in range(1, 6):
        node = c.register(bytes([i]) * 32, _request(i, f"n{i}", key), T0)
        wakes[node.id] = 0
        stream = c.attach(node.id, lambda node_id=node.id: wakes.__setitem__(node_id, wakes[node_id] + 1), T0)
        streams.append(stream)
    for stream in streams:
        c.take(stream)
    assert all(c.park(stream) for stream in streams)
    counts = dict(wakes)
    for port in range(1, 11):
        c.update_endpoints(streams[0], (f"1.2.3.4:{port}",), T0)
    # Ten changes, one wake per parked writer; then one message carries all ten ops.
    assert all(wakes[s.node_id] - counts[s.node_id] <= 2 for s in streams[1:])
    messages = c.take(streams[1])
    assert len(messages) == 1
    delta = parse_server_message(messages[0])
    assert isinstance(delta, DeltaMessage) and len(delta.delta.ops) == 10
    assert not c.park(streams[2]) and c.take(streams[2])


def test_change_log_is_trimmed_and_laggards_get_a_full_map() -> None:
    from embedmesh.control import coordinator as module

    c = _coordinator()
    _, key = c.create_auth_key(reusable=True, now=T0)
    a = Observer(c, c.register(b"a" * 32, _request(1, "a", key), T0).id, T0)
    b = Observer(c, c.register(b"b" * 32, _request(2, "b", key), T0).id, T0)
    a.drain(), b.drain()
    old_lag, old_every = module._MAX_LAG, module._TRIM_EVERY
    module._MAX_LAG, module._TRIM_EVERY = 50, 16
    try:
        for port in range(1, 200):
            c.update_endpoints(a.stream, (f"1.2.3.4:{port}",), T0)
            if port % 8 == 0:
                pass  # b never drains: it falls behind
        assert len(c._log) < 64
        full_maps = c.counters["full_maps"]
        b.drain()
        assert c.counters["full_maps"] == full_maps + 1
        assert b.netmap == c.network_map(b.stream.node_id)
    finally:
        module._MAX_LAG, module._TRIM_EVERY = old_lag, old_every


# ------------------------------------------------------------------------------ property

OPS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "register",
                "register_pending",
                "register_ephemeral",
                "approve",
                "expire",
                "rename",
                "delete",
                "endpoints",
                "attach",
                "detach",
                "logout",
                "tick",
                "restart_node",
            ]
        ),
        st.integers(0, 50),
    ),
    max_size=40,
)


class OddEvenPolicy(Policy):
    """A stand-in for ACLs: nodes with odd ids do not see nodes whose id is a multiple of 4."""

    allows_all = False

    def can_see(self, viewer: LiveNode, peer: LiveNode) -> bool:
        return not (viewer.id % 2 == 1 and peer.id % 4 == 0)


@settings(max_examples=60, deadline=None)
@given(OPS, st.booleans())
def test_deltas_always_rebuild_the_servers_map(ops: list[tuple[str, int]], allow_all: bool) -> None:
    c = _coordinator(approval_required=True, key_expiry=300.0, ephemeral_timeout=20.0)
    if not allow_all:
        c.policy = OddEvenPolicy()
    _, key = c.create_auth_key(reusable=True, preapproved=True, now=T0)
    _, ephemeral_key = c.create_auth_key(reusable=True, preapproved=True, ephemeral=True, now=T0)
    now = T0
    observers: dict[int, Observer] = {}
    machines = 0
    for op, arg in ops:
        now += 1
        node_ids = sorted(n.id for n in c.nodes())
        target = node_ids[arg % len(node_ids)] if node_ids else None
        if op.startswith("register"):
            machines += 1
            auth = {"register": key, "register_pending": None, "register_ephemeral": ephemeral_key}[op]
            node = c.register(bytes([machines]) * 32, _request(machines, f"h{arg % 3}", auth), now)
            if arg % 2:
                observers[node.id] = Observer(c, node.id, now)
        elif target is None:
            continue
        elif op == "approve":
            c.approve(target, now)
        elif op == "expire":
            c.expire(target, now)
        elif op == "rename":
            try:
                c.rename(target, f"r{arg % 4}")
            except ConflictError:
                pass
        elif op == "delete":
            c.delete(target)
            observers.pop(target, None)
        elif op == "endpoints" and target in observers:
            c.update_endpoints(observers[target].stream, (f"10.0.0.{arg}:4000",), now)
        elif op == "attach":
            observers[target] = Observer(c, target, now)
        elif op == "detach" and target in observers:
            c.detach(observers.pop(target).stream, now)
        elif op == "logout" and target in observers:
            c.logout(observers.pop(target).stream, now)
        elif op == "tick":
            now += arg * 10
            c.handle_timeout(now)
        elif op == "restart_node":
            node = c.node(target)
            c.register(node.rec.machine_key, _request(node.rec.machine_key[0], "again"), now)
        # Deleted, logged-out and reaped nodes' streams are closed; the rest must match.
        for node_id in list(observers):
            if node_id not in {n.id for n in c.nodes()}:
                observers.pop(node_id)
        for node_id, observer in observers.items():
            if arg % 3 == 0 or op == "tick":
                observer.drain()
                assert observer.netmap == c.network_map(node_id), f"node {node_id} after {op}"
    for node_id, observer in observers.items():
        observer.drain()
        assert observer.netmap == c.network_map(node_id)
