"""NetcheckCore on virtual time: probe plans, retransmits, deadlines, NAT mappings, the preferred
region's hysteresis and the HTTPS fallback, against a simulated network of STUN servers."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedmesh import netcheck
from embedmesh.netcheck import NetcheckCore, NetcheckReport, preferred_region
from embedmesh.tailscale import stun
from embedmesh.tailscale.derpmap import DerpMap, parse_derp_map
from embedmesh.tailscale.stunserver import StunResponder

PUBLIC = ("203.0.113.5", 41641)


def derp_map(*regions: tuple[int, list[str]], **node_extra: Any) -> DerpMap:
    """A map of regions, each with STUN servers at the given IPv4 addresses."""
    return parse_derp_map(
        {
            "Regions": {
                str(rid): {
                    "RegionID": rid,
                    "RegionCode": f"r{rid}",
                    "RegionName": f"Region {rid}",
                    "Nodes": [
                        {
                            "Name": f"{rid}{chr(97 + i)}",
                            "RegionID": rid,
                            "HostName": f"derp{rid}.example",
                            "IPv4": ip,
                            **node_extra,
                        }
                        for i, ip in enumerate(ips)
                    ],
                }
                for rid, ips in regions
            }
        }
    )


class Counter:
    """Distinct, reproducible transaction IDs."""

    def __init__(self) -> None:
        self.n = itertools.count(1)

    def __call__(self, size: int) -> bytes:
        return next(self.n).to_bytes(size, "big")


# A server's behaviour per request: None drops it, else (one-way delay, the source it sees).
Server = Callable[[int], tuple[float, tuple[str, int]] | None]


def always(rtt: float, source: tuple[str, int] = PUBLIC) -> Server:
    return lambda n: (rtt / 2, source)


class Network:
    """Delivers the core's requests to simulated STUN servers and their answers back, in order of time."""

    def __init__(self, servers: dict[str, Server]) -> None:
        self.servers = servers
        self.sent: list[tuple[float, tuple[str, int]]] = []
        self._queue: list[tuple[float, int, bytes, tuple[str, int]]] = []
        self._seq = itertools.count()

    def run(self, core: NetcheckCore, now: float = 100.0, **start: Any) -> NetcheckReport:
        core.start(now, **start)
        limit = now + 60
        while core.running:
            for data, dst in core.datagrams_to_send():
                self.sent.append((now, dst))
                server = self.servers.get(dst[0])
                count = sum(1 for _, d in self.sent if d == dst)
                behaviour = server(count) if server is not None else None
                if behaviour is None:
                    continue
                delay, source = behaviour
                answer = StunResponder().answer(data, source)
                assert answer is not None
                heapq.heappush(self._queue, (now + 2 * delay, next(self._seq), answer, dst))
            deadline = core.next_deadline()
            assert deadline is not None
            if self._queue and self._queue[0][0] <= deadline:
                now, _, answer, src = heapq.heappop(self._queue)
                assert core.receive(answer, src, now)
            else:
                now = max(now, deadline)
                core.handle_timeout(now)
            assert now < limit, "the check never ended"
        assert core.report is not None
        return core.report


def test_full_check_two_regions() -> None:
    core = NetcheckCore(derp_map((1, ["192.0.2.1"]), (2, ["192.0.2.2"])), random_bytes=Counter())
    net = Network({"192.0.2.1": always(0.030), "192.0.2.2": always(0.010)})
    report = net.run(core)
    assert report.udp and report.ipv4 and not report.ipv6
    assert report.global_v4 == PUBLIC
    assert report.region_latency == pytest.approx({1: 0.030, 2: 0.010})
    assert report.preferred_derp == 2
    assert report.mapping_varies_by_dest_ip is False  # two server addresses saw one mapping
    assert report.full and report.time == pytest.approx(100.030)  # ends with the last answer
    # One request per region: the answers came before any retransmit was due.
    assert [dst for _, dst in net.sent] == [("192.0.2.1", 3478), ("192.0.2.2", 3478)]
    assert report.endpoints() == [PUBLIC]


