"""Issue 10, "The NAT lab, with real peers": every pair of NAT kinds connects, directly exactly where
the shared lab's measurements say a direct path exists, through DERP elsewhere.

One lab for the module (tests/interop/natlab.py): `embedmesh control serve` on the lab's internet
with a DERP region (embedmesh's `derp serve`, plain HTTP on port 443, clients with
TS_DEBUG_USE_DERP_HTTP=1) and derper's STUN; hosts ``a-<kind>`` and ``b-<kind>`` behind a NAT of
each kind, ``c-<kind>`` beside ``a-<kind>`` behind the same NAT (hairpin). Each host runs
tailscaled (v1.102.5, userspace networking) and, for the embedmesh cases, `embedmesh up`; both
serve a TCP echo on port 7000 and a sink on 7001 of the host's loopback to the tailnet.

The pairs of one combination run four at a time, never two at once on one node
(natmatrix.measure_all), with short timeouts; the time to first byte and time to direct of each
pair are printed, and written into docs/nat-traversal.md when EMBEDMESH_NATLAB_DOC names it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import natmatrix
import pytest
from natlab import KINDS, LabEmbedmesh, LabHost, LabTailnet, LabTailscaled, NatLab, skip_unless_natlab
from natmatrix import Measurement, expected_path, measure, measure_all

pytestmark = pytest.mark.interop

PAIRS = [(ka, kb) for i, ka in enumerate(KINDS) for kb in KINDS[i:]]
HAIRPIN_KINDS = ("eim-apdf", "symmetric")

RESULTS: dict[str, list[Measurement]] = {}


class Lab:
    """The module's lab: the NAT lab, its tailnet, and the nodes on each host (made on demand)."""

    def __init__(self, lab: NatLab, net: LabTailnet) -> None:
        self.lab = lab
        self.net = net
        self.tailscaled: dict[str, LabTailscaled] = {}
        self.embedmesh: dict[str, LabEmbedmesh] = {}

    def host(self, name: str) -> LabHost:
        return self.lab.hosts[name]

    def start_embedmesh(self) -> None:
        if self.embedmesh:
            return
        for name, host in self.lab.hosts.items():
            self.embedmesh[name] = self.net.embedmesh(host)
        for node in self.embedmesh.values():
            node.wait_up()
            node.start_services()

    def logs(self, *names: str) -> str:
        """The servers' logs and those of the nodes on the named hosts."""
        parts = [self.net.logs()]
        for name in names:
            for nodes in (self.tailscaled, self.embedmesh):
                node = nodes.get(name)
                if isinstance(node, LabTailscaled):
                    parts.append(
                        f"----- tailscaled {name} -----\n" + "\n".join(node.ts.log().splitlines()[-60:])
                    )
                elif isinstance(node, LabEmbedmesh):
                    parts.append(f"----- embedmesh {name} -----\n" + "\n".join(node.log().splitlines()[-60:]))
        return "\n".join(parts)


@pytest.fixture(scope="module")
def natnet(tailscale_bins: Any, _swept: None) -> Iterator[Lab]:
    skip_unless_natlab()
    with NatLab() as lab:
        net = LabTailnet(lab, tailscale_bins, derp="embedmesh")
        for kind in KINDS:
            lab.host_behind(kind, f"a-{kind}")
            lab.host_behind(kind, f"b-{kind}")
        for kind in HAIRPIN_KINDS:
            lab.add_host(f"c-{kind}", lab.routers[f"a-{kind}-r"], kind)
        state = Lab(lab, net)
        for name, host in lab.hosts.items():
            state.tailscaled[name] = net.tailscaled(host)
        for node in state.tailscaled.values():
            node.wait_up()
            node.start_services()
        try:
            yield state
        finally:
            for node in [*state.tailscaled.values(), *state.embedmesh.values()]:
                node.close()
            report()


def report() -> None:
    doc = os.environ.get(natmatrix.DOC_ENV)
    for title, measurements in RESULTS.items():
        print(f"\n{title}\n{natmatrix.table(measurements)}")
        if doc and measurements:
            natmatrix.write_results(Path(doc), title, INTROS.get(title, ""), measurements)


TITLE_TS = "tailscaled ↔ tailscaled (DERP: embedmesh derp serve)"
INTROS = {
    TITLE_TS: "tailscaled v1.102.5 on both sides, userspace networking, joined to `embedmesh control "
    "serve`; the relay is `embedmesh derp serve` on 203.0.113.1:443 (plain HTTP, clients with "
    "TS_DEBUG_USE_DERP_HTTP=1) with its STUN server on :3478, and derper's STUN on 203.0.113.2:3478 "
    "is the region's second STUN address.",
}


