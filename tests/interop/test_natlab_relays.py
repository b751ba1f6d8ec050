"""The NAT lab with the other relays: Tailscale's derper, and the relay embedded in `embedmesh control
serve` (region 999, with its own STUN server). The matrix (test_natlab_matrix.py) runs on
`embedmesh derp serve`; here a few pairs of every combination of tailscaled and embedmesh nodes
prove that each relay carries them where no direct path exists (a host behind "udp-blocked": DERP
over TCP 443 or 80) and that STUN from each relay's side lets two home-router hosts go direct.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import natmatrix
import pytest
from natlab import DERP_REGION_CODE, LabPeer, LabTailnet, NatLab, skip_unless_natlab
from natmatrix import Measurement, measure

pytestmark = pytest.mark.interop

#: (relay, the region code nodes show for it)
RELAYS = [("derper", DERP_REGION_CODE), ("embedded", "embedmesh")]
COMBOS = [
    ("tailscaled", "tailscaled"),
    ("embedmesh", "embedmesh"),
    ("embedmesh", "tailscaled"),
    ("tailscaled", "embedmesh"),
]
RESULTS: dict[str, list[Measurement]] = {}


class RelayLab:
    def __init__(self, lab: NatLab, net: LabTailnet) -> None:
        self.lab, self.net = lab, net
        self.nodes: dict[tuple[str, str], LabPeer] = {}
        for kind, name in (("udp-blocked", "a"), ("eim-apdf", "b"), ("eim-apdf", "c")):
            host = lab.host_behind(kind, name)
            self.nodes[("tailscaled", name)] = net.tailscaled(host)
            self.nodes[("embedmesh", name)] = net.embedmesh(host)
        for node in self.nodes.values():
            node.wait_up()  # type: ignore[attr-defined]
            node.start_services()


@pytest.fixture(scope="module", params=RELAYS, ids=[r for r, _ in RELAYS])
def relaylab(
    request: pytest.FixtureRequest, tailscale_bins: Any, _swept: None
) -> Iterator[tuple[RelayLab, str, str]]:
    skip_unless_natlab()
    relay, code = request.param
    with NatLab() as lab:
        state = RelayLab(lab, LabTailnet(lab, tailscale_bins, derp=relay))
        try:
            yield state, relay, code
        finally:
            for node in state.nodes.values():
                node.close()  # type: ignore[attr-defined]
            doc = os.environ.get(natmatrix.DOC_ENV)
            title = f"Other relays: {relay}"
            if title in RESULTS:
                print(f"\n{title}\n{natmatrix.table(RESULTS[title])}")
                if doc:
                    natmatrix.write_results(Path(doc), title, INTROS[relay], RESULTS[title])


INTROS = {
    "derper": "`tests/interop/test_natlab_relays.py`: the lab's region is Tailscale's derper v1.102.5 "
    "(DERP on 203.0.113.2:80, STUN on :3478). Host kinds: A `udp-blocked` or `eim-apdf`, B `eim-apdf`.",
    "embedded": "`tests/interop/test_natlab_relays.py`: the relay and STUN server embedded in "
    "`embedmesh control serve` (region 999, `--derp-port 443`, clients verified by the control "
    "server). Host kinds: A `udp-blocked` or `eim-apdf`, B `eim-apdf`.",
}


@pytest.mark.parametrize(("impl_a", "impl_b"), COMBOS, ids=[f"{a}-{b}" for a, b in COMBOS])
def test_relay_carries_pairs_that_cannot_punch(
    relaylab: tuple[RelayLab, str, str], impl_a: str, impl_b: str
) -> None:
    state, relay, code = relaylab
    a, b = state.nodes[(impl_a, "a")], state.nodes[(impl_b, "b")]
    m = measure(a, b, f"{impl_a} udp-blocked / {impl_b} eim-apdf", "derp", derp_watch=1.0)
    RESULTS.setdefault(f"Other relays: {relay}", []).append(m)
    print(m.row())
    assert m.got == "derp" and m.path_a.address == code and m.path_b.address == code, m
    router = a.host.router
    assert router is not None
    tcp = [e.original for e in router.conntrack("tcp")]
    port = 80 if relay == "derper" else 443
    assert any(dport == port for _s, _sp, _d, dport in tcp), tcp


@pytest.mark.parametrize(("impl_a", "impl_b"), COMBOS[:3], ids=[f"{a}-{b}" for a, b in COMBOS[:3]])
def test_stun_beside_the_relay_lets_home_routers_go_direct(
    relaylab: tuple[RelayLab, str, str], impl_a: str, impl_b: str
) -> None:
    state, relay, _code = relaylab
    a, b = state.nodes[(impl_a, "b")], state.nodes[(impl_b, "c")]
    m = measure(a, b, f"{impl_a} eim-apdf / {impl_b} eim-apdf", "direct")
    RESULTS.setdefault(f"Other relays: {relay}", []).append(m)
    print(m.row())
    assert m.got == "direct", m
