"""A network-namespace test rig: namespaces, veth links, netem, and stock wireguard-go peers.

Everything a :class:`NetnsRig` creates is recorded, and :meth:`NetnsRig.close` removes all of it,
whatever state a failed test left behind: processes (SIGTERM, then SIGKILL, then anything else still
living in one of our namespaces), tc qdiscs, veth ends in the root namespace, namespaces, wireguard-go
UAPI sockets and temporary files.  Each rig also writes a small manifest under ``/run/embedmesh-rig``;
:func:`sweep_stale` (called once per pytest session by ``tests/interop/conftest.py``) removes what a rig
whose process died without closing (SIGKILL, CI timeout) left behind.

Address plan (the workplace allows traffic only to loopback and to our own namespaces; the rig refuses
anything else):

* underlay, veth links:        198.18.0.0/15  (RFC 2544 benchmarking range), one /30 per link
* overlay, inside WireGuard:   100.64.0.0/10 and fd7a:115c:a1e0::/48

Names carry a random per-rig suffix so concurrent runs do not collide: namespaces ``em-<suffix>-<hint>``,
interfaces ``em<kind><n><suffix>`` (at most 15 characters, the Linux limit).  wireguard-go's control
socket is ``/var/run/wireguard/<ifname>.sock`` in a folder shared by every namespace, so WireGuard
interface names are unique across runs too.

Only the standard library and PyNaCl (a dependency of embedmesh) are used; pytest is imported lazily by
the ``skip_*`` helpers so the module also works from a plain script.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import heapq
import ipaddress
import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

UNDERLAY_V4 = ipaddress.IPv4Network("198.18.0.0/15")
OVERLAY_V4 = ipaddress.IPv4Network("100.64.0.0/10")
OVERLAY_V6 = ipaddress.IPv6Network("fd7a:115c:a1e0::/48")
LOOPBACK_V4 = ipaddress.IPv4Network("127.0.0.0/8")
LOOPBACK_V6 = ipaddress.IPv6Network("::1/128")

WIREGUARD_RUN_DIR = Path("/var/run/wireguard")
MANIFEST_DIR = Path("/run/embedmesh-rig")
IFNAMSIZ = 15  # usable characters in a Linux interface name
NAME_PREFIX = "em"
REQUIRE_ENV = "EMBEDMESH_REQUIRE_INTEROP"  # "1": a missing prerequisite fails instead of skipping
PCAP_ENV = "EMBEDMESH_PCAP_DIR"  # a folder: every veth the rig makes is captured there (kept)
NETEM_ENV = "EMBEDMESH_NETEM"  # "tc" or "emulate" forces a netem backend; unset: tc when the kernel has it

Cmd = str | Sequence[str]
T = TypeVar("T")


class RigError(RuntimeError):
    """A rig operation failed (the message carries the command and its output)."""


class RigCleanupError(RigError):
    """close() could not remove everything; the message lists what is left."""


# --------------------------------------------------------------------------------------------------
# prerequisites


def rig_unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("ping", "iputils-ping")):
        if shutil.which(tool) is None:
            return f"{tool} not installed: apt-get install {package}"
    return None


def wireguard_unavailable_reason() -> str | None:
    """Why wireguard-go peers cannot be started here, or None when they can."""
    reason = rig_unavailable_reason()
    if reason:
        return reason
    if shutil.which("wireguard-go") is None:
        return "wireguard-go not installed: apt-get install wireguard-go"
    if shutil.which("wg") is None:
        return "wg not installed: apt-get install wireguard-tools"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun missing: wireguard-go needs the tun driver"
    return None


def _skip_or_fail(reason: str | None) -> None:
    if reason is None:
        return
    import pytest

    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} (and {REQUIRE_ENV}=1 forbids skipping)", pytrace=False)
    pytest.skip(reason)


def skip_unless_root() -> None:
    """pytest.skip (or fail, under EMBEDMESH_REQUIRE_INTEROP=1) unless namespaces can be made."""
    _skip_or_fail(rig_unavailable_reason())


def skip_unless_tool(tool: str, package: str) -> None:
    """Skip (or fail, under EMBEDMESH_REQUIRE_INTEROP=1) unless `tool` is on PATH."""
    _skip_or_fail(None if shutil.which(tool) else f"{tool} not installed: apt-get install {package}")


def skip_unless_wireguard() -> None:
    """As skip_unless_root, and also needs wireguard-go, wg and /dev/net/tun."""
    _skip_or_fail(wireguard_unavailable_reason())


# --------------------------------------------------------------------------------------------------
# keys


@dataclass(frozen=True)
class KeyPair:
    private: str  # base64 of the raw 32 bytes, as `wg genkey` prints
    public: str  # base64, as `wg pubkey` prints

    @property
    def private_raw(self) -> bytes:
        return base64.b64decode(self.private)

    @property
    def public_raw(self) -> bytes:
        return base64.b64decode(self.public)


def public_key(private_b64: str) -> str:
    """The Curve25519 public key of a base64 private key (what `wg pubkey` computes)."""
    from nacl.bindings import crypto_scalarmult_base

    raw = base64.b64decode(private_b64, validate=True)
    if len(raw) != 32:
        raise ValueError("a WireGuard key is 32 bytes")
    return base64.b64encode(crypto_scalarmult_base(_clamp(raw))).decode()


def generate_keypair() -> KeyPair:
    """A fresh clamped X25519 key pair (what `wg genkey | wg pubkey` would give)."""
    private = base64.b64encode(_clamp(secrets.token_bytes(32))).decode()
    return KeyPair(private, public_key(private))


def generate_preshared_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def _clamp(raw: bytes) -> bytes:
    b = bytearray(raw)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


# --------------------------------------------------------------------------------------------------
# small helpers


def wait_for(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05, what: str = "condition"
) -> T:
    """Poll until predicate() is truthy and return its value; RigError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise RigError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def _argv(cmd: Cmd) -> list[str]:
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _run(
    argv: list[str], *, check: bool = True, timeout: float = 30.0, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as e:
        raise RigError(f"timed out after {timeout}s: {shlex.join(argv)}") from e
    if check and proc.returncode != 0:
        raise RigError(
            f"command failed (exit {proc.returncode}): {shlex.join(argv)}\n"
            f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}"
        )
    return proc


def _ip_in(addr: str, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    ip = ipaddress.ip_interface(addr).ip
    return any(ip.version == n.version and ip in n for n in networks)


def _check_underlay(cidr: str) -> str:
    iface = ipaddress.ip_interface(cidr)
    if iface.version != 4 or iface.network.prefixlen < UNDERLAY_V4.prefixlen or iface.ip not in UNDERLAY_V4:
        raise ValueError(f"underlay address {cidr} is outside {UNDERLAY_V4} (the only range the rig may use)")
    if "/" not in cidr:
        raise ValueError(f"underlay address {cidr} needs a prefix length, e.g. /30")
    return str(iface)


def _check_overlay(cidr: str) -> str:
    iface = ipaddress.ip_interface(cidr)
    net = OVERLAY_V4 if iface.version == 4 else OVERLAY_V6
    if iface.ip not in net or iface.network.prefixlen < net.prefixlen:
        raise ValueError(f"overlay address {cidr} must lie inside {OVERLAY_V4} or {OVERLAY_V6}")
    return str(iface)


def _format_endpoint(endpoint: str | tuple[str, int]) -> str:
    if isinstance(endpoint, tuple):
        host, port = endpoint
    else:
        m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:]+):(\d+)", endpoint)
        if not m:
            raise ValueError(f"endpoint {endpoint!r} is not host:port or [v6]:port")
        host, port = (m.group(1), int(m.group(2))) if m.group(1) else (m.group(3), int(m.group(4)))
    ip = ipaddress.ip_address(host)
    if not _ip_in(str(ip), (UNDERLAY_V4, LOOPBACK_V4, LOOPBACK_V6)):
        raise ValueError(f"endpoint {host} is outside {UNDERLAY_V4} and loopback: the rig sends nowhere else")
    if not 0 < int(port) < 65536:
        raise ValueError(f"bad port {port}")
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _proc_start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