def test_mapping_varies_by_destination() -> None:
    core = NetcheckCore(derp_map((1, ["192.0.2.1"]), (2, ["192.0.2.2"])), random_bytes=Counter())
    report = Network(
        {"192.0.2.1": always(0.02, PUBLIC), "192.0.2.2": always(0.02, ("203.0.113.5", 50000))}
    ).run(core)
    assert report.mapping_varies_by_dest_ip is True
    assert report.global_v4 == PUBLIC
    assert report.global_v4_counters == {PUBLIC: 1, ("203.0.113.5", 50000): 1}


def test_retransmits_are_spaced_and_stop_at_the_first_answer() -> None:
    core = NetcheckCore(derp_map((1, ["192.0.2.1"])), random_bytes=Counter())
    # The first two requests are lost, the third answered.
    net = Network({"192.0.2.1": lambda n: None if n < 3 else (0.005, PUBLIC)})
    report = net.run(core)
    assert [round(t - 100, 3) for t, _ in net.sent] == [0.0, 0.1, 0.2]
    assert report.region_latency[1] == pytest.approx(0.010)  # timed from the request answered
    assert report.mapping_varies_by_dest_ip is None  # one server address only


def test_single_region_with_two_servers_learns_the_mapping() -> None:
    core = NetcheckCore(derp_map((1, ["192.0.2.1", "192.0.2.9"])), random_bytes=Counter())
    net = Network({"192.0.2.1": always(0.004), "192.0.2.9": always(0.004, ("203.0.113.5", 1))})
    report = net.run(core)
    # The first answer ends the region's probes; one extra request to the other server follows.
    assert [dst[0] for _, dst in net.sent] == ["192.0.2.1", "192.0.2.9"]
    assert report.mapping_varies_by_dest_ip is True


def test_a_silent_region_ends_the_check_at_the_stun_timeout() -> None:
    core = NetcheckCore(derp_map((1, ["192.0.2.1"]), (2, ["192.0.2.2"])), random_bytes=Counter())
    net = Network({"192.0.2.1": always(0.02)})
    report = net.run(core)
    assert report.time == pytest.approx(100 + netcheck.STUN_PROBE_TIMEOUT)
    assert report.region_latency == pytest.approx({1: 0.02})
    assert sum(1 for _, dst in net.sent if dst[0] == "192.0.2.2") == 3


def test_enough_regions_end_the_check_early() -> None:
    regions = [(r, [f"192.0.2.{r}"]) for r in range(1, 6)]
    core = NetcheckCore(derp_map(*regions), random_bytes=Counter())
    # Regions 1-3 answer quickly, 4 never, 5 too late to matter.
    servers = {
        "192.0.2.1": always(0.01),
        "192.0.2.2": always(0.02),
        "192.0.2.3": always(0.03),
        "192.0.2.5": always(1.0),
    }
    report = Network(servers).run(core)
    # Three regions in at 30 ms; a full check then waits twice the slowest of them (60 ms).
    assert report.time == pytest.approx(100.030 + 0.060)
    assert set(report.region_latency) == {1, 2, 3}


def test_no_udp_then_https_fallback() -> None:
    core = NetcheckCore(
        derp_map((1, ["192.0.2.1"]), (2, ["192.0.2.2"])), random_bytes=Counter(), https_fallback=True
    )
    core.start(0.0)
    assert len(core.datagrams_to_send()) == 2
    assert core.https_regions == []
    core.handle_timeout(0.1)
    core.handle_timeout(0.2)
    assert len(core.datagrams_to_send()) == 4
    assert core.next_deadline() == netcheck.STUN_PROBE_TIMEOUT
    core.handle_timeout(netcheck.STUN_PROBE_TIMEOUT)
    assert core.running and [r.region_id for r in core.https_regions] == [1, 2]
    assert core.next_deadline() == netcheck.REPORT_TIMEOUT
    core.add_https_latency(1, 0.080, "192.0.2.1")
    core.add_https_latency(2, 0.040, "192.0.2.2")
    report = core.finish(3.5)
    assert not core.running and core.report is report
    assert not report.udp and report.ipv4
    assert report.region_latency == {1: 0.080, 2: 0.040}
    assert report.preferred_derp == 2
    # Without an HTTPS answer, the report deadline ends the check anyway.
    core.start(10.0, full=True)
    core.handle_timeout(10.0 + netcheck.STUN_PROBE_TIMEOUT)
    assert core.running
    core.handle_timeout(10.0 + netcheck.REPORT_TIMEOUT)
    assert not core.running and core.report is not None and core.report.region_latency == {}


