"""embedmesh's TCP against the Linux kernel's through stock WireGuard.

An embedmesh ``Node`` runs in this process (root namespace, bound to the root end of a veth);
wireguard-go runs in a namespace, and behind its TUN device the kernel's TCP talks to the node:
curl downloads from and uploads to an HTTP server on ``node.listen("tcp", ":8080")``, and
``node.dial`` reaches socat servers. Every transfer is checked with SHA-256, on a clean link and
with netem's loss, delay, jitter and reordering on both ends of the veth. The node's overlay (the
packets inside WireGuard, in clear) is recorded to a pcap, explained by tshark on failure.
"""

from __future__ import annotations

import time

import anyio
import pytest
from netns import NetnsRig
from stackhost import (
    HTTP_PORT,
    MB,
    NODE_V4,
    NODE_V6,
    PEER_V4,
    PEER_V6,
    blob,
    capture_node,
    curl_get,
    curl_put,
    explain_failure,
    overlay_pcap_path,
    serve_http_forever,
    socat_download,
    socat_upload,
    wireguard_peer,
)

from embedmesh import Node
from embedmesh.pcap import PcapWriter

IMPAIRMENT = "delay 20ms 5ms loss 5% reorder 10%"


def test_curl_through_wireguard_go(wg_rig: NetnsRig) -> None:
    """curl behind wireguard-go GETs 8 MiB from and PUTs 8 MiB to embedmesh (IPv4), and GETs and
    POSTs 2 MiB over IPv6."""
    config, ns, link = wireguard_peer(wg_rig)
    upload = wg_rig.tmpdir / "upload.bin"
    upload.write_bytes(blob(8 * MB, 2))
    small_upload = wg_rig.tmpdir / "upload6.bin"
    small_upload.write_bytes(blob(2 * MB, 3))
    pcap = overlay_pcap_path(wg_rig, "wireguard-curl")
    label = "wireguard-go"

    async def main() -> None:
        node = Node(wireguard_config=config, listen_host=link.a.ip)
        capture_node(node, PcapWriter(pcap, snaplen=128))
        async with node, anyio.create_task_group() as tg:
            listener = await node.listen("tcp", f":{HTTP_PORT}")
            tg.start_soon(serve_http_forever, listener, tg)
            await curl_get(ns, NODE_V4, 8 * MB, 7, wg_rig.tmpdir / "download.bin", f"{label} IPv4")
            await curl_put(ns, NODE_V4, upload, "PUT", f"{label} IPv4")
            await curl_get(ns, NODE_V6, 2 * MB, 8, wg_rig.tmpdir / "download6.bin", f"{label} IPv6")
            await curl_put(ns, NODE_V6, small_upload, "POST", f"{label} IPv6")
            print(f"{label}: node counters {node.status().counters}")
            tg.cancel_scope.cancel()

    with explain_failure(pcap):
        anyio.run(main)


@pytest.mark.parametrize(("version", "size"), [(4, 8 * MB), (6, 2 * MB)])
def test_node_dials_socat_through_wireguard_go(wg_rig: NetnsRig, version: int, size: int) -> None:
    """node.dial to socat servers behind wireguard-go: an upload and a download, byte-exact."""
    config, ns, link = wireguard_peer(wg_rig)
    peer_ip = PEER_V4 if version == 4 else PEER_V6
    source = wg_rig.tmpdir / "source.bin"
    source.write_bytes(blob(size, 3))
    pcap = overlay_pcap_path(wg_rig, f"wireguard-socat-v{version}")
    label = f"wireguard-go IPv{version}"

    async def main() -> None:
        node = Node(wireguard_config=config, listen_host=link.a.ip)
        capture_node(node, PcapWriter(pcap, snaplen=128))
        async with node:
            await socat_upload(
                node, ns, peer_ip, version, 9000, blob(size, 4), wg_rig.tmpdir / "got.bin", label
            )
            await socat_download(node, ns, peer_ip, version, 9001, source, label)

    with explain_failure(pcap):
        anyio.run(main)


def test_transfers_through_wireguard_go_on_an_impaired_link(wg_rig: NetnsRig) -> None:
    """The underlay veth loses 5% and delays 20±5 ms, reordering 10%, in both directions; four
    1 MiB transfers run at once (curl GET and PUT, node.dial to socat both ways): byte-exact."""
    config, ns, link = wireguard_peer(wg_rig)
    wg_rig.netem(None, link.a.ifname, IMPAIRMENT, seed=21)
    wg_rig.netem(ns, link.b.ifname, IMPAIRMENT, seed=22)
    size = 1 * MB
    upload = wg_rig.tmpdir / "upload.bin"
    upload.write_bytes(blob(size, 5))
    source = wg_rig.tmpdir / "source.bin"
    source.write_bytes(blob(size, 6))
    pcap = overlay_pcap_path(wg_rig, "wireguard-impaired")
    label = "wireguard-go IPv4 impaired"

    async def main() -> None:
        node = Node(wireguard_config=config, listen_host=link.a.ip)
        capture_node(node, PcapWriter(pcap))
        async with node, anyio.create_task_group() as tg:
            listener = await node.listen("tcp", f":{HTTP_PORT}")
            tg.start_soon(serve_http_forever, listener, tg)
            started = time.monotonic()
            with anyio.fail_after(40):
                async with anyio.create_task_group() as transfers:
                    transfers.start_soon(
                        curl_get, ns, NODE_V4, size, 8, wg_rig.tmpdir / "download.bin", label
                    )
                    transfers.start_soon(curl_put, ns, NODE_V4, upload, "PUT", label)
                    transfers.start_soon(
                        socat_upload,
                        node,
                        ns,
                        PEER_V4,
                        4,
                        9000,
                        blob(size, 9),
                        wg_rig.tmpdir / "got.bin",
                        label,
                    )
                    transfers.start_soon(socat_download, node, ns, PEER_V4, 4, 9001, source, label)
            print(f"{label}: four 1 MiB transfers in {time.monotonic() - started:.1f} s")
            print(f"{label}: node counters {node.status().counters}")
            tg.cancel_scope.cancel()

    with explain_failure(pcap):
        anyio.run(main)
    wg_rig.clear_netem(None, link.a.ifname)
    wg_rig.clear_netem(ns, link.b.ifname)
    for where, ifname in ((None, link.a.ifname), (ns, link.b.ifname)):
        stats = wg_rig.netem_stats(where, ifname)
        print(f"{label}: netem on {ifname}: {stats}")
        assert stats is None or stats["dropped"] > 0
