"""Self-tests of the namespace rig: stock wireguard-go peers talk through it, netem shapes it, and
nothing it made survives close() (nor a SIGKILLed run, after sweep_stale())."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from netns import (
    WIREGUARD_RUN_DIR,
    NetnsRig,
    RigError,
    _check_overlay,
    _check_underlay,
    _format_endpoint,
    generate_keypair,
    parse_netem,
    parse_wg_dump,
    public_key,
    skip_unless_root,
    skip_unless_tool,
    skip_unless_wireguard,
    sweep_stale,
)

HERE = Path(__file__).resolve().parent


def ping_avg_ms(ns, target: str, count: int = 5, interval: str = "0.2") -> float:  # type: ignore[no-untyped-def]
    out = ns.run(["ping", "-n", "-c", str(count), "-i", interval, "-W", "2", target], timeout=30).stdout
    m = re.search(r"= [\d.]+/([\d.]+)/", out)
    assert m, out
    return float(m.group(1))


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def root_links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wg_sockets() -> set[str]:
    return set(os.listdir(WIREGUARD_RUN_DIR)) if WIREGUARD_RUN_DIR.is_dir() else set()


# -- pure helpers (no root needed) -----------------------------------------------------------------


def test_keys_are_what_wg_computes() -> None:
    kp = generate_keypair()
    raw = kp.private_raw
    assert len(raw) == 32 and len(kp.public_raw) == 32
    assert raw[0] & 7 == 0 and raw[31] & 0x80 == 0 and raw[31] & 0x40  # clamped, like `wg genkey`
    skip_unless_tool("wg", "wireguard-tools")
    out = subprocess.run(
        ["wg", "pubkey"], input=kp.private + "\n", capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == kp.public == public_key(kp.private)


def test_addresses_outside_the_plan_are_refused() -> None:
    assert _check_underlay("198.18.0.1/30") == "198.18.0.1/30"
    assert _check_underlay("198.19.255.254/30")
    for bad in ("10.0.0.1/30", "192.168.1.1/24", "198.20.0.1/30", "198.18.0.1/8", "8.8.8.8/32"):
        with pytest.raises(ValueError):
            _check_underlay(bad)
    assert _check_overlay("100.64.0.1/10") and _check_overlay("fd7a:115c:a1e0::1/48")
    for bad in ("100.128.0.1/10", "fd7a:115c:a1e1::1/64", "10.1.1.1/32", "100.64.0.1/8"):
        with pytest.raises(ValueError):
            _check_overlay(bad)
    assert _format_endpoint("198.18.3.1:51820") == "198.18.3.1:51820"
    assert _format_endpoint(("127.0.0.1", 9)) == "127.0.0.1:9"
    assert _format_endpoint("[::1]:5") == "[::1]:5"
    for bad_ep in ("10.0.0.1:51820", "1.1.1.1:53", "[2001:db8::1]:1"):
        with pytest.raises(ValueError):
            _format_endpoint(bad_ep)


def test_parse_wg_dump() -> None:
    text = (
        "cHJpdg==\tcHVi\t51820\toff\n"
        "cGVlcjE=\t(none)\t198.18.0.2:51821\t100.64.0.2/32,fd7a:115c:a1e0::2/128\t1700000000\t1234\t5678\t25\n"
        "cGVlcjI=\tcHNr\t(none)\t(none)\t0\t0\t0\toff\n"
    )
    show = parse_wg_dump(text)
    assert show.public_key == "cHVi" and show.listen_port == 51820 and show.fwmark is None
    p1, p2 = show.peers["cGVlcjE="], show.peers["cGVlcjI="]
    assert p1.endpoint == "198.18.0.2:51821" and p1.allowed_ips == ["100.64.0.2/32", "fd7a:115c:a1e0::2/128"]
    assert (p1.latest_handshake, p1.rx_bytes, p1.tx_bytes, p1.persistent_keepalive) == (
        1700000000,
        1234,
        5678,
        25,
    )
    assert p1.preshared_key is None
    assert p2.preshared_key == "cHNr" and p2.endpoint is None and p2.allowed_ips == []
    assert p2.latest_handshake == 0 and p2.persistent_keepalive is None


# -- the rig ---------------------------------------------------------------------------------------


def test_names_fit_and_are_unique(rig: NetnsRig) -> None:
    other = NetnsRig()
    try:
        assert rig.run_id != other.run_id
        a, b = rig.add_namespace("a-very-long-name-hint"), rig.add_namespace("a-very-long-name-hint")
        assert a.name != b.name and a.name and rig.run_id in a.name
        link = rig.veth_to_root(a)
        assert len(link.a.ifname) <= 15 and len(link.b.ifname) <= 15
        link2 = rig.veth_between(a, b)
        assert link2.a.ifname != link.a.ifname
        assert link.a.cidr != link2.a.cidr
    finally:
        other.close()


def test_veth_to_root_carries_udp_from_the_root_namespace(rig: NetnsRig) -> None:
    skip_unless_tool("socat", "socat")
    ns = rig.add_namespace("echo")
    link = rig.veth_to_root(ns)
    assert link.a.ns.is_root and link.b.ns is ns
    assert link.a.ip.startswith("198.1") and link.b.ip.startswith("198.1")
    assert ping_avg_ms(rig.root, link.b.ip, count=2) < 100
    echo = ns.popen(["socat", "-T", "10", "UDP4-RECVFROM:7777,fork,reuseaddr", "EXEC:cat"])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((link.a.ip, 0))  # what embedmesh does: its UDP socket on the root-side address
        s.settimeout(0.5)
        for _ in range(20):
            s.sendto(b"hello", (link.b.ip, 7777))
            try:
                data, src = s.recvfrom(100)
                break
            except TimeoutError:
                continue
        else:
            pytest.fail("no UDP echo through the veth")
    assert data == b"hello" and src == (link.b.ip, 7777)
    rig.close()
    assert echo.poll() is not None


def test_two_wireguard_go_peers_ping_and_leave_nothing(wg_rig: NetnsRig) -> None:
    rig = wg_rig
    left, right = rig.add_namespace("left"), rig.add_namespace("right")
    link = rig.veth_between(left, right)
    kl, kr = generate_keypair(), generate_keypair()
    wl = rig.start_wireguard(left, kl.private, 51820, ["100.64.0.1/10", "fd7a:115c:a1e0::1/48"])
    wr = rig.start_wireguard(right, kr, 51821, ["100.64.0.2/10", "fd7a:115c:a1e0::2/48"], mtu=1380)
    wl.add_peer(kr.public, ["100.64.0.2/32", "fd7a:115c:a1e0::2/128"], endpoint=(link.b.ip, 51821))
    wr.add_peer(kl.public, ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"], persistent_keepalive=25)

    show = wl.show()
    assert show.public_key == kl.public and show.listen_port == 51820
    assert show.peers[kr.public].latest_handshake == 0
    assert "mtu 1380" in right.ip("link", "show", wr.ifname).stdout

    left.run(["ping", "-n", "-c", "3", "-W", "2", "100.64.0.2"], timeout=20)
    right.run(["ping", "-n", "-c", "3", "-W", "2", "fd7a:115c:a1e0::1"], timeout=20)

    peer = wl.wait_for_handshake(kr.public)
    assert peer.latest_handshake > time.time() - 60
    assert peer.rx_bytes > 0 and peer.tx_bytes > 0 and peer.endpoint == f"{link.b.ip}:51821"
    back = wr.peer(kl.public)
    assert back.latest_handshake > 0 and back.rx_bytes > 0 and back.endpoint == f"{link.a.ip}:51820"
    assert back.persistent_keepalive == 25

    namespaces = {left.name, right.name}
    sockets = {wl.uapi_path.name, wr.uapi_path.name}
    processes = rig.processes
    assert sockets <= wg_sockets()
    assert all(pid_alive(p.pid) for p in processes)
    tmpdir = rig.tmpdir

    rig.close()

    assert not namespaces & netns_names()
    assert not {link.a.ifname, link.b.ifname, wl.ifname, wr.ifname} & root_links()
    assert not sockets & wg_sockets()
    assert all(p.poll() is not None and not pid_alive(p.pid) for p in processes)
    assert not tmpdir.exists() and not rig.manifest_path.exists()
    rig.close()  # idempotent


def test_preshared_key_and_restart_of_a_peer(wg_rig: NetnsRig) -> None:
    from netns import generate_preshared_key

    rig = wg_rig
    a, b = rig.add_namespace("a"), rig.add_namespace("b")
    link = rig.veth_between(a, b)
    psk = generate_preshared_key()
    wa = rig.start_wireguard(a, None, 40000, ["100.64.1.1/24"])
    wb = rig.start_wireguard(b, None, 40001, ["100.64.1.2/24"])
    wa.add_peer(wb.public_key, "100.64.1.2/32", endpoint=f"{link.b.ip}:40001", preshared_key=psk)
    wb.add_peer(wa.public_key, "100.64.1.1/32", endpoint=f"{link.a.ip}:40000", preshared_key=psk)
    a.run("ping -n -c 2 -W 2 100.64.1.2", timeout=20)
    assert wa.peer(wb.public_key).preshared_key == psk
    # A mismatched PSK must break the tunnel: proof that the option reaches wireguard-go.
    wb.stop()
    assert wb.process.poll() is not None and not wb.uapi_path.exists()
    wb2 = rig.start_wireguard(b, wb.keys, 40001, ["100.64.1.2/24"])
    wb2.add_peer(wa.public_key, "100.64.1.1/32", endpoint=f"{link.a.ip}:40000")
    # (b initiates: its handshake's response from a mixes in a PSK that b does not have)
    assert b.run("ping -n -c 2 -W 1 100.64.1.1", check=False, timeout=20).returncode != 0
    assert wb2.peer(wa.public_key).latest_handshake == 0
    wb2.add_peer(wa.public_key, "100.64.1.1/32", preshared_key=psk)
    b.run("ping -n -c 12 -W 2 100.64.1.1", timeout=40)  # succeeds at the next handshake retry (<= 5 s)
    assert wb2.peer(wa.public_key).latest_handshake > 0


def test_netem_delays_a_namespace_link(rig: NetnsRig) -> None:
    a, b = rig.add_namespace("a"), rig.add_namespace("b")
    link = rig.veth_between(a, b)
    base = ping_avg_ms(a, link.b.ip)
    backend = rig.netem(a, link.a.ifname, "delay 40ms")
    assert rig.netem_active(a, link.a.ifname) == backend in ("tc", "emulated")
    delayed = ping_avg_ms(a, link.b.ip)
    assert delayed >= base + 38, (base, delayed)
    assert ping_avg_ms(b, link.a.ip) >= base + 38  # the reply leaves through the shaped end too
    rig.netem(a, link.a.ifname, "delay 80ms 1ms")  # replace, not add
    assert ping_avg_ms(a, link.b.ip) >= base + 75
    rig.clear_netem(a, link.a.ifname)
    assert rig.netem_active(a, link.a.ifname) is None
    assert ping_avg_ms(a, link.b.ip) < base + 20


def test_netem_on_the_root_end_and_loss(rig: NetnsRig) -> None:
    ns = rig.add_namespace("lossy")
    link = rig.veth_to_root(ns)
    base = ping_avg_ms(rig.root, link.b.ip)
    rig.netem(None, link.a.ifname, "delay 30ms")
    assert rig.netem_active(None, link.a.ifname)
    assert ping_avg_ms(rig.root, link.b.ip) >= base + 28
    rig.netem(rig.root, link.a.ifname, "loss 100%")
    assert rig.root.run(["ping", "-n", "-c", "2", "-W", "1", link.b.ip], check=False).returncode != 0
    with pytest.raises(ValueError):
        rig.netem(None, "lo", "delay 1ms")  # the root namespace's own links are off limits
    rig.close()
    assert link.a.ifname not in root_links()
    rules = subprocess.run(
        ["iptables", "-w", "10", "-t", "mangle", "-S"], capture_output=True, text=True
    ).stdout
    assert link.a.ifname not in rules


def test_parse_netem() -> None:
    spec = parse_netem(
        "limit 500 delay 20ms 5ms 25% distribution normal loss random 5% duplicate 1 "
        "corrupt 0.1% reorder 10% 50% gap 5 rate 1mbit"
    )
    assert spec.limit == 500 and spec.delay == pytest.approx(0.020) and spec.jitter == pytest.approx(0.005)
    assert spec.distribution == "normal" and spec.loss == pytest.approx(0.05)
    assert spec.duplicate == pytest.approx(0.01) and spec.corrupt == pytest.approx(0.001)
    assert spec.reorder == pytest.approx(0.10) and spec.gap == 5 and spec.rate == pytest.approx(1e6)
    assert parse_netem("delay 1s").delay == 1.0 and parse_netem("delay 250us").delay == pytest.approx(250e-6)
    assert parse_netem("rate 100kbps").rate == pytest.approx(800e3)
    for bad in ("delay", "loss 150%", "loss state 1 2", "slot 1ms", "delay 1ms distribution pareto", "bogus"):
        with pytest.raises(ValueError):
            parse_netem(bad)


@pytest.fixture
def emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    skip_unless_tool("iptables", "iptables")
    monkeypatch.setenv("EMBEDMESH_NETEM", "emulate")


def test_emulated_netem_loss_duplicate_corrupt_reorder(rig: NetnsRig, emulated: None) -> None:
    a, b = rig.add_namespace("a"), rig.add_namespace("b")
    link = rig.veth_between(a, b)
    ping = ["ping", "-n", "-i", "0.05", "-W", "1"]

    assert rig.netem(a, link.a.ifname, "duplicate 100%", seed=1) == "emulated"
    out = a.run([*ping, "-c", "5", link.b.ip]).stdout
    assert out.count("DUP!") >= 4, out

    rig.netem(a, link.a.ifname, "loss 50%", seed=2)
    out = a.run([*ping, "-c", "40", link.b.ip], check=False).stdout
    received = int(re.search(r"(\d+) received", out).group(1))  # type: ignore[union-attr]
    assert 8 <= received <= 32, out

    rig.netem(a, link.a.ifname, "corrupt 100%", seed=3)
    assert a.run([*ping, "-c", "3", link.b.ip], check=False).returncode != 0

    rig.netem(a, link.a.ifname, "delay 60ms reorder 50%", seed=4)
    out = a.run([*ping, "-c", "20", link.b.ip]).stdout
    rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", out)]
    assert min(rtts) < 20 and max(rtts) > 55, rtts
    rig.clear_netem(a, link.a.ifname)
    stats = rig.netem_stats(a, link.a.ifname)
    assert stats and stats["packets"] >= 20 and 3 <= stats["reordered"] <= 17, stats


def test_emulated_netem_jitter_and_rate(rig: NetnsRig, emulated: None) -> None:
    a, b = rig.add_namespace("a"), rig.add_namespace("b")
    link = rig.veth_between(a, b)
    rig.netem(a, link.a.ifname, "delay 30ms 10ms", seed=5)
    out = a.run(["ping", "-n", "-i", "0.05", "-c", "20", "-W", "1", link.b.ip]).stdout
    rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", out)]
    assert min(rtts) > 19 and max(rtts) < 80 and max(rtts) - min(rtts) > 5, rtts
    # 1200-byte pings at 100 kbit/s: ~100 ms of serialization each
    rig.netem(a, link.a.ifname, "rate 100kbit", seed=6)
    out = a.run(["ping", "-n", "-s", "1200", "-i", "0.5", "-c", "3", "-W", "2", link.b.ip]).stdout
    rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", out)]
    assert all(90 < r < 400 for r in rtts), rtts


def test_emulated_netem_carries_a_wireguard_tunnel(wg_rig: NetnsRig, emulated: None) -> None:
    rig = wg_rig
    a, b = rig.add_namespace("a"), rig.add_namespace("b")
    link = rig.veth_between(a, b)
    wa = rig.start_wireguard(a, None, 51820, ["100.64.2.1/24"])
    wb = rig.start_wireguard(b, None, 51820, ["100.64.2.2/24"])
    wa.add_peer(wb.public_key, "100.64.2.2/32", endpoint=(link.b.ip, 51820))
    wb.add_peer(wa.public_key, "100.64.2.1/32", endpoint=(link.a.ip, 51820))
    rig.netem(a, link.a.ifname, "delay 25ms")
    rig.netem(b, link.b.ifname, "delay 25ms")
    a.run("ping -n -c 1 -W 3 100.64.2.2", timeout=20)  # handshake
    assert ping_avg_ms(a, "100.64.2.2", count=3) >= 48


def test_capture_writes_a_pcap(rig: NetnsRig) -> None:
    skip_unless_tool("tcpdump", "tcpdump")
    skip_unless_tool("tshark", "tshark")
    ns = rig.add_namespace("cap")
    link = rig.veth_to_root(ns)
    cap = rig.capture(ns, link.b.ifname, "icmp")
    ping_avg_ms(rig.root, link.b.ip, count=3)
    path = cap.stop()
    out = subprocess.run(
        ["tshark", "-r", str(path), "-Y", "icmp.type == 8"], capture_output=True, text=True, check=True
    ).stdout
    assert len(out.strip().splitlines()) == 3, out


def test_cleanup_when_the_test_raises() -> None:
    skip_unless_root()
    with pytest.raises(ZeroDivisionError), NetnsRig() as rig:
        ns = rig.add_namespace("boom")
        link = rig.veth_to_root(ns)
        rig.netem(None, link.a.ifname, "delay 1ms")
        sleeper = ns.popen(["sleep", "600"])
        1 / 0  # noqa: B018
    assert ns.name not in netns_names()
    assert link.a.ifname not in root_links()
    assert sleeper.poll() is not None
    assert not rig.tmpdir.exists()


def test_run_errors_carry_the_output(rig: NetnsRig) -> None:
    ns = rig.add_namespace("err")
    with pytest.raises(RigError, match=r"nosuchdev0.*does not exist"):
        ns.ip("link", "show", "dev", "nosuchdev0")
    assert ns.run("sh -c 'exit 3'", check=False).returncode == 3
    assert ns.run(["cat"], input="piped").stdout == "piped"


def test_sweep_removes_what_a_killed_run_left() -> None:
    skip_unless_wireguard()
    skip_unless_tool("iptables", "iptables")
    script = textwrap.dedent(
        f"""
        import json, os, signal, sys
        sys.path.insert(0, {str(HERE)!r})
        from netns import NetnsRig
        rig = NetnsRig()
        ns = rig.add_namespace("orphan")
        link = rig.veth_to_root(ns)
        wg = rig.start_wireguard(ns, None, 51820, ["100.64.9.1/24"])
        sleeper = ns.popen(["sleep", "600"])
        os.environ["EMBEDMESH_NETEM"] = "emulate"
        rig.netem(None, link.a.ifname, "delay 1ms")  # a worker process and iptables rules in the root
        worker = rig.processes[-1]
        print(json.dumps(dict(ns=ns.name, link=link.a.ifname, sock=str(wg.uapi_path), tmp=str(rig.tmpdir),
                              pids=[wg.process.pid, sleeper.pid, worker.pid], manifest=str(rig.manifest_path))),
              flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = json.loads(proc.stdout)

    def our_rules() -> list[str]:
        out = subprocess.run(["iptables", "-w", "10", "-t", "mangle", "-S"], capture_output=True, text=True)
        return [r for r in out.stdout.splitlines() if left["link"] in r]

    try:
        assert left["ns"] in netns_names() and left["link"] in root_links() and Path(left["sock"]).exists()
        assert all(pid_alive(p) for p in left["pids"])
        assert our_rules()
        done = sweep_stale()
        assert f"netns {left['ns']}" in done and f"link {left['link']}" in done
        assert f"process {left['pids'][2]}" in done and not our_rules()
        assert left["ns"] not in netns_names() and left["link"] not in root_links()
        assert not Path(left["sock"]).exists() and not Path(left["tmp"]).exists()
        assert not Path(left["manifest"]).exists()
        deadline = time.monotonic() + 5
        while any(pid_alive(p) for p in left["pids"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(pid_alive(p) for p in left["pids"])
    finally:
        sweep_stale()
        for pid in left["pids"]:  # only if the sweep failed; these are the orphan's own processes
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_sweep_leaves_live_rigs_alone(rig: NetnsRig) -> None:
    ns = rig.add_namespace("alive")
    sweep_stale()
    assert ns.name in netns_names() and rig.manifest_path.exists()