def test_without_https_fallback_the_report_comes_at_the_stun_timeout() -> None:
    core = NetcheckCore(derp_map((1, ["192.0.2.1"])), random_bytes=Counter())
    core.start(0.0)
    core.handle_timeout(netcheck.STUN_PROBE_TIMEOUT)
    assert not core.running and core.report is not None and not core.report.udp


def test_incremental_check_probes_the_fastest_regions_and_home() -> None:
    regions = [(r, [f"192.0.2.{r}"]) for r in range(1, 7)]
    latencies = {1: 0.05, 2: 0.01, 3: 0.02, 4: 0.03, 5: 0.04, 6: 0.06}
    servers = {f"192.0.2.{r}": always(d) for r, d in latencies.items()}
    core = NetcheckCore(derp_map(*regions), random_bytes=Counter(), enough_regions=10)
    first = Network(servers).run(core, now=0.0)
    assert first.full and first.preferred_derp == 2
    # A later check within five minutes: regions 2, 3, 4 (the fastest) with 2 as home.
    net = Network(servers)
    second = net.run(core, now=30.0)
    assert not second.full
    assert {dst[0] for _, dst in net.sent} == {"192.0.2.2", "192.0.2.3", "192.0.2.4"}
    assert second.preferred_derp == 2
    # Five minutes on, a full check again.
    net = Network(servers)
    assert net.run(core, now=400.0).full
    assert len({dst for _, dst in net.sent}) == 6


def test_incremental_check_tries_the_home_region_four_times() -> None:
    regions = [(r, [f"192.0.2.{r}"]) for r in range(1, 6)]
    core = NetcheckCore(derp_map(*regions), random_bytes=Counter(), enough_regions=10)
    previous = NetcheckReport(
        time=0.0,
        udp=True,
        ipv4=True,
        preferred_derp=5,
        region_latency={1: 0.01, 2: 0.02, 3: 0.03, 4: 0.04, 5: 0.05},
        region_v4_latency={1: 0.01},
    )
    net = Network({})  # nothing answers
    net.run(core, now=10.0, previous_report=previous, full=False)
    sent = [(round(t - 10, 3), dst[0]) for t, dst in net.sent]
    # The two fastest get two tries 120% of their latency apart, the third one, home four.
    assert [t for t, ip in sent if ip == "192.0.2.1"] == [0.0, 0.012]
    assert [t for t, ip in sent if ip == "192.0.2.3"] == [0.0]
    assert [t for t, ip in sent if ip == "192.0.2.5"] == [0.0, 0.06, 0.22, 0.33]
    assert "192.0.2.4" not in {ip for _, ip in sent}


def _report(latencies: dict[int, float], time: float = 100.0) -> NetcheckReport:
    return NetcheckReport(time=time, udp=True, region_latency=latencies)


@pytest.mark.parametrize(
    ("old", "new", "keep"),
    [
        (0.020, 0.015, True),  # 5 ms better: under the 10-ms threshold
        (0.030, 0.005, False),  # 25 ms better and well under two thirds
        (0.100, 0.080, True),  # 20 ms better, but not by a third
        (0.100, 0.060, False),  # 40 ms and 40% better
    ],
)
def test_preferred_region_hysteresis(old: float, new: float, keep: bool) -> None:
    assert preferred_region(_report({1: old, 2: new}), previous=1) == (1 if keep else 2)
    assert preferred_region(_report({1: old, 2: new})) == 2  # without a previous home: the fastest