# --------------------------------------------------------------------------------------------------
# namespaces


class Namespace:
    """A network namespace made by the rig (or, for rig.root, the root namespace)."""

    def __init__(self, rig: NetnsRig, name: str | None) -> None:
        self.rig = rig
        self.name = name  # None for the root namespace

    @property
    def is_root(self) -> bool:
        return self.name is None

    def __repr__(self) -> str:
        return f"Namespace({self.name or '<root>'})"

    def wrap(self, cmd: Cmd) -> list[str]:
        """The argv that runs cmd inside this namespace."""
        argv = _argv(cmd)
        return argv if self.name is None else ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        cmd: Cmd,
        *,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run cmd to completion inside the namespace; text stdout/stderr captured.

        check=True raises RigError (with the output) on a non-zero exit.
        """
        kwargs: dict[str, Any] = {"env": env}
        if input is not None:
            kwargs["input"] = input
            kwargs["stdin"] = None
        return _run(self.wrap(cmd), check=check, timeout=timeout, **kwargs)

    def popen(self, cmd: Cmd, *, log_name: str | None = None, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start cmd in the background inside the namespace; the rig kills it on close().

        Unless stdout/stderr are given, both go to a log file in the rig's temp folder (its path is
        the returned Popen's ``log_path`` attribute).  The process gets its own session, so close()
        also reaches whatever it forks.
        """
        return self.rig._popen(
            self.wrap(cmd), log_name=log_name or _argv(cmd)[0], in_root=self.is_root, **kwargs
        )

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`ip [-n NS] args...` (no `ip netns exec` overhead)."""
        ns = [] if self.name is None else ["-n", self.name]
        return _run(["ip", *ns, *args], check=check)

    def link_exists(self, ifname: str) -> bool:
        return self.ip("link", "show", "dev", ifname, check=False).returncode == 0


# --------------------------------------------------------------------------------------------------
# links, captures, wireguard


@dataclass(frozen=True)
class VethEnd:
    ns: Namespace
    ifname: str
    cidr: str  # e.g. "198.18.7.1/30"

    @property
    def ip(self) -> str:
        return str(ipaddress.ip_interface(self.cidr).ip)


@dataclass(frozen=True)
class VethLink:
    """Two veth ends.  For veth_to_root, ``a`` is the root-namespace end and ``b`` the namespace's."""

    a: VethEnd
    b: VethEnd


@dataclass
class Capture:
    """A running tcpdump writing a pcap; stop() it before reading path."""

    path: Path
    process: subprocess.Popen[Any]

    def stop(self, timeout: float = 5.0) -> Path:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # tcpdump flushes and exits
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.path


@dataclass(frozen=True)
class PeerStatus:
    public_key: str
    preshared_key: str | None
    endpoint: str | None  # "198.18.0.1:51820", None until known
    allowed_ips: list[str]
    latest_handshake: int  # unix seconds; 0 = never
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive: int | None  # seconds; None = off


@dataclass(frozen=True)
class WgShow:
    public_key: str
    listen_port: int
    fwmark: int | None
    peers: dict[str, PeerStatus] = field(default_factory=dict)


