"""embedmesh's userspace TCP against the Linux kernel's, through a TUN device.

The stack runs in this process on a TUN device (``stackhost.StackHost``); the device's kernel side
lives in a rig namespace, where curl and socat are the peers. Every transfer is checked byte for
byte with SHA-256, over IPv4 and IPv6, on a clean path and on one with netem's loss, delay, jitter
and reordering. Each test records the overlay to a pcap; on failure the test prints tshark's
expert summary of it and keeps the file (see docs/interop.md).
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from typing import Any

import anyio
import pytest
from netns import Namespace, NetnsRig, VethLink
from stackhost import (
    HTTP_PORT,
    KERNEL_V4,
    KERNEL_V6,
    MB,
    STACK_V4,
    STACK_V6,
    StackHost,
    blob,
    curl_get,
    curl_put,
    explain_failure,
    overlay_pcap_path,
    serve_http_forever,
    socat_download,
    socat_upload,
)

from embedmesh.pcap import PcapLink, PcapWriter
from embedmesh.wire.ip import PROTO_TCP, parse_ip
from embedmesh.wire.tcp import parse_tcp

ADDRESSES = {4: (STACK_V4, KERNEL_V4), 6: (STACK_V6, KERNEL_V6)}


@pytest.mark.parametrize("version", [4, 6])
def test_curl_downloads_and_uploads_through_tun(rig: NetnsRig, version: int) -> None:
    """The kernel's curl GETs 8 MiB from and PUTs/POSTs 8 MiB to an HTTP server on embedmesh."""
    stack_ip, _ = ADDRESSES[version]
    ns = rig.add_namespace("kernel")
    upload = rig.tmpdir / "upload.bin"
    upload.write_bytes(blob(8 * MB, 2))
    label = f"TUN IPv{version}"
    with StackHost(rig, ns, pcap_name=f"tun-curl-v{version}", snaplen=128) as host:
        assert host.pcap_path is not None

        async def main() -> None:
            async with host.running(), anyio.create_task_group() as tg:
                listener = await host.listen("tcp", f":{HTTP_PORT}")
                tg.start_soon(serve_http_forever, listener, tg)
                await curl_get(ns, stack_ip, 1000, 1, rig.tmpdir / "small.bin", label)
                await curl_get(ns, stack_ip, 8 * MB, 7, rig.tmpdir / "download.bin", label)
                await curl_put(ns, stack_ip, upload, "PUT", label)
                await curl_put(ns, stack_ip, upload, "POST", label)
                tg.cancel_scope.cancel()

        with explain_failure(host.pcap_path):
            anyio.run(main)


@pytest.mark.parametrize("version", [4, 6])
def test_embedmesh_dials_socat_through_tun(rig: NetnsRig, version: int) -> None:
    """embedmesh dials socat in the namespace: 8 MiB up (socat writes a file), 8 MiB down."""
    _, kernel_ip = ADDRESSES[version]
    ns = rig.add_namespace("kernel")
    source = rig.tmpdir / "source.bin"
    source.write_bytes(blob(8 * MB, 3))
    label = f"TUN IPv{version}"
    with StackHost(rig, ns, pcap_name=f"tun-socat-v{version}", snaplen=128) as host:
        assert host.pcap_path is not None

        async def main() -> None:
            async with host.running():
                data = blob(8 * MB, 4)
                await socat_upload(host, ns, kernel_ip, version, 9000, data, rig.tmpdir / "got.bin", label)
                await socat_download(host, ns, kernel_ip, version, 9001, source, label)

        with explain_failure(host.pcap_path):
            anyio.run(main)


# --------------------------------------------------------------------------------------------------
# an impaired path: the kernel peer sits one routed hop away, behind a veth with netem on both ends

IMPAIRMENT = "delay 20ms 5ms loss 5% reorder 10%"
CLIENT_V4, ROUTER_V4 = "100.64.2.2", "100.64.2.1"
CLIENT_V6, ROUTER_V6 = "fd7a:115c:a1e0:2::2", "fd7a:115c:a1e0:2::1"


