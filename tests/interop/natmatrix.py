"""The NAT matrix: which pairs of NAT kinds get a direct path, and how a pair is measured.

``expected_path`` is the matrix the shared lab measured with its prototype
(``/work/shared/natlab/RESULTS.md``):

* easy <-> easy (``none``, ``eim``, ``eim-apdf``, ``double``: every mapping endpoint-independent):
  direct;
* an easy side with endpoint-independent *filtering* (``none``, ``eim``) <-> ``symmetric``:
  direct, because the easy side answers the symmetric side's probe at the address it came from
  (a peer-reflexive candidate);
* an address-and-port-dependent easy side (``eim-apdf``, ``double``) <-> ``symmetric``, and
  ``symmetric`` <-> ``symmetric``: no direct path, DERP;
* ``udp-blocked`` <-> anything: DERP (over TCP, the only way out);
* two hosts behind one NAT (hairpin): direct, over their LAN addresses.

``measure`` runs one pair: a TCP echo through the first node's SOCKS5 proxy to the second
node's echo service (the time to first byte, which usually travels through DERP), then it
watches the first node's view of the path until it turns direct or the pair's time is up, with a
second echo after discovery's 5-s retry interval so a late hole punch still gets its chance.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from natlab import LabPeer, PeerPath

EASY = frozenset({"none", "eim", "eim-apdf", "double"})
ENDPOINT_INDEPENDENT_FILTERING = frozenset({"none", "eim"})


def expected_path(kind_a: str, kind_b: str) -> str:
    """ "direct" or "derp": what RESULTS.md says two hosts of these kinds get."""
    kinds = {kind_a, kind_b}
    if "udp-blocked" in kinds:
        return "derp"
    if kinds <= EASY:
        return "direct"
    if "symmetric" in kinds and (kinds - {"symmetric"}) & ENDPOINT_INDEPENDENT_FILTERING:
        return "direct"
    return "derp"


@dataclass
class Measurement:
    """One pair of the matrix, as measured."""

    pair: str
    expected: str
    got: str
    ttfb: float  # seconds from the first connect to the first echoed byte
    to_direct: float | None  # seconds from the first connect to A's direct path to B (None: never)
    to_direct_b: float | None  # the same for B's path to A
    path_a: PeerPath
    path_b: PeerPath

    def row(self) -> str:
        direct = " / ".join(
            f"{t * 1000:.0f}" if t is not None else "-" for t in (self.to_direct, self.to_direct_b)
        )
        where = self.path_a.address if self.got == "direct" else f'DERP "{self.path_a.address}"'
        ok = "yes" if self.got == self.expected else "**no**"
        return f"| {self.pair} | {self.expected} | {self.got} | {ok} | {self.ttfb * 1000:.0f} | {direct} | {where} |"


TABLE_HEADER = (
    "| pair (A / B) | expected | measured | match | time to first byte (ms) | time to direct A→B / B→A (ms) | A's path to B |\n"
    "|---|---|---|---|---|---|---|"
)


def measure(
    a: LabPeer,
    b: LabPeer,
    pair: str,
    expected: str,
    *,
    direct_timeout: float = 8.0,
    derp_watch: float = 6.5,
    retry_after: float = 5.2,
) -> Measurement:
    """Measure one pair (see the module doc). ``direct_timeout``: how long a pair expected to go
    direct may take; ``derp_watch``: how long a pair expected to stay on DERP is watched."""
    first = a.echo(b)
    t0 = float(first["started"])
    deadline = t0 + (direct_timeout if expected == "direct" else derp_watch)
    to_direct: float | None = None
    to_direct_b: float | None = None
    retried = False
    while True:
        now = time.time()
        if to_direct is None and a.path_to(b).kind == "direct":
            to_direct = now - t0
        if to_direct_b is None and b.path_to(a).kind == "direct":
            to_direct_b = now - t0
        if to_direct is not None and to_direct_b is not None:
            break
        if now >= deadline and (to_direct is None or now >= deadline + 3):
            break  # (once A is direct, B's view gets 3 s more to follow)
        if not retried and now - t0 >= retry_after:
            retried = True
            a.echo(b)
        time.sleep(0.05)
    if to_direct is None:
        a.echo(b)  # still connected, over the relay
    path_a, path_b = a.path_to(b), b.path_to(a)
    if path_a.kind == "direct" and path_b.kind == "direct":
        got = "direct"
    elif path_a.kind == "direct" or path_b.kind == "direct":
        got = "one-sided"
    elif path_a.kind == "derp" and path_b.kind == "derp":
        got = "derp"
    else:
        got = f"{path_a.kind}/{path_b.kind}"
    return Measurement(pair, expected, got, float(first["ttfb_s"]), to_direct, to_direct_b, path_a, path_b)


def measure_all(
    pairs: Sequence[tuple[LabPeer, LabPeer, str, str]], *, workers: int = 4
) -> list[Measurement | BaseException]:
    """:func:`measure` for every (a, b, pair, expected), ``workers`` at a time, never two at once
    on one node (a pair's timing must not include another pair's traffic on the same node, and
    a node's local API client is not shared between threads). Results in the order given; a pair
    that raised gives its exception."""
    results: list[Measurement | BaseException | None] = [None] * len(pairs)
    pending = list(range(len(pairs)))
    busy: set[int] = set()
    running: dict[concurrent.futures.Future[Measurement], int] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        while pending or running:
            for index in list(pending):
                if len(running) >= workers:
                    break
                a, b, name, expected = pairs[index]
                if id(a) in busy or id(b) in busy:
                    continue
                pending.remove(index)
                busy.update((id(a), id(b)))
                running[pool.submit(measure, a, b, name, expected)] = index
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                index = running.pop(future)
                a, b, _name, _expected = pairs[index]
                busy.difference_update((id(a), id(b)))
                error = future.exception()
                results[index] = error if error is not None else future.result()
    return [r for r in results if r is not None]


RESULTS_SECTION = "## NAT lab results"
#: Set to a Markdown file (docs/nat-traversal.md) to have the matrix tests write their tables
#: into its "NAT lab results" section; unset, they only print them.
DOC_ENV = "EMBEDMESH_NATLAB_DOC"


def table(measurements: list[Measurement]) -> str:
    return "\n".join([TABLE_HEADER, *(m.row() for m in measurements)])


def _merge_rows(old_block: str, new_table: str, key_columns: int) -> str:
    """new_table, plus the rows of the table in old_block whose key (the first key_columns
    cells) new_table lacks, in their old order: a partial run updates its rows and keeps the rest."""

    def rows(text: str) -> list[str]:
        return [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("|---")]

    def key(row: str) -> tuple[str, ...]:
        return tuple(c.strip() for c in row.strip("|").split("|")[:key_columns])

    new_rows = rows(new_table)
    header, fresh = new_rows[0], {key(r): r for r in new_rows[1:]}
    old_rows = [r for r in rows(old_block) if r != header]
    merged = [fresh.pop(key(r), r) for r in old_rows] + list(fresh.values())
    separator = next(ln for ln in new_table.splitlines() if ln.startswith("|---"))
    return "\n".join([header, separator, *merged])


def write_results(
    doc: Path, title: str, intro: str, measurements: list[Measurement] | str, *, key_columns: int = 1
) -> None:
    """Put ``### title`` (intro, then the table: of measurements, or given as Markdown) into the
    doc's "NAT lab results" section. An older subsection of that title is replaced, keeping the
    rows of its table that this run did not measure (rows match on their first key_columns
    cells); every other part of the file stays."""
    text = doc.read_text() if doc.exists() else "# NAT traversal\n"
    body = measurements if isinstance(measurements, str) else table(measurements)
    if RESULTS_SECTION not in text:
        block = f"### {title}\n\n{intro.strip()}\n\n{body}\n"
        text = text.rstrip("\n") + f"\n\n{RESULTS_SECTION}\n\n{RESULTS_INTRO}\n\n{block}"
        doc.write_text(text)
        return
    start = text.index(RESULTS_SECTION)
    after = text.find("\n## ", start + len(RESULTS_SECTION))
    section_end = len(text) if after < 0 else after + 1
    section = text[start:section_end]
    heading = f"### {title}\n"
    if heading in section:
        s = section.index(heading)
        nxt = section.find("\n### ", s + len(heading))
        e = len(section) if nxt < 0 else nxt + 1
        body = _merge_rows(section[s:e], body, key_columns)
        block = f"### {title}\n\n{intro.strip()}\n\n{body}\n"
        section = section[:s] + block + ("\n" if nxt >= 0 else "") + section[e:]
    else:
        block = f"### {title}\n\n{intro.strip()}\n\n{body}\n"
        section = section.rstrip("\n") + "\n\n" + block
    if after >= 0 and not section.endswith("\n\n"):
        section = section.rstrip("\n") + "\n\n"
    doc.write_text(text[:start] + section + text[section_end:])


RESULTS_INTRO = """\
Measured by the `tests/interop/test_natlab_*.py` tests in the NAT lab of `tests/interop/natlab.py`
(network namespaces, nftables NATs; control, DERP and STUN on the lab's "internet"). Expected
paths are the matrix the shared lab measured with its prototype (`natmatrix.expected_path`).
Time to first byte: from the first TCP connect through A's SOCKS5 proxy to the first byte of
B's echo (the connection starts on DERP whenever there is no proven direct path yet). Time to
direct: from that same connect until A's (then B's) status shows a direct path. Numbers are from
one run on a 2-core VM: read them as orders of magnitude. Regenerate with
`EMBEDMESH_NATLAB_DOC=docs/nat-traversal.md` set (a partial run updates only its own rows).

Reading them: every pair goes direct exactly where the prototype found a direct path, through
DERP everywhere else, for tailscaled and embedmesh nodes alike. A time to direct of about 5.4 s
on one side only (the other side ~0.15 s) shows up when B's router filters by address and port
and a tailscaled takes part: A's first ping to B's public endpoint is dropped by B's NAT, B
(told by a CallMeMaybe over DERP) pings A and is direct at once, and A pings B's endpoint again
only after the 5-s discovery interval (magicsock's `discoPingInterval`). The bytes travel over
DERP meanwhile. Pairs of two embedmesh nodes showed no such wait."""
