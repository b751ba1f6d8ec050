"""The NAT lab rig itself (tests/interop/natlab.py): each router kind maps and filters UDP as its
name says, conntrack flushes and kind changes take effect, and close() leaves nothing behind.

A reflector on the lab's internet (two server addresses) tells each host the address and port
its packets arrived from; a probe from one local port to three destinations shows the mapping
(the same external port every time, or a new one per destination), and a reply from an address
the host never sent to shows the filtering. These are the facts the shared lab's RESULTS.md host
table lists, measured again on this rig.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from natlab import KINDS, LabHost, NatLab, parse_conntrack, ruleset, skip_unless_natlab
from netns import wait_for

pytestmark = pytest.mark.interop

TOOLS = str(Path(__file__).resolve().parent / "natlab_tools.py")
S1, S2 = "203.0.113.1", "203.0.113.2"
TARGETS = [f"{S1}:3478", f"{S2}:3478", f"{S1}:3479"]


@pytest.fixture(scope="module")
def lab(_swept: None) -> Iterator[NatLab]:
    skip_unless_natlab()
    with NatLab() as lab:
        reflector = lab.inet.popen(
            [sys.executable, TOOLS, "reflect", *TARGETS, f"{S2}:3479"],
            log_name="reflect",
        )
        wait_for(lambda: "listening" in Path(reflector.log_path).read_text(), 10, 0.05, "the reflector")  # type: ignore[attr-defined]
        for kind in KINDS:
            lab.host_behind(kind, f"h-{kind}")
        yield lab


def probe(host: LabHost, port: int, other: bool = True) -> dict[str, object]:
    extra = ["--other", TARGETS[0]] if other else []
    out = host.run([sys.executable, TOOLS, "probe", "--port", str(port), *TARGETS, *extra])
    return json.loads(out.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("kind", "mapping", "filtering"),
    [
        ("none", "same", True),
        ("eim", "same", True),
        ("eim-apdf", "same", False),
        ("symmetric", "varies", False),
        ("double", "same", False),
    ],
)
def test_each_kind_maps_and_filters_as_named(lab: NatLab, kind: str, mapping: str, filtering: bool) -> None:
    host = lab.hosts[f"h-{kind}"]
    result = probe(host, 40000 + KINDS.index(kind))
    mapped = result["mapped"]
    assert isinstance(mapped, dict) and all(mapped.values()), result
    addresses = {str(v).rsplit(":", 1)[0] for v in mapped.values()}
    ports = {int(str(v).rsplit(":", 1)[1]) for v in mapped.values()}
    assert addresses == {host.public_ip}, result
    if mapping == "same":
        # endpoint-independent and port-preserving: the local port, whatever the destination
        assert ports == {40000 + KINDS.index(kind)}, result
    else:
        assert len(ports) == 3, result
    assert result["other"] is filtering, result


def test_udp_blocked_passes_only_tcp_to_80_and_443(lab: NatLab) -> None:
    host = lab.hosts["h-udp-blocked"]
    result = probe(host, 40100, other=False)
    assert result["mapped"] == dict.fromkeys(TARGETS), result
    server = lab.inet.popen([sys.executable, TOOLS, "echo", f"{S1}:443"], log_name="echo443")
    other = lab.inet.popen([sys.executable, TOOLS, "echo", f"{S1}:8443"], log_name="echo8443")
    try:
        wait_for(lambda: "listening" in Path(server.log_path).read_text(), 10, 0.05, "echo on 443")  # type: ignore[attr-defined]
        wait_for(lambda: "listening" in Path(other.log_path).read_text(), 10, 0.05, "echo on 8443")  # type: ignore[attr-defined]
        ok = host.run([sys.executable, TOOLS, "echo-client", f"{S1}:443", "--timeout", "5"])
        assert json.loads(ok.stdout)["echo"] == "natlab hello"
        refused = host.run(
            [sys.executable, TOOLS, "echo-client", f"{S1}:8443", "--timeout", "1"], check=False
        )
        assert refused.returncode != 0
    finally:
        server.terminate()
        other.terminate()


def test_conntrack_shows_the_mapping_and_flush_forgets_it(lab: NatLab) -> None:
    host = lab.hosts["h-eim-apdf"]
    router = host.router
    assert router is not None
    probe(host, 40200)
    flows = [e for e in router.conntrack() if e.original[1] == 40200]
    assert flows and flows[0].original[0] == host.ip and flows[0].reply[2] == router.wan_ip, flows
    router.flush_conntrack()
    assert not [e for e in router.conntrack() if e.original[1] == 40200]


def test_set_kind_changes_behaviour_in_place(lab: NatLab) -> None:
    host = lab.hosts["h-eim-apdf"]
    router = host.router
    assert router is not None
    try:
        router.set_kind("symmetric")
        ports = {int(str(v).rsplit(":", 1)[1]) for v in probe(host, 40300)["mapped"].values()}  # type: ignore[union-attr]
        assert len(ports) == 3
        router.set_kind("udp-blocked")
        assert probe(host, 40301, other=False)["mapped"] == dict.fromkeys(TARGETS)
    finally:
        router.set_kind("eim-apdf")
    ports = {int(str(v).rsplit(":", 1)[1]) for v in probe(host, 40302)["mapped"].values()}  # type: ignore[union-attr]
    assert ports == {40302}


def test_block_udp_with_one_address_leaves_the_rest(lab: NatLab) -> None:
    host = lab.hosts["h-eim-apdf"]
    router = host.router
    assert router is not None
    router.block_udp_with(S2)
    try:
        mapped = probe(host, 40500, other=False)["mapped"]
        assert isinstance(mapped, dict)
        assert mapped[f"{S2}:3478"] is None and mapped[f"{S1}:3478"] and mapped[f"{S1}:3479"], mapped
    finally:
        router.unblock_udp()
    mapped = probe(host, 40501, other=False)["mapped"]
    assert isinstance(mapped, dict) and all(mapped.values()), mapped


def test_udp_timeout_is_per_router(lab: NatLab) -> None:
    router = lab.hosts["h-eim"].router
    other = lab.hosts["h-symmetric"].router
    assert router is not None and other is not None
    before = other.udp_timeouts()
    router.set_udp_timeouts(2, 3)
    try:
        assert router.udp_timeouts() == (2, 3)
        assert other.udp_timeouts() == before
        host = lab.hosts["h-eim"]
        probe(host, 40400)
        assert [e for e in router.conntrack() if e.original[1] == 40400]
        # a one-shot exchange keeps the short timeout: gone after 2 s
        wait_for(
            lambda: not [e for e in router.conntrack() if e.original[1] == 40400],
            6,
            0.2,
            "the flow to time out",
        )
    finally:
        router.set_udp_timeouts(30, 120)


def test_ruleset_rejects_unknown_kinds_and_parse_conntrack_reads_lines() -> None:
    with pytest.raises(ValueError, match="unknown NAT kind"):
        ruleset("cone")
    assert "fully-random" in ruleset("symmetric") and "fully-random" not in ruleset("eim-apdf")
    line = (
        "udp      17 28 src=10.240.3.10 dst=203.0.113.1 sport=40200 dport=3478 "
        "src=203.0.113.1 dst=203.0.113.13 sport=3478 dport=40200 [ASSURED] mark=0 use=1"
    )
    (entry,) = parse_conntrack(
        line + "\nconntrack v1.4.7 (conntrack-tools): 1 flow entries have been shown.\n"
    )
    assert entry.timeout == 28 and entry.assured
    assert entry.original == ("10.240.3.10", 40200, "203.0.113.1", 3478)
    assert entry.reply == ("203.0.113.1", 3478, "203.0.113.13", 40200)


def test_close_removes_every_namespace_and_process() -> None:
    skip_unless_natlab()
    lab = NatLab()
    host = lab.host_behind("double", "d")
    sleeper = host.popen(["sleep", "300"])
    names = lab.namespace_names()
    assert len(names) == 4 and all(n.startswith(f"em-{lab.rig.run_id}-") for n in names)
    lab.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [n for n in names if n in listed]
    deadline = time.monotonic() + 5
    while sleeper.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sleeper.poll() is not None