def test_preferred_region_uses_recent_history_and_derp_activity() -> None:
    history = [_report({1: 0.010, 2: 0.050}, time=0.0)]
    # Region 1 was 10 ms a minute ago: its best recent latency still wins over region 2's 30 ms.
    assert preferred_region(_report({1: 0.040, 2: 0.030}, time=60.0), history) == 1
    # ...but not once that report is older than five minutes.
    assert preferred_region(_report({1: 0.040, 2: 0.030}, time=400.0), history) == 2
    # The old home did not answer STUN, but its DERP connection was heard just now: it stays.
    assert preferred_region(_report({2: 0.030}), previous=1, derp_activity={1: 99.0}, start=99.5) == 1
    assert preferred_region(_report({2: 0.030}), previous=1, derp_activity={1: 10.0}, start=99.5) == 2
    # No latency at all: a home heard within two keepalives stays, else none.
    assert preferred_region(_report({}), previous=1, derp_activity={1: 50.0}) == 1
    assert preferred_region(_report({}), previous=1, derp_activity={1: -100.0}) == 0


def test_core_keeps_its_home_across_checks() -> None:
    regions = derp_map((1, ["192.0.2.1"]), (2, ["192.0.2.2"]))
    core = NetcheckCore(regions, random_bytes=Counter())
    assert (
        Network({"192.0.2.1": always(0.020), "192.0.2.2": always(0.025)}).run(core, now=0.0).preferred_derp
        == 1
    )
    # Region 2 is now a little faster: not enough to move.
    assert (
        Network({"192.0.2.1": always(0.020), "192.0.2.2": always(0.015)}).run(core, now=400.0).preferred_derp
        == 1
    )
    # A fresh core told the previous report keeps it too.
    fresh = NetcheckCore(regions, random_bytes=Counter())
    previous = NetcheckReport(time=399.0, udp=True, preferred_derp=1, region_latency={1: 0.02, 2: 0.025})
    report = Network({"192.0.2.1": always(0.020), "192.0.2.2": always(0.015)}).run(
        fresh, now=400.0, previous_report=previous
    )
    assert report.preferred_derp == 1


def test_map_rules_for_targets() -> None:
    m = parse_derp_map(
        {
            "Regions": {
                "1": {
                    "RegionID": 1,
                    "Nodes": [
                        {
                            "Name": "a",
                            "RegionID": 1,
                            "HostName": "a.example",
                            "STUNPort": -1,
                            "IPv4": "192.0.2.1",
                        }
                    ],
                },
                "2": {
                    "RegionID": 2,
                    "Nodes": [{"Name": "b", "RegionID": 2, "HostName": "b.example", "STUNPort": 3479}],
                },
                "3": {
                    "RegionID": 3,
                    "Nodes": [
                        {
                            "Name": "c",
                            "RegionID": 3,
                            "HostName": "c.example",
                            "STUNTestIP": "127.0.0.9",
                            "IPv4": "192.0.2.3",
                        }
                    ],
                },
                "4": {
                    "RegionID": 4,
                    "NoMeasureNoHome": True,
                    "Nodes": [{"Name": "d", "RegionID": 4, "HostName": "d", "IPv4": "192.0.2.4"}],
                },
                "5": {
                    "RegionID": 5,
                    "Nodes": [
                        {"Name": "e", "RegionID": 5, "HostName": "e", "IPv4": "none", "IPv6": "2001:db8::5"}
                    ],
                },
            }
        }
    )
    # b has no address; a has STUN off, c a test IP, d is never measured, e pins both families.
    assert netcheck.hostnames_to_resolve(m) == ["b.example"]
    core = NetcheckCore(m, random_bytes=Counter(), ipv6=True)
    core.start(0.0, resolved={"b.example": ["::ffff:198.51.100.2", "2001:db8::2"]})
    targets = {dst for _, dst in core.datagrams_to_send()}
    assert targets == {
        ("198.51.100.2", 3479),
        ("2001:db8::2", 3479),
        ("127.0.0.9", 3478),
        ("2001:db8::5", 3478),
    }