def impaired_topology(rig: NetnsRig) -> tuple[Namespace, Namespace, VethLink]:
    """Namespace "router" holds the TUN device's kernel side and forwards; namespace "client" (curl,
    socat) reaches it over a veth whose both ends netem impairs. The rig's netem emulation works on
    egress, so a veth between two namespaces impairs both directions of every flow."""
    router = rig.add_namespace("router")
    client = rig.add_namespace("client")
    link = rig.veth_between(router, client)
    router.ip("addr", "add", f"{ROUTER_V4}/24", "dev", link.a.ifname)
    router.ip("-6", "addr", "add", f"{ROUTER_V6}/64", "dev", link.a.ifname, "nodad")
    client.ip("addr", "add", f"{CLIENT_V4}/24", "dev", link.b.ifname)
    client.ip("-6", "addr", "add", f"{CLIENT_V6}/64", "dev", link.b.ifname, "nodad")
    client.ip("route", "add", "100.64.1.0/24", "via", ROUTER_V4, "src", CLIENT_V4)
    client.ip("-6", "route", "add", "fd7a:115c:a1e0:1::/64", "via", ROUTER_V6, "src", CLIENT_V6)
    router.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])
    rig.netem(router, link.a.ifname, IMPAIRMENT, seed=11)
    rig.netem(client, link.b.ifname, IMPAIRMENT, seed=12)
    assert rig.netem_active(router, link.a.ifname) and rig.netem_active(client, link.b.ifname)
    return router, client, link


@pytest.mark.parametrize("version", [4, 6])
def test_transfers_through_tun_and_an_impaired_path(rig: NetnsRig, version: int) -> None:
    """Four transfers at once (curl GET and PUT to embedmesh, embedmesh to and from socat), 1 MiB
    each, through 5% loss, 20±5 ms delay and 10% reordering in both directions: byte-exact."""
    router, client, link = impaired_topology(rig)
    stack_ip = STACK_V4 if version == 4 else STACK_V6
    client_ip = CLIENT_V4 if version == 4 else CLIENT_V6
    size = 1 * MB
    upload = rig.tmpdir / "upload.bin"
    upload.write_bytes(blob(size, 5))
    source = rig.tmpdir / "source.bin"
    source.write_bytes(blob(size, 6))
    label = f"TUN IPv{version} impaired"
    with StackHost(rig, router, pcap_name=f"tun-impaired-v{version}") as host:
        assert host.pcap_path is not None

        async def main() -> None:
            async with host.running(), anyio.create_task_group() as tg:
                listener = await host.listen("tcp", f":{HTTP_PORT}")
                tg.start_soon(serve_http_forever, listener, tg)
                started = time.monotonic()
                with anyio.fail_after(40):
                    async with anyio.create_task_group() as transfers:
                        transfers.start_soon(
                            curl_get, client, stack_ip, size, 8, rig.tmpdir / "download.bin", label
                        )
                        transfers.start_soon(curl_put, client, stack_ip, upload, "PUT", label)
                        transfers.start_soon(
                            socat_upload,
                            host,
                            client,
                            client_ip,
                            version,
                            9000,
                            blob(size, 9),
                            rig.tmpdir / "got.bin",
                            label,
                        )
                        transfers.start_soon(
                            socat_download, host, client, client_ip, version, 9001, source, label
                        )
                print(f"{label}: four 1 MiB transfers in {time.monotonic() - started:.1f} s")
                print(f"{label}: stack counters {host.counters()}")
                tg.cancel_scope.cancel()

        with explain_failure(host.pcap_path):
            anyio.run(main)
    rig.clear_netem(router, link.a.ifname)
    rig.clear_netem(client, link.b.ifname)
    for ns, ifname in ((router, link.a.ifname), (client, link.b.ifname)):
        stats = rig.netem_stats(ns, ifname)
        print(f"{label}: netem on {ifname}: {stats}")
        assert stats is None or stats["dropped"] > 0  # None: the kernel's netem, no counters


# --------------------------------------------------------------------------------------------------
# loss recovery against the kernel's receiver, with losses and delays we script ourselves