def parse_wg_dump(text: str) -> WgShow:
    """Parse `wg show <ifname> dump` (tab-separated: the interface line, then one line per peer)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise RigError("empty `wg show dump` output")
    _priv, pub, port, fwmark = lines[0].split("\t")
    peers: dict[str, PeerStatus] = {}
    for ln in lines[1:]:
        p_pub, psk, endpoint, allowed, hs, rx, tx, keepalive = ln.split("\t")
        peers[p_pub] = PeerStatus(
            public_key=p_pub,
            preshared_key=None if psk == "(none)" else psk,
            endpoint=None if endpoint == "(none)" else endpoint,
            allowed_ips=[] if allowed == "(none)" else allowed.split(","),
            latest_handshake=int(hs),
            rx_bytes=int(rx),
            tx_bytes=int(tx),
            persistent_keepalive=None if keepalive == "off" else int(keepalive),
        )
    return WgShow(pub, int(port), None if fwmark == "off" else int(fwmark, 0), peers)


class WireGuardInterface:
    """A wireguard-go process and its TUN interface inside one namespace."""

    def __init__(
        self,
        rig: NetnsRig,
        ns: Namespace,
        ifname: str,
        keys: KeyPair,
        listen_port: int,
        addresses: list[str],
        mtu: int,
        process: subprocess.Popen[Any],
        log_path: Path,
    ) -> None:
        self.rig = rig
        self.ns = ns
        self.ifname = ifname
        self.keys = keys
        self.listen_port = listen_port
        self.addresses = addresses
        self.mtu = mtu
        self.process = process
        self.log_path = log_path
        self.uapi_path = WIREGUARD_RUN_DIR / f"{ifname}.sock"

    @property
    def private_key(self) -> str:
        return self.keys.private

    @property
    def public_key(self) -> str:
        return self.keys.public

    def __repr__(self) -> str:
        return f"WireGuardInterface({self.ifname} in {self.ns.name}, port {self.listen_port})"

    def wg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `wg <args>` in the interface's namespace."""
        return self.ns.run(["wg", *args], check=check)

    def add_peer(
        self,
        public_key_b64: str,
        allowed_ips: Sequence[str] | str,
        endpoint: str | tuple[str, int] | None = None,
        persistent_keepalive: int | None = None,
        preshared_key: str | None = None,
    ) -> None:
        """`wg set <if> peer ...`.  endpoint must be in 198.18.0.0/15 or loopback."""
        ips = [allowed_ips] if isinstance(allowed_ips, str) else list(allowed_ips)
        for a in ips:
            ipaddress.ip_network(a, strict=False)  # validate early, with a Python traceback
        args = ["set", self.ifname, "peer", public_key_b64, "allowed-ips", ",".join(ips)]
        if endpoint is not None:
            args += ["endpoint", _format_endpoint(endpoint)]
        if persistent_keepalive is not None:
            args += ["persistent-keepalive", str(int(persistent_keepalive))]
        if preshared_key is not None:
            args += ["preshared-key", str(self.rig._secret_file(preshared_key, "psk"))]
        self.wg(*args)

    def remove_peer(self, public_key_b64: str) -> None:
        self.wg("set", self.ifname, "peer", public_key_b64, "remove")

    def show(self) -> WgShow:
        """Parsed `wg show <if> dump`: listen port, and per peer endpoint, handshake time, rx/tx."""
        return parse_wg_dump(self.wg("show", self.ifname, "dump").stdout)

    def peer(self, public_key_b64: str) -> PeerStatus:
        try:
            return self.show().peers[public_key_b64]
        except KeyError:
            raise RigError(f"{self.ifname} has no peer {public_key_b64}") from None

    def wait_for_handshake(self, public_key_b64: str, timeout: float = 10.0, after: int = 0) -> PeerStatus:
        """Wait until the peer's latest handshake is newer than `after` (unix seconds)."""
        return wait_for(
            lambda: (p := self.peer(public_key_b64)).latest_handshake > after and p,
            timeout,
            0.1,
            f"a handshake on {self.ifname} with {public_key_b64}",
        )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM wireguard-go (it removes its socket and TUN) and wait; SIGKILL if it hangs."""
        self.rig._terminate(self.process, timeout)
        with contextlib.suppress(FileNotFoundError):
            self.uapi_path.unlink()


# --------------------------------------------------------------------------------------------------
# netem, emulated (for kernels built without sch_netem)
#
# Some kernels (this project's CI machines among them: "Error: Specified qdisc kind is unknown") lack
# sch_netem.  Then rig.netem() emulates it: an iptables mangle/POSTROUTING rule sends the interface's
# outgoing IPv4/IPv6 packets to an NFQUEUE, and a worker process (this file run as a script, inside
# the same namespace) holds each packet's verdict for its delay, drops, duplicates (re-sent through a
# raw socket whose mark bypasses the rule), corrupts (a flipped bit in the verdict's payload),
# reorders and rate-limits, with netem's own semantics.  Non-IP frames (ARP) pass untouched.

NETEM_BYPASS_MARK = 0x4E650000  # packets carrying these mark bits skip the NFQUEUE rule


@dataclass
class NetemSpec:
    """The subset of `tc qdisc ... netem` options the emulator implements (correlations are ignored)."""

    delay: float = 0.0  # seconds
    jitter: float = 0.0  # seconds
    distribution: str = "uniform"  # or "normal"
    loss: float = 0.0  # probabilities, 0..1
    duplicate: float = 0.0
    corrupt: float = 0.0
    reorder: float = 0.0
    gap: int = 0
    rate: float | None = None  # bits per second
    limit: int = 1000  # packets held at once; more are dropped


_TIME_UNITS = {
    "": 1e-6,
    "us": 1e-6,
    "usec": 1e-6,
    "usecs": 1e-6,
    "ms": 1e-3,
    "msec": 1e-3,
    "msecs": 1e-3,
    "s": 1.0,
    "sec": 1.0,
    "secs": 1.0,
}
_RATE_PREFIX = {
    "": 1.0,
    "k": 1e3,
    "m": 1e6,
    "g": 1e9,
    "t": 1e12,
    "ki": 1024.0,
    "mi": 1024.0**2,
    "gi": 1024.0**3,
    "ti": 1024.0**4,
}


def _parse_time(tok: str) -> float | None:
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)([a-z]*)", tok.lower())
    if not m or m.group(2) not in _TIME_UNITS:
        return None
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


def _parse_percent(tok: str) -> float | None:
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)%?", tok)
    if not m:
        return None
    value = float(m.group(1)) / 100.0
    if value > 1.0:
        raise ValueError(f"netem: {tok} is over 100%")
    return value


def _parse_rate(tok: str) -> float | None:
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)([kmgt]i?)?(bit|bps)?", tok.lower())
    if not m:
        return None
    bits = float(m.group(1)) * _RATE_PREFIX[m.group(2) or ""]
    return bits * 8 if m.group(3) == "bps" else bits


def parse_netem(spec: str) -> NetemSpec:
    """Parse netem's option syntax, e.g. "delay 20ms 5ms loss 5% reorder 10%"; ValueError on what the
    emulator does not implement (slot, loss state/gemodel, pareto distributions, ...)."""
    toks = shlex.split(spec)
    out = NetemSpec()
    i = 0

    def need(parse: Callable[[str], float | None], what: str) -> float:
        nonlocal i
        if i >= len(toks) or (value := parse(toks[i])) is None:
            raise ValueError(f"netem: expected {what} at {' '.join(toks[i:]) or 'the end'!r} in {spec!r}")
        i += 1
        return value

    def optional(parse: Callable[[str], float | None]) -> float | None:
        nonlocal i
        if i < len(toks) and (value := parse(toks[i])) is not None:
            i += 1
            return value
        return None

    while i < len(toks):
        word = toks[i]
        i += 1
        if word == "limit":
            out.limit = int(need(lambda t: float(t) if t.isdigit() else None, "a packet count"))
        elif word in ("delay", "latency"):
            out.delay = need(_parse_time, "a time")
            if (jitter := optional(_parse_time)) is not None:
                out.jitter = jitter
                optional(_parse_percent)  # correlation
        elif word == "distribution":
            name = toks[i] if i < len(toks) else ""
            i += 1
            if name not in ("uniform", "normal"):
                raise ValueError(f"netem: distribution {name!r} is not emulated (uniform, normal are)")
            out.distribution = name
        elif word in ("loss", "drop"):
            if i < len(toks) and toks[i] in ("state", "gemodel"):
                raise ValueError(f"netem: loss {toks[i]} is not emulated (use loss [random] PERCENT)")
            if i < len(toks) and toks[i] == "random":
                i += 1
            out.loss = need(_parse_percent, "a percentage")
            optional(_parse_percent)
        elif word in ("duplicate", "corrupt", "reorder"):
            setattr(out, word, need(_parse_percent, "a percentage"))
            optional(_parse_percent)
        elif word == "gap":
            out.gap = int(need(lambda t: float(t) if t.isdigit() else None, "a packet count"))
        elif word == "rate":
            out.rate = need(_parse_rate, "a rate")
        else:
            raise ValueError(f"netem: option {word!r} is not emulated")
    if out.rate is not None and out.rate <= 0:
        raise ValueError("netem: rate must be positive")
    return out


class _NetemWorker:
    """The NFQUEUE side of the emulator; runs in its own process (see _netem_worker_main)."""

    NFNL_SUBSYS_QUEUE = 3
    MSG_PACKET, MSG_VERDICT, MSG_CONFIG = 0, 1, 2
    NLMSG_ERROR, NLMSG_DONE = 2, 3
    NLM_F_REQUEST, NLM_F_ACK = 1, 4
    NF_DROP, NF_ACCEPT = 0, 1

    def __init__(self, spec: NetemSpec, ifname: str, seed: int, mark: int) -> None:
        self.spec, self.ifname, self.mark = spec, ifname, mark
        self.rng = random.Random(seed)
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
        with contextlib.suppress(OSError):
            self.sock.setsockopt(270, 5, 1)  # SOL_NETLINK, NETLINK_NO_ENOBUFS
        self.sock.bind((0, 0))
        self.queue = -1
        self.held: list[tuple[float, int, int, bytes | None]] = []  # (due, seq, packet id, new payload)
        self.seq = 0
        self.reorder_counter = 0
        self.rate_free_at = 0.0
        self.stats = dict.fromkeys(
            ("packets", "dropped", "duplicated", "corrupted", "reordered", "overlimit"), 0
        )
        self.raw: dict[int, socket.socket] = {}

    @staticmethod
    def _attr(kind: int, data: bytes) -> bytes:
        length = 4 + len(data)
        return struct.pack("=HH", length, kind) + data + b"\0" * (-length % 4)

    def _msg(self, msg_type: int, flags: int, body: bytes) -> bytes:
        nfgen = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(self.queue))
        payload = nfgen + body
        return (
            struct.pack("=IHHII", 16 + len(payload), (self.NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, 0, 0)
            + payload
        )

    def _request(self, body: bytes) -> None:
        self.sock.send(self._msg(self.MSG_CONFIG, self.NLM_F_REQUEST | self.NLM_F_ACK, body))
        while True:
            data = self.sock.recv(65536)
            _length, msg_type = struct.unpack_from("=IH", data)
            if msg_type == self.NLMSG_ERROR:
                err = struct.unpack_from("=i", data, 16)[0]
                if err:
                    raise OSError(-err, os.strerror(-err))
                return

    def bind(self) -> int:
        pick = random.SystemRandom()  # not self.rng: the seed must fix the impairments, not the queue
        for _ in range(100):
            self.queue = pick.randrange(20000, 65000)
            try:
                self._request(self._attr(1, struct.pack("=BBH", 1, 0, 0)))  # NFQA_CFG_CMD: BIND
            except OSError:
                continue
            # NFQA_CFG_PARAMS: copy whole packets; NFQA_CFG_QUEUE_MAXLEN: room for what we hold
            self._request(
                self._attr(2, struct.pack(">IB", 0xFFFF, 2))
                + self._attr(3, struct.pack(">I", max(1024, self.spec.limit * 2 + 64)))
            )
            return self.queue
        raise RigError("no free NFQUEUE number")

    def _verdict(self, packet_id: int, verdict: int, payload: bytes | None = None) -> None:
        body = self._attr(2, struct.pack(">II", verdict, packet_id))  # NFQA_VERDICT_HDR
        if payload is not None:
            body += self._attr(10, payload)  # NFQA_PAYLOAD
        self.sock.send(self._msg(self.MSG_VERDICT, self.NLM_F_REQUEST, body))

    def _inject(self, packet: bytes) -> None:
        version = packet[0] >> 4
        if version not in (4, 6):
            return
        if version not in self.raw:
            family = socket.AF_INET if version == 4 else socket.AF_INET6
            s = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)  # header included
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.ifname.encode())
            self.raw[version] = s
        if version == 4:
            dst: tuple[Any, ...] = (socket.inet_ntop(socket.AF_INET, packet[16:20]), 0)
        else:
            dst = (socket.inet_ntop(socket.AF_INET6, packet[24:40]), 0, 0, 0)
        with contextlib.suppress(OSError):
            self.raw[version].sendto(packet, dst)

    def _on_packet(self, packet_id: int, packet: bytes, now: float) -> None:
        spec, rng = self.spec, self.rng
        self.stats["packets"] += 1
        if spec.loss and rng.random() < spec.loss:
            self.stats["dropped"] += 1
            self._verdict(packet_id, self.NF_DROP)
            return
        if len(self.held) >= spec.limit:
            self.stats["overlimit"] += 1
            self._verdict(packet_id, self.NF_DROP)
            return
        if spec.duplicate and rng.random() < spec.duplicate:
            self.stats["duplicated"] += 1
            self._inject(packet)
        new_payload = None
        if spec.corrupt and packet and rng.random() < spec.corrupt:
            self.stats["corrupted"] += 1
            buf = bytearray(packet)
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
            new_payload = bytes(buf)
        if (
            spec.reorder
            and (spec.gap == 0 or self.reorder_counter >= spec.gap - 1)
            and rng.random() < spec.reorder
        ):
            self.reorder_counter = 0
            self.stats["reordered"] += 1
            due = now  # sent at once, ahead of the delayed ones
        else:
            self.reorder_counter += 1
            delay = spec.delay
            if spec.jitter:
                if spec.distribution == "normal":
                    delay = rng.gauss(spec.delay, spec.jitter)
                else:
                    delay = spec.delay + rng.uniform(-spec.jitter, spec.jitter)
            due = now + max(0.0, delay)
        if spec.rate:
            due = max(due, self.rate_free_at) + len(packet) * 8 / spec.rate
            self.rate_free_at = due
        if due <= now:
            self._verdict(packet_id, self.NF_ACCEPT, new_payload)
        else:
            self.seq += 1
            heapq.heappush(self.held, (due, self.seq, packet_id, new_payload))

    def _read(self) -> None:
        now = time.monotonic()
        while True:
            try:
                data = self.sock.recv(262144, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # ENOBUFS: the kernel dropped messages; the packets are lost
                if e.errno == errno.ENOBUFS:
                    continue
                raise
            off = 0
            while off + 16 <= len(data):
                length, msg_type = struct.unpack_from("=IH", data, off)
                if length < 16:
                    break
                if msg_type == (self.NFNL_SUBSYS_QUEUE << 8) | self.MSG_PACKET:
                    packet_id, payload = None, b""
                    a = off + 20  # nlmsghdr + nfgenmsg
                    while a + 4 <= off + length:
                        alen, atype = struct.unpack_from("=HH", data, a)
                        if alen < 4:
                            break
                        atype &= 0x3FFF
                        if atype == 1:  # NFQA_PACKET_HDR
                            packet_id = struct.unpack_from(">I", data, a + 4)[0]
                        elif atype == 10:  # NFQA_PAYLOAD
                            payload = data[a + 4 : a + alen]
                        a += (alen + 3) & ~3
                    if packet_id is not None:
                        self._on_packet(packet_id, payload, now)
                off += (length + 3) & ~3

    def _release(self, everything: bool = False) -> None:
        now = time.monotonic()
        while self.held and (everything or self.held[0][0] <= now):
            _due, _seq, packet_id, payload = heapq.heappop(self.held)
            self._verdict(packet_id, self.NF_ACCEPT, payload)

    def serve(self) -> None:
        stopping = False

        def stop(_sig: int, _frame: object) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        import select

        try:
            while not stopping:
                timeout = max(0.0, self.held[0][0] - time.monotonic()) if self.held else 0.5
                readable, _, _ = select.select([self.sock], [], [], min(timeout, 0.5))
                if readable:
                    self._read()
                self._release()
        finally:
            self._release(everything=True)  # a stopped emulator hands back what it holds
            print("netem stats", json.dumps(self.stats), flush=True)


def _netem_worker_main(argv: list[str]) -> int:
    """`python3 netns.py netem-worker IFNAME SEED MARK SPEC`: bind a queue, print 'ready queue=N', serve."""
    ifname, seed, mark, spec = argv[0], int(argv[1]), int(argv[2], 0), argv[3]
    worker = _NetemWorker(parse_netem(spec), ifname, seed, mark)
    queue = worker.bind()
    print(f"ready queue={queue}", flush=True)
    worker.serve()
    return 0


@dataclass
class _Emulation:
    ns: Namespace
    ifname: str
    process: subprocess.Popen[Any]
    rules: list[list[str]]  # argv of each rule's deletion, e.g. ["iptables", "-t", "mangle", "-D", ...]


# --------------------------------------------------------------------------------------------------
# the rig


class NetnsRig:
    """Creates namespaces, links, qdiscs and processes, and removes every one of them on close()."""

    def __init__(self) -> None:
        reason = rig_unavailable_reason()
        if reason:
            raise RigError(reason)
        self.run_id = secrets.token_hex(3)[:5]  # 5 hex digits; interface names leave room for no more
        self.root = Namespace(self, None)
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"embedmesh-rig-{self.run_id}-"))
        self.closed = False
        self._counter = 0
        self._namespaces: list[Namespace] = []
        self._root_links: list[str] = []
        self._root_qdiscs: list[str] = []
        self._ns_qdiscs: list[tuple[Namespace, str]] = []
        self._processes: list[subprocess.Popen[Any]] = []
        self._sockets: list[Path] = []
        self._wireguards: list[WireGuardInterface] = []
        self._captures: list[Capture] = []
        self._emulations: dict[tuple[str | None, str], _Emulation] = {}
        self._subnet_cursor = random.randrange(UNDERLAY_V4.num_addresses // 4)
        self._used_subnets: set[ipaddress.IPv4Network] = set()
        self._pcap_dir = Path(os.environ[PCAP_ENV]) if os.environ.get(PCAP_ENV) else None
        MANIFEST_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.manifest_path = MANIFEST_DIR / f"{self.run_id}.json"
        self._write_manifest()

    # context manager --------------------------------------------------------------------------
    def __enter__(self) -> NetnsRig:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        # While an exception is already propagating, report cleanup trouble as a warning instead of
        # replacing the test's own error.
        self.close(raise_errors=exc_type is None)

    # names and addresses ------------------------------------------------------------------------
    def _next(self) -> int:
        self._counter += 1
        return self._counter

    def _ifname(self, kind: str) -> str:
        name = f"{NAME_PREFIX}{kind}{self._next()}{self.run_id}"
        if len(name) > IFNAMSIZ - 1:  # leave one character for veth "a"/"b"
            raise RigError(f"interface name {name} too long: too many resources in one rig")
        return name

    def alloc_subnet(self) -> ipaddress.IPv4Network:
        """A /30 of 198.18.0.0/15 that neither this rig nor the root namespace is using."""
        in_use = set(self._used_subnets)
        out = _run(["ip", "-4", "-o", "addr", "show"], check=False).stdout
        for m in re.finditer(r"inet (\S+)", out):
            iface = ipaddress.ip_interface(m.group(1))
            if iface.ip in UNDERLAY_V4:
                in_use.add(ipaddress.ip_network(f"{iface.ip}/30", strict=False))
        blocks = UNDERLAY_V4.num_addresses // 4
        for _ in range(blocks):
            self._subnet_cursor = (self._subnet_cursor + 1) % blocks
            net = ipaddress.IPv4Network((int(UNDERLAY_V4.network_address) + 4 * self._subnet_cursor, 30))
            if net not in in_use:
                self._used_subnets.add(net)
                return net
        raise RigError("198.18.0.0/15 is exhausted")

    def _pair(self, a_addr: str | None, b_addr: str | None) -> tuple[str, str]:
        if a_addr is None and b_addr is None:
            net = self.alloc_subnet()
            hosts = list(net.hosts())
            return f"{hosts[0]}/30", f"{hosts[1]}/30"
        if a_addr is None or b_addr is None:
            raise ValueError("give both addresses or neither")
        a, b = _check_underlay(a_addr), _check_underlay(b_addr)
        self._used_subnets.add(ipaddress.ip_interface(a).network)
        return a, b

    # namespaces ---------------------------------------------------------------------------------
    def add_namespace(self, name_hint: str = "ns") -> Namespace:
        """A new namespace (loopback up) named em-<runid>-<hint>."""
        hint = re.sub(r"[^a-z0-9]", "", name_hint.lower())[:12] or "ns"
        name = f"{NAME_PREFIX}-{self.run_id}-{hint}"
        if any(n.name == name for n in self._namespaces):
            name = f"{name}{self._next()}"
        _run(["ip", "netns", "add", name])
        ns = Namespace(self, name)
        self._namespaces.append(ns)
        self._write_manifest()
        ns.ip("link", "set", "lo", "up")
        return ns

    # links ----------------------------------------------------------------------------------------
    def veth_to_root(
        self, ns: Namespace, root_addr: str | None = None, ns_addr: str | None = None
    ) -> VethLink:
        """A veth pair from the root namespace to ns, each end addressed and up.

        Without addresses a free /30 of 198.18.0.0/15 is chosen (root end .1, namespace end .2 of it).
        The returned link's ``a`` is the root end: bind the process-under-test's UDP socket to
        ``link.a.ip``; ``link.b.ip`` is the namespace's address.
        """
        if ns.is_root:
            raise ValueError("veth_to_root needs a namespace made by add_namespace")
        root_cidr, ns_cidr = self._pair(root_addr, ns_addr)
        base = self._ifname("v")
        root_if, ns_if = base + "a", base + "b"
        _run(["ip", "link", "add", root_if, "type", "veth", "peer", "name", ns_if, "netns", ns.name or ""])
        self._root_links.append(root_if)
        self._write_manifest()
        # keep the root namespace quiet: no IPv6 autoconfiguration/ND on our underlay link
        with contextlib.suppress(OSError):
            Path(f"/proc/sys/net/ipv6/conf/{root_if}/disable_ipv6").write_text("1")
        self.root.ip("addr", "add", root_cidr, "dev", root_if)
        self.root.ip("link", "set", root_if, "up")
        ns.ip("addr", "add", ns_cidr, "dev", ns_if)
        ns.ip("link", "set", ns_if, "up")
        link = VethLink(VethEnd(self.root, root_if, root_cidr), VethEnd(ns, ns_if, ns_cidr))
        self._auto_capture(link)
        return link

    def veth_between(
        self, ns_a: Namespace, ns_b: Namespace, addr_a: str | None = None, addr_b: str | None = None
    ) -> VethLink:
        """A veth pair between two rig namespaces, addressed (a free /30 unless given) and up."""
        if ns_a.is_root or ns_b.is_root:
            raise ValueError("use veth_to_root for the root namespace")
        cidr_a, cidr_b = self._pair(addr_a, addr_b)
        base = self._ifname("v")
        if_a, if_b = base + "a", base + "b"
        # create in the root namespace and move both ends at once, so nothing can leak if a step fails
        _run(
            [
                "ip",
                "link",
                "add",
                if_a,
                "netns",
                ns_a.name or "",
                "type",
                "veth",
                "peer",
                "name",
                if_b,
                "netns",
                ns_b.name or "",
            ]
        )
        ns_a.ip("addr", "add", cidr_a, "dev", if_a)
        ns_b.ip("addr", "add", cidr_b, "dev", if_b)
        ns_a.ip("link", "set", if_a, "up")
        ns_b.ip("link", "set", if_b, "up")
        link = VethLink(VethEnd(ns_a, if_a, cidr_a), VethEnd(ns_b, if_b, cidr_b))
        self._auto_capture(link)
        return link

    # netem ----------------------------------------------------------------------------------------
    _tc_netem: bool | None = None  # does this kernel have sch_netem?  Probed on first use.

    def netem(self, ns: Namespace | None, ifname: str, spec: str, *, seed: int | None = None) -> str:
        """Impair ifname's egress like `tc qdisc replace dev <ifname> root netem <spec>`.

        ns: a rig namespace, or None / rig.root for the root namespace (only links this rig made).
        e.g. rig.netem(ns, link.b.ifname, "delay 20ms 5ms loss 5% reorder 10%").  Egress only: impair
        both ends for symmetric paths.  Call again to replace the settings; clear_netem() removes them.

        Uses the kernel's netem when it has one (returns "tc"); otherwise (returns "emulated") the
        NFQUEUE emulator above, which implements limit, delay TIME [JITTER] [distribution
        uniform|normal], loss [random] P, duplicate P, corrupt P, reorder P [gap N], rate R
        (correlations accepted and ignored).  EMBEDMESH_NETEM=tc|emulate forces one; seed makes the
        emulator's random choices repeatable.
        """
        target = ns or self.root
        if target.is_root and ifname not in self._root_links:
            raise ValueError(f"{ifname} is not a root-namespace link made by this rig")
        if not target.link_exists(ifname):
            raise ValueError(f"no link {ifname} in {target}")
        mode = os.environ.get(NETEM_ENV, "auto")
        if mode not in ("auto", "tc", "emulate"):
            raise ValueError(f"{NETEM_ENV} must be tc, emulate or unset")
        if mode != "emulate" and NetnsRig._tc_netem is not False:
            self._clear_emulation(target, ifname)
            proc = target.run(
                ["tc", "qdisc", "replace", "dev", ifname, "root", "netem", *shlex.split(spec)], check=False
            )
            if proc.returncode == 0:
                NetnsRig._tc_netem = True
                if target.is_root:
                    if ifname not in self._root_qdiscs:
                        self._root_qdiscs.append(ifname)
                        self._write_manifest()
                elif (target, ifname) not in self._ns_qdiscs:
                    self._ns_qdiscs.append((target, ifname))
                return "tc"
            if mode == "tc" or "qdisc kind is unknown" not in proc.stderr:
                raise RigError(f"tc netem {spec!r} on {ifname} failed: {proc.stderr.strip()}")
            NetnsRig._tc_netem = False
        self._emulate(target, ifname, spec, seed)
        return "emulated"

    def clear_netem(self, ns: Namespace | None, ifname: str) -> None:
        """Remove what netem() put on ifname."""
        target = ns or self.root
        if (target.name, ifname) in self._emulations:
            self._clear_emulation(target, ifname)
            return
        target.run(["tc", "qdisc", "del", "dev", ifname, "root"], check=False)
        if target.is_root and ifname in self._root_qdiscs:
            self._root_qdiscs.remove(ifname)
            self._write_manifest()
        elif (target, ifname) in self._ns_qdiscs:
            self._ns_qdiscs.remove((target, ifname))

    def netem_active(self, ns: Namespace | None, ifname: str) -> str | None:
        """What impairs ifname now: "tc" (a netem qdisc is installed), "emulated" (our NFQUEUE rule
        and a live worker), or None.  Read from the system, not from the rig's bookkeeping."""
        target = ns or self.root
        if " netem " in target.run(["tc", "qdisc", "show", "dev", ifname], check=False).stdout:
            return "tc"
        emulation = self._emulations.get((target.name, ifname))
        if emulation and emulation.process.poll() is None and shutil.which("iptables"):
            rules = target.run(
                ["iptables", "-w", "10", "-t", "mangle", "-S", "POSTROUTING"], check=False
            ).stdout
            if any(f"-o {ifname} " in r and "NFQUEUE" in r for r in rules.splitlines()):
                return "emulated"
        return None

    def netem_stats(self, ns: Namespace | None, ifname: str) -> dict[str, int] | None:
        """The emulator's counters for ifname (packets, dropped, duplicated, corrupted, reordered,
        overlimit) once clear_netem() or close() stopped it; None for kernel netem."""
        log = self.tmpdir / "netem-stats" / f"{(ns or self.root).name or 'root'}-{ifname}.json"
        return json.loads(log.read_text()) if log.exists() else None

    def _emulate(self, target: Namespace, ifname: str, spec: str, seed: int | None) -> None:
        parse_netem(spec)  # a bad spec fails here, in the test, not in the worker
        if shutil.which("iptables") is None:
            raise RigError(
                "this kernel has no sch_netem, and emulating it needs iptables: apt-get install iptables"
            )
        self._clear_emulation(target, ifname)
        if (target.is_root and ifname in self._root_qdiscs) or (target, ifname) in self._ns_qdiscs:
            self.clear_netem(target, ifname)  # a kernel netem qdisc from before EMBEDMESH_NETEM changed
        seed = random.randrange(1 << 30) if seed is None else seed
        mark = f"{NETEM_BYPASS_MARK:#x}/{NETEM_BYPASS_MARK:#x}"
        worker = target.popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "netem-worker",
                ifname,
                str(seed),
                hex(NETEM_BYPASS_MARK),
                spec,
            ],
            log_name=f"netem-{ifname}",
        )
        log_path: Path = worker.log_path  # type: ignore[attr-defined]
        wait_for(
            lambda: "ready queue=" in log_path.read_text() or worker.poll() is not None,
            10.0,
            0.02,
            f"the netem emulator on {ifname}",
        )
        text = log_path.read_text()
        m = re.search(r"ready queue=(\d+)", text)
        if worker.poll() is not None or not m:
            raise RigError(f"netem emulator on {ifname} failed:\n{text}")
        emulation = _Emulation(target, ifname, worker, [])
        self._emulations[(target.name, ifname)] = emulation
        for tool in ("iptables", "ip6tables"):
            if shutil.which(tool) is None:
                continue
            rule = [
                "-t",
                "mangle",
                "{op}",
                "POSTROUTING",
                "-o",
                ifname,
                "-m",
                "mark",
                "!",
                "--mark",
                mark,
                "-j",
                "NFQUEUE",
                "--queue-num",
                m.group(1),
            ]
            delete = [tool, "-w", "10", *(("-D" if r == "{op}" else r) for r in rule)]
            emulation.rules.append(delete)
            self._write_manifest()
            target.run([tool, "-w", "10", *(("-I" if r == "{op}" else r) for r in rule)])

    def _clear_emulation(self, target: Namespace, ifname: str) -> None:
        emulation = self._emulations.pop((target.name, ifname), None)
        if emulation is None:
            return
        for delete in emulation.rules:
            target.run(delete, check=False)
        self._write_manifest()
        self._terminate(emulation.process)  # it hands back the packets it holds
        log_path: Path | None = getattr(emulation.process, "log_path", None)
        m = (
            re.search(r"netem stats (\{.*\})", log_path.read_text())
            if log_path and log_path.exists()
            else None
        )
        if m:
            folder = self.tmpdir / "netem-stats"
            folder.mkdir(exist_ok=True)
            (folder / f"{target.name or 'root'}-{ifname}.json").write_text(m.group(1))

    # captures -------------------------------------------------------------------------------------
    def capture(
        self,
        ns: Namespace | None,
        ifname: str,
        bpf: str = "",
        name: str | None = None,
        directory: Path | str | None = None,
    ) -> Capture:
        """Start tcpdump on ifname (in ns, or the root namespace for None) writing a pcap.

        The file goes to the rig's temp folder (removed on close) unless ``directory`` is given.
        Read it with `tshark -r <path>` after ``capture.stop()``.
        """
        if shutil.which("tcpdump") is None:
            raise RigError("tcpdump not installed: apt-get install tcpdump")
        target = ns or self.root
        folder = Path(directory) if directory else self.tmpdir
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name or ifname}-{self.run_id}-{self._next()}.pcap"
        cmd = [
            "tcpdump",
            "-Z",
            "root",
            "--immediate-mode",
            "-U",
            "-n",
            "-s",
            "0",
            "-i",
            ifname,
            "-w",
            str(path),
            *shlex.split(bpf),
        ]
        proc = target.popen(cmd, log_name=f"tcpdump-{ifname}")
        # tcpdump prints "listening on ..." once the capture is live
        log_path: Path = proc.log_path  # type: ignore[attr-defined]
        wait_for(
            lambda: "listening on" in log_path.read_text(errors="replace") or proc.poll() is not None,
            10.0,
            0.05,
            f"tcpdump to start on {ifname}",
        )
        if proc.poll() is not None:
            raise RigError(f"tcpdump on {ifname} exited: {log_path.read_text(errors='replace')}")
        cap = Capture(path, proc)
        self._captures.append(cap)
        return cap

    def _auto_capture(self, link: VethLink) -> None:
        if self._pcap_dir is None:
            return
        end = link.b  # the namespace side always lives in a namespace we made
        self.capture(end.ns, end.ifname, directory=self._pcap_dir, name=f"{end.ns.name}-{end.ifname}")

    # wireguard-go ---------------------------------------------------------------------------------
    def start_wireguard(
        self,
        ns: Namespace,
        private_key: str | KeyPair | None = None,
        listen_port: int = 51820,
        addresses: Sequence[str] = (),
        mtu: int = 1420,
        *,
        ifname: str | None = None,
        log_level: str = "verbose",
        timeout: float = 10.0,
    ) -> WireGuardInterface:
        """Run `wireguard-go -f <ifname>` in ns, configure key/port, add overlay addresses, set mtu, up.

        private_key: base64 (or a KeyPair); a fresh key pair when None.  addresses: CIDRs inside
        100.64.0.0/10 or fd7a:115c:a1e0::/48 (e.g. "100.64.0.1/10", "fd7a:115c:a1e0::1/48"); the
        prefix becomes a connected route through the tunnel.  wireguard-go's log (LOG_LEVEL=log_level)
        is in ``.log_path``.
        """
        skip_reason = wireguard_unavailable_reason()
        if skip_reason:
            raise RigError(skip_reason)
        if ns.is_root:
            raise ValueError("wireguard-go peers run in a rig namespace, never in the root namespace")
        addrs = [_check_overlay(a) for a in addresses]
        if isinstance(private_key, KeyPair):
            keys = private_key
        elif private_key is None:
            keys = generate_keypair()
        else:
            keys = KeyPair(private_key, public_key(private_key))
        ifname = ifname or self._ifname("w")
        if len(ifname) > IFNAMSIZ:
            raise ValueError(f"interface name {ifname!r} is longer than {IFNAMSIZ} characters")
        sock = WIREGUARD_RUN_DIR / f"{ifname}.sock"
        if sock.exists():
            raise RigError(f"{sock} already exists: is another run using {ifname}?")
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL=log_level)
        proc = ns.popen(["wireguard-go", "-f", ifname], env=env, log_name=f"wireguard-go-{ifname}")
        self._sockets.append(sock)
        self._write_manifest()
        log_path: Path = proc.log_path  # type: ignore[attr-defined]
        wg_if = WireGuardInterface(self, ns, ifname, keys, listen_port, addrs, mtu, proc, log_path)
        self._wireguards.append(wg_if)

        def socket_ready() -> bool:
            if proc.poll() is not None:
                raise RigError(f"wireguard-go exited with {proc.returncode}:\n{wg_if.log()}")
            if not sock.exists():
                return False
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(str(sock))
                except OSError:
                    return False
            return True

        wait_for(socket_ready, timeout, 0.02, f"wireguard-go's UAPI socket {sock}")
        key_file = self._secret_file(keys.private, f"{ifname}.key")
        wg_if.wg("set", ifname, "private-key", str(key_file), "listen-port", str(listen_port))
        for a in addrs:
            extra = ["nodad"] if ipaddress.ip_interface(a).version == 6 else []
            ns.ip("addr", "add", a, "dev", ifname, *extra)
        ns.ip("link", "set", "dev", ifname, "mtu", str(mtu), "up")
        return wg_if

    # processes and files ------------------------------------------------------------------------
    def _popen(
        self, argv: list[str], *, log_name: str, in_root: bool, **kwargs: Any
    ) -> subprocess.Popen[Any]:
        log_path: Path | None = None
        if "stdout" not in kwargs and "stderr" not in kwargs:
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(log_name).name)
            log_path = self.tmpdir / f"{safe}-{self._next()}.log"
            log = open(log_path, "wb")  # noqa: SIM115 - handed to the child, closed below
            kwargs["stdout"] = log
            kwargs["stderr"] = subprocess.STDOUT
        else:
            log = None
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("start_new_session", True)
        try:
            proc = subprocess.Popen(argv, **kwargs)
        finally:
            if log is not None:
                log.close()
        proc.log_path = log_path  # type: ignore[attr-defined]
        proc.rig_own_session = bool(kwargs["start_new_session"])  # type: ignore[attr-defined]
        proc.in_root = in_root  # type: ignore[attr-defined]
        proc.start_time = _proc_start_time(proc.pid)  # type: ignore[attr-defined]
        self._processes.append(proc)
        self._write_manifest()
        return proc

    def _terminate(self, proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
        """SIGTERM (to its whole session when the rig gave it one), wait, then SIGKILL."""
        own_group = getattr(proc, "rig_own_session", False)

        def signal_it(sig: signal.Signals) -> None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if own_group:
                    os.killpg(proc.pid, sig)
                else:
                    proc.send_signal(sig)

        if proc.poll() is None:
            signal_it(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                signal_it(signal.SIGKILL)
                proc.wait(timeout)
        if own_group:  # anything it forked into its session and left behind
            signal_it(signal.SIGKILL)

    def _secret_file(self, secret_b64: str, name: str) -> Path:
        path = self.tmpdir / f"{name}-{self._next()}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret_b64 + "\n")
        return path

    def _write_manifest(self) -> None:
        data = {
            "pid": os.getpid(),
            "start_time": _proc_start_time(os.getpid()),
            "namespaces": [n.name for n in self._namespaces],
            "root_links": list(self._root_links),
            "sockets": [str(s) for s in self._sockets],
            "root_rules": [r for e in self._emulations.values() if e.ns.is_root for r in e.rules],
            "root_pids": [
                [p.pid, getattr(p, "start_time", None)]
                for p in self._processes
                if getattr(p, "in_root", False)
            ],
            "tmpdir": str(self.tmpdir),
        }
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.manifest_path)

    # inspection -------------------------------------------------------------------------------------
    @property
    def namespaces(self) -> list[Namespace]:
        return list(self._namespaces)

    @property
    def processes(self) -> list[subprocess.Popen[Any]]:
        return list(self._processes)

    @property
    def root_links(self) -> list[str]:
        return list(self._root_links)

    @property
    def wireguards(self) -> list[WireGuardInterface]:
        return list(self._wireguards)

    def logs(self, tail: int = 60) -> str:
        """The last lines of every process log (wireguard-go, tcpdump, ...), for failure reports."""
        parts = []
        for proc in self._processes:
            path = getattr(proc, "log_path", None)
            if path is None:
                continue
            try:
                lines = Path(path).read_text(errors="replace").splitlines()
            except OSError:
                continue
            cmd = shlex.join(proc.args) if isinstance(proc.args, list) else str(proc.args)
            parts.append(f"----- {cmd} (exit {proc.poll()}) -----\n" + "\n".join(lines[-tail:]))
        return "\n".join(parts)

    # cleanup --------------------------------------------------------------------------------------
    def close(self, raise_errors: bool = True) -> None:
        """Remove everything the rig made.  Idempotent.  Errors are collected, never stop the cleanup;
        at the end they raise RigCleanupError (raise_errors) or become a warning."""
        if self.closed:
            return
        self.closed = True
        errors: list[str] = []

        def attempt(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as e:
                errors.append(f"{what}: {e}")

        for cap in reversed(self._captures):
            attempt(f"stop capture {cap.path}", cap.stop)
        for ns_name, ifname in list(self._emulations):
            emulation = self._emulations[(ns_name, ifname)]
            attempt(
                f"stop netem emulation on {ifname}", lambda e=emulation: self._clear_emulation(e.ns, e.ifname)
            )  # type: ignore[misc]
        for proc in reversed(self._processes):
            attempt(f"stop {proc.args!r}", lambda p=proc: self._terminate(p))  # type: ignore[misc]
        for ns in reversed(self._namespaces):
            attempt(f"kill processes in {ns.name}", lambda n=ns: _kill_netns_pids(n.name))  # type: ignore[misc]
        for ns, ifname in reversed(self._ns_qdiscs):
            attempt(
                f"tc qdisc del {ifname} in {ns.name}",
                lambda n=ns, i=ifname: n.run(["tc", "qdisc", "del", "dev", i, "root"], check=False),
            )  # type: ignore[misc]
        for ifname in reversed(self._root_qdiscs):
            attempt(
                f"tc qdisc del {ifname}",
                lambda i=ifname: _run(["tc", "qdisc", "del", "dev", i, "root"], check=False),
            )  # type: ignore[misc]
        for ifname in reversed(self._root_links):
            attempt(f"ip link del {ifname}", lambda i=ifname: _delete_root_link(i))  # type: ignore[misc]
        for ns in reversed(self._namespaces):
            attempt(f"ip netns del {ns.name}", lambda n=ns: _delete_netns(n.name))  # type: ignore[misc]
        for sock in self._sockets:
            attempt(f"remove {sock}", lambda s=sock: s.unlink(missing_ok=True))  # type: ignore[misc]
        attempt(f"remove {self.tmpdir}", lambda: shutil.rmtree(self.tmpdir) if self.tmpdir.exists() else None)
        attempt(f"remove {self.manifest_path}", lambda: self.manifest_path.unlink(missing_ok=True))
        if errors:
            message = "rig cleanup incomplete:\n  " + "\n  ".join(errors)
            if raise_errors:
                raise RigCleanupError(message)
            warnings.warn(message, stacklevel=2)

    def __del__(self) -> None:  # last resort; tests should use the fixture or a with block
        if not getattr(self, "closed", True):
            with contextlib.suppress(Exception):
                self.close(raise_errors=False)


def _netns_exists(name: str) -> bool:
    return Path("/var/run/netns", name).exists() or Path("/run/netns", name).exists()


def _kill_netns_pids(name: str | None) -> None:
    if not name or not _netns_exists(name):
        return
    for _ in range(50):
        out = _run(["ip", "netns", "pids", name], check=False).stdout.split()
        pids = [int(p) for p in out if p.isdigit() and int(p) != os.getpid()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    raise RigError(f"processes still running in {name}")


def _delete_root_link(ifname: str) -> None:
    if Path("/sys/class/net", ifname).exists():
        _run(["ip", "link", "del", ifname], check=False)
        if Path("/sys/class/net", ifname).exists():
            raise RigError(f"{ifname} still exists")


def _delete_netns(name: str | None) -> None:
    if name and _netns_exists(name):
        _run(["ip", "netns", "del", name])


# --------------------------------------------------------------------------------------------------
# crashed runs


def sweep_stale() -> list[str]:
    """Remove what rigs whose process is gone left behind (SIGKILLed test runs).  Returns what it did.

    Only resources named in a manifest under /run/embedmesh-rig are touched, and only when the
    manifest's owner process (pid plus start time) no longer exists.
    """
    done: list[str] = []
    if os.geteuid() != 0 or not MANIFEST_DIR.is_dir():
        return done
    for manifest in sorted(MANIFEST_DIR.glob("*.json")):
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        pid, start = data.get("pid"), data.get("start_time")
        if isinstance(pid, int) and _proc_start_time(pid) is not None and _proc_start_time(pid) == start:
            continue  # its owner is still running
        for rule in data.get("root_rules", []):
            ours = bool(rule) and rule[0] in ("iptables", "ip6tables") and "NFQUEUE" in rule
            if ours and _run(rule, check=False).returncode == 0:
                done.append(f"rule {shlex.join(rule)}")
        for pid, start_time in data.get("root_pids", []):
            if start_time is not None and _proc_start_time(pid) == start_time:  # the very same process
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    done.append(f"process {pid}")
        for name in data.get("namespaces", []):
            with contextlib.suppress(Exception):
                _kill_netns_pids(name)
        for ifname in data.get("root_links", []):
            if ifname.startswith(NAME_PREFIX) and Path("/sys/class/net", ifname).exists():
                _run(["ip", "link", "del", ifname], check=False)
                done.append(f"link {ifname}")
        for name in data.get("namespaces", []):
            if name.startswith(f"{NAME_PREFIX}-") and _netns_exists(name):
                _run(["ip", "netns", "del", name], check=False)
                done.append(f"netns {name}")
        for sock in data.get("sockets", []):
            p = Path(sock)
            if p.parent == WIREGUARD_RUN_DIR and p.name.startswith(NAME_PREFIX) and p.exists():
                p.unlink(missing_ok=True)
                done.append(f"socket {sock}")
        tmpdir = data.get("tmpdir")
        if tmpdir and Path(tmpdir).name.startswith("embedmesh-rig-") and Path(tmpdir).is_dir():
            shutil.rmtree(tmpdir, ignore_errors=True)
            done.append(f"tmpdir {tmpdir}")
        manifest.unlink(missing_ok=True)
    return done


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "netem-worker":
        sys.exit(_netem_worker_main(sys.argv[2:]))
    sys.exit("usage: netns.py netem-worker IFNAME SEED MARK SPEC   (started by NetnsRig.netem)")