def test_junk_and_strangers_are_dropped_and_counted() -> None:
    core = NetcheckCore(derp_map((1, ["192.0.2.1"])), random_bytes=Counter())
    assert not core.receive(b"junk", ("192.0.2.1", 3478), 0.0)  # not running
    core.start(0.0)
    [(request, dst)] = core.datagrams_to_send()
    stranger = stun.binding_response(bytes(12), PUBLIC)
    assert not core.receive(stranger, dst, 0.01)
    assert not core.receive(request, dst, 0.01)  # a request (our own, hairpinned) is no answer
    assert not core.receive(b"\x01\x00\x00\x00" + bytes(40), dst, 0.01)
    assert core.counters["drop_unknown_txid"] == 1 and core.counters["drop_wrong_type"] == 1
    answer = stun.binding_response(request[8:20], PUBLIC)
    assert core.receive(answer, dst, 0.01)
    assert not core.receive(answer, dst, 0.02)  # a duplicate
    assert not core.running


def test_empty_map_reports_at_once() -> None:
    core = NetcheckCore(DerpMap(), random_bytes=Counter())
    core.start(5.0)
    assert not core.running and core.report == NetcheckReport(time=5.0)
    assert core.report.to_json()["PreferredDERP"] == 0


def test_report_json_is_gos_shape() -> None:
    report = NetcheckReport(
        time=1.0,
        udp=True,
        ipv4=True,
        mapping_varies_by_dest_ip=False,
        preferred_derp=2,
        region_latency={2: 0.0123},
        region_v4_latency={2: 0.0123},
        global_v4=PUBLIC,
        global_v4_counters={PUBLIC: 2, ("203.0.113.5", 9): 2},
    )
    doc = report.to_json()
    assert doc["RegionLatency"] == {"2": 12_300_000} and doc["GlobalV4"] == "203.0.113.5:41641"
    assert doc["MappingVariesByDestIP"] is False and doc["GlobalV6"] == "" and doc["GlobalV6Counters"] is None
    assert report.endpoints() == [PUBLIC, ("203.0.113.5", 9)]


# -- properties ---------------------------------------------------------------------------------

behaviours = st.one_of(
    st.none(),
    st.tuples(st.floats(0.0, 2.0), st.sampled_from([PUBLIC, ("203.0.113.5", 7), ("198.51.100.1", 41641)])),
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.lists(behaviours, min_size=1, max_size=4), min_size=1, max_size=5),
    st.integers(1, 4),
    st.booleans(),
)
def test_any_network_ends_within_the_report_timeout(plan: list[list[Any]], enough: int, https: bool) -> None:
    """Whatever answers, losses and delays: the check ends by the report timeout, deadlines never
    go backwards, latencies are real round trips and the home region is one that answered."""
    regions = [(r + 1, [f"192.0.2.{r + 1}"]) for r in range(len(plan))]
    servers: dict[str, Server] = {}
    for r, answers in enumerate(plan):
        servers[f"192.0.2.{r + 1}"] = lambda n, answers=answers: answers[min(n, len(answers)) - 1]
    core = NetcheckCore(
        derp_map(*regions), random_bytes=Counter(), enough_regions=enough, https_fallback=https
    )
    report = Network(servers).run(core, now=0.0)
    assert report.time <= netcheck.REPORT_TIMEOUT + 1e-9
    # (An answer may still come in while the HTTPS phase runs, as in Go.)
    assert all(0 <= d <= netcheck.REPORT_TIMEOUT for d in report.region_latency.values())
    assert report.preferred_derp == 0 or report.preferred_derp in report.region_latency
    assert report.udp == bool(report.region_latency)


@settings(max_examples=200)
@given(st.binary(max_size=80), st.integers(0, 3))
def test_hostile_datagrams_never_raise(data: bytes, when: int) -> None:
    core = NetcheckCore(derp_map((1, ["192.0.2.1"])), random_bytes=Counter())
    core.start(0.0)
    [(request, dst)] = core.datagrams_to_send()
    # Some hostile datagrams carry our transaction ID, so they reach the address parsing.
    patched = data[:8] + request[8:20] + data[20:] if when % 2 and len(data) >= 20 else data
    core.receive(patched, dst, 0.01 * when)
    core.handle_timeout(10.0)
    assert not core.running
