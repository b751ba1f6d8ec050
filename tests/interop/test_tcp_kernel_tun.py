"""embedmesh's userspace TCP against the Linux kernel's, through a TUN device.

The stack runs in this process on a TUN device (``stackhost.StackHost``); the device's kernel side
lives in a rig namespace, where curl and socat are the peers. Every transfer is checked byte for
byte with SHA-256, over IPv4 and IPv6, on a clean path and on one with netem's loss, delay, jitter
and reordering. Each test records the overlay to a pcap; on failure the test prints tshark's
expert summary of it and keeps the file (see docs/interop.md).
"""

from __future__ import annotations

import time

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
    serve_http_forever,
    socat_download,
    socat_upload,
)

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
