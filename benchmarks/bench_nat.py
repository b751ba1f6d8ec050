"""Time to first byte and time to direct after a relayed start: embedmesh against tailscaled, same run.

    python benchmarks/bench_nat.py [--rounds K] [--kinds eim/eim-apdf,eim-apdf/double,...]

The NAT lab of the interop tests (``tests/interop/natlab.py``: network namespaces, nftables NATs,
nothing leaves the machine) with ``embedmesh control serve``, ``embedmesh derp serve`` and derper's
STUN on its internet. For each pair of NAT kinds, per round and interleaved so a noisy machine
hurts both alike, a pair of tailscaled v1.102.5 and a pair of embedmesh nodes (``embedmesh up``)
behind two NATs of those kinds: a TCP echo through A's SOCKS5 proxy (it starts on DERP, as
nothing is proven yet), then A's and B's status polled until both show a direct path. Every round
has NATs and nodes of its own, so each starts with nothing proven.

Printed: per pair and implementation the median time to first byte and to direct (the slower of
the two sides), and the ratio embedmesh/tailscaled. Needs root, nftables and conntrack, and the Go
peers (built on first use into ~/.cache/embedmesh-interop). Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "interop"), str(ROOT / "src"), str(ROOT)]

import gopeers  # noqa: E402
import natmatrix  # noqa: E402
from natlab import LabTailnet, NatLab  # noqa: E402
from tailnet import TailscaleBins  # noqa: E402

DEFAULT_PAIRS = "eim/eim,eim/eim-apdf,eim-apdf/double"


def _slowest(m: natmatrix.Measurement) -> float | None:
    if m.to_direct is None or m.to_direct_b is None:
        return None
    return max(m.to_direct, m.to_direct_b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kinds", default=DEFAULT_PAIRS, help="comma-separated A/B NAT kind pairs")
    args = parser.parse_args()
    pairs = [tuple(p.split("/")) for p in args.kinds.split(",")]
    bins = TailscaleBins(gopeers.tailscaled(), gopeers.tailscale_cli(), gopeers.derper())
    results: dict[tuple[str, str, str], list[natmatrix.Measurement]] = {}
    with NatLab() as lab:
        net = LabTailnet(lab, bins, derp="embedmesh")
        for round_no in range(args.rounds):
            # Fresh NATs and fresh nodes each round: every measurement starts from nothing proven.
            for impl in ("ts", "em"):
                nodes = {}
                for ka, kb in pairs:
                    for side, kind in (("a", ka), ("b", kb)):
                        name = f"{impl}{round_no}-{side}-{kind}"
                        if name not in nodes:
                            host = lab.host_behind(kind, name)
                            nodes[name] = net.tailscaled(host) if impl == "ts" else net.embedmesh(host)
                for node in nodes.values():
                    node.wait_up()
                    node.start_services()
                for ka, kb in pairs:
                    a, b = nodes[f"{impl}{round_no}-a-{ka}"], nodes[f"{impl}{round_no}-b-{kb}"]
                    m = natmatrix.measure(a, b, f"{ka} / {kb}", natmatrix.expected_path(ka, kb))
                    results.setdefault((ka, kb, impl), []).append(m)
                    slowest = _slowest(m)
                    print(
                        f"round {round_no + 1} {impl} {ka}/{kb}: first byte {m.ttfb * 1000:.0f} ms, direct "
                        + (f"{slowest * 1000:.0f} ms" if slowest is not None else m.got),
                        flush=True,
                    )
    print("\npair (A/B)            impl        first byte ms   to direct ms (slower side)   ratio em/ts")
    for ka, kb in pairs:
        row = {}
        for impl in ("ts", "em"):
            ms = results.get((ka, kb, impl), [])
            ttfb = statistics.median(m.ttfb for m in ms) * 1000 if ms else float("nan")
            directs = [d for m in ms if (d := _slowest(m)) is not None]
            direct = statistics.median(directs) * 1000 if directs else None
            row[impl] = direct
            label = "tailscaled" if impl == "ts" else "embedmesh"
            shown = f"{direct:.0f}" if direct is not None else "never (DERP)"
            print(f"{ka + '/' + kb:22}{label:12}{ttfb:>10.0f}      {shown:>14}")
        if row["ts"] and row["em"]:
            print(f"{'':22}{'ratio':12}{'':>10}      {row['em'] / row['ts']:>14.2f}")


if __name__ == "__main__":
    main()