def _record(title: str, m: Measurement, natnet: Lab | None = None, *hosts: str) -> None:
    RESULTS.setdefault(title, []).append(m)
    if m.ttfb > 2 and natnet is not None:
        # a first byte that took a retransmission or more: show what the nodes were doing
        print(f"slow first byte ({m.ttfb:.1f} s) in {m.pair}:\n{natnet.logs(*hosts)}")
    direct = [f"{t * 1000:.0f} ms" if t is not None else "never" for t in (m.to_direct, m.to_direct_b)]
    print(
        f"{m.pair}: expected {m.expected}, got {m.got}; time to first byte {m.ttfb * 1000:.0f} ms, "
        f"to direct {direct[0]} (B->A {direct[1]}); A->B {m.path_a}, B->A {m.path_b}"
    )


def _check_over_tcp(natnet: Lab, host_name: str) -> None:
    """Behind "udp-blocked": no UDP flow through the router, and a TCP connection to the relay."""
    router = natnet.host(host_name).router
    assert router is not None
    # (tailscaled's port-mapping probes to the router itself, UPnP and NAT-PMP, are not forwarded)
    forwarded = [e for e in router.conntrack("udp") if e.original[2] != router.lan_ip]
    assert forwarded == [], forwarded
    tcp = [e.original for e in router.conntrack("tcp")]
    assert any(dport == 443 for _src, _sport, _dst, dport in tcp), tcp


def _matrix(natnet: Lab, title: str, side_a: dict[str, Any], side_b: dict[str, Any]) -> None:
    """Every pair of NAT kinds, A on ``side_a``'s node behind kind_a and B on ``side_b``'s behind
    kind_b: each connects, and goes direct exactly where the lab's matrix says."""
    pairs = [
        (side_a[f"a-{ka}"], side_b[f"b-{kb}"], f"{ka} / {kb}", expected_path(ka, kb)) for ka, kb in PAIRS
    ]
    failures = []
    for (a, b, name, expected), (ka, kb), m in zip(pairs, PAIRS, measure_all(pairs), strict=True):
        host_a, host_b = a.host.name, b.host.name
        if isinstance(m, BaseException):
            failures.append(f"{name}: {m!r}\n{natnet.logs(host_a, host_b)}")
            continue
        _record(title, m, natnet, host_a, host_b)
        if m.got != expected:
            failures.append(f"{name}: expected {expected}, got {m.got}\n{natnet.logs(host_a, host_b)}")
        elif "udp-blocked" in (ka, kb):
            try:
                _check_over_tcp(natnet, host_a if ka == "udp-blocked" else host_b)
            except AssertionError as exc:
                failures.append(f"{name}: behind udp-blocked: {exc}")
    assert not failures, "\n\n".join(failures)


def test_tailscaled_pairs(natnet: Lab) -> None:
    _matrix(natnet, TITLE_TS, natnet.tailscaled, natnet.tailscaled)


@pytest.mark.parametrize("kind", HAIRPIN_KINDS)
def test_tailscaled_hairpin(natnet: Lab, kind: str) -> None:
    a, c = natnet.tailscaled[f"a-{kind}"], natnet.tailscaled[f"c-{kind}"]
    m = measure(a, c, f"hairpin {kind} (LAN)", "direct")
    _record(TITLE_TS, m)
    assert m.got == "direct", natnet.logs(a.name, c.name)
    # over the LAN: the two hosts' own addresses, not the NAT's
    assert m.path_a.address.startswith(c.host.ip + ":"), m


# ------------------------------------------------------------------------------------------------
# embedmesh nodes in the same matrix

TITLE_EM_TS = "embedmesh ↔ tailscaled (DERP: embedmesh derp serve)"
TITLE_EM_EM = "embedmesh ↔ embedmesh (DERP: embedmesh derp serve)"
INTROS[TITLE_EM_TS] = (
    "A is an embedmesh node (`embedmesh up`, SOCKS5 proxy, echo and sink served with `--serve`), "
    "B tailscaled v1.102.5; both in the lab's tailnet."
)
INTROS[TITLE_EM_EM] = "Both sides are embedmesh nodes (`embedmesh up`)."


def test_embedmesh_tailscaled_pairs(natnet: Lab) -> None:
    natnet.start_embedmesh()
    _matrix(natnet, TITLE_EM_TS, natnet.embedmesh, natnet.tailscaled)


def test_embedmesh_pairs(natnet: Lab) -> None:
    natnet.start_embedmesh()
    _matrix(natnet, TITLE_EM_EM, natnet.embedmesh, natnet.embedmesh)


@pytest.mark.parametrize("kind", HAIRPIN_KINDS)
@pytest.mark.parametrize("peer", ["tailscaled", "embedmesh"])
def test_embedmesh_hairpin(natnet: Lab, kind: str, peer: str) -> None:
    natnet.start_embedmesh()
    a = natnet.embedmesh[f"a-{kind}"]
    c = natnet.tailscaled[f"c-{kind}"] if peer == "tailscaled" else natnet.embedmesh[f"c-{kind}"]
    m = measure(a, c, f"hairpin {kind} (LAN)", "direct")
    _record(TITLE_EM_TS if peer == "tailscaled" else TITLE_EM_EM, m)
    assert m.got == "direct", natnet.logs(a.host.name, c.host.name)
    assert m.path_a.address.startswith(c.host.ip + ":"), m