class ScriptedPath:
    """A Link wrapper between the stack and the TUN device that drops and delays chosen data
    segments of one connection (the stack's sends only), and counts every transmission.

    The script, in the order the sender meets it:
    1. the first data segment at or beyond ``drop_at`` bytes is dropped: the kernel SACKs what
       follows, the sender enters fast recovery with RecoveryPoint = everything sent so far (R1);
    2. its retransmission is held ``hold_first`` seconds, and so is the first new segment sent
       after it (beginning at R1): when they arrive, the first ACK covers R1 (recovery ends) and
       the second advances again while SACK blocks are still above the next hole;
    3. the ``burst`` new segments after that one are dropped, and their retransmissions (sent in
       the same recovery, once the kernel SACKs what follows them) are held ``hold_burst``
       seconds, less than the RTO: they are late, never lost.
    No retransmission is lost, so a correct sender transmits each segment at most twice.
    """

    def __init__(
        self,
        inner: Any,
        port: int,
        *,
        drop_at: int = 40_000,
        burst: int = 10,
        hold_first: float = 0.03,
        hold_burst: float = 0.15,
    ) -> None:
        self.inner = inner
        self.port = port
        self.drop_at, self.burst = drop_at, burst
        self.hold_first, self.hold_burst = hold_first, hold_burst
        self.isn: int | None = None
        self.highest_end = 0
        self.sent: Counter[int] = Counter()  # relative sequence number -> transmissions
        self.dropped: list[int] = []
        self.held: list[tuple[float, int, bytes]] = []
        self.first_loss: int | None = None
        self.recovery_point: int | None = None
        self.burst_segments: list[int] = []
        self._order = 0

    def _hold(self, packet: bytes, delay: float) -> None:
        self._order += 1
        heapq.heappush(self.held, (time.monotonic() + delay, self._order, packet))

    def send(self, packet: bytes) -> None:
        ip = parse_ip(packet)
        if ip.protocol != PROTO_TCP:
            self.inner.send(packet)
            return
        seg = parse_tcp(ip.payload, ip.src, ip.dst, verify_checksum=False)
        if seg.dst_port != self.port:
            self.inner.send(packet)
            return
        if seg.flags & 0x02:  # SYN
            self.isn = seg.seq
        if self.isn is None or not len(seg.payload):
            self.inner.send(packet)
            return
        rel = (seg.seq - self.isn - 1) & 0xFFFFFFFF
        self.sent[rel] += 1
        count = self.sent[rel]
        self.highest_end = max(self.highest_end, rel + len(seg.payload))
        if self.first_loss is None and rel >= self.drop_at:
            self.first_loss = rel
            self.dropped.append(rel)
            return
        if rel == self.first_loss and count == 2:
            self.recovery_point = self.highest_end  # SND.MAX when fast recovery began
            self._hold(packet, self.hold_first)
            return
        if self.recovery_point is not None and count == 1 and rel >= self.recovery_point:
            if rel == self.recovery_point:
                self._hold(packet, self.hold_first + 0.001)
                return
            if len(self.burst_segments) < self.burst:
                self.burst_segments.append(rel)
                self.dropped.append(rel)
                return
        if rel in self.burst_segments and count == 2:
            self._hold(packet, self.hold_burst)
            return
        self.inner.send(packet)

    def next_deadline(self) -> float | None:
        inner = self.inner.next_deadline()
        mine = self.held[0][0] if self.held else None
        if inner is None or mine is None:
            return inner if mine is None else mine
        return min(inner, mine)

    def handle_timeout(self, now: float) -> None:
        while self.held and self.held[0][0] <= time.monotonic():
            self.inner.send(heapq.heappop(self.held)[2])
        self.inner.handle_timeout(now)

    def readables(self) -> list[Any]:
        return self.inner.readables()  # type: ignore[no-any-return]

    def read(self, readable: Any, deliver: Any, now: float) -> None:
        self.inner.read(readable, deliver, now)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()


def test_back_to_back_recoveries_do_not_retransmit_twice(rig: NetnsRig) -> None:
    """embedmesh sends 1 MiB to the kernel's socat; we drop and delay segments (ScriptedPath) so
    that a second recovery starts while the first one's retransmissions are still in flight. It
    must not send them a third time (found here against wireguard-go as bursts of ~80 spurious
    retransmissions and D-SACKs; fixed in the TCP core by keeping HighRxt across episodes)."""
    ns = rig.add_namespace("kernel")
    data = blob(1 * MB, 12)
    with StackHost(rig, ns, pcap_name=None) as host:
        pcap = overlay_pcap_path(rig, "tun-back-to-back-recovery")
        path = ScriptedPath(host.tun, 9000)
        # Captured above the script: the pcap shows what the stack sent, dropped segments included.
        host.link = PcapLink(path, PcapWriter(pcap))

        async def main() -> None:
            async with host.running():
                with anyio.fail_after(30):
                    await socat_upload(host, ns, KERNEL_V4, 4, 9000, data, rig.tmpdir / "got.bin", "scripted")

        with explain_failure(pcap):
            anyio.run(main)
    # The script ran as planned (otherwise the test proves nothing):
    assert path.first_loss is not None and path.recovery_point is not None, "no fast recovery"
    assert len(path.burst_segments) == path.burst, path.burst_segments
    assert all(path.sent[rel] >= 2 for rel in path.burst_segments), "burst not retransmitted"
    over = {rel: n for rel, n in sorted(path.sent.items()) if n > 2}
    print(
        f"first loss at {path.first_loss}, RecoveryPoint {path.recovery_point}, burst {path.burst_segments}"
    )
    print(f"segments sent more than twice (relative seq: transmissions): {over}")
    assert not over, f"{len(over)} segments were sent 3+ times though no retransmission was lost"
