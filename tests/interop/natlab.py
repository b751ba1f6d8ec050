"""A NAT lab in network namespaces: an "internet", NAT routers of every kind, hosts behind them.

The Python form of the lab measured in ``/work/shared/natlab`` (its RESULTS.md is the matrix the
tests compare against). Built on :class:`netns.NetnsRig`, so every namespace and process the lab
makes is recorded in the rig's manifest and removed by ``close()`` (or, after a SIGKILLed run, by
``netns.sweep_stale``); namespace names carry the rig's random run id (``em-<runid>-<hint>``), so
parallel runs never collide. Nothing touches the root namespace: every veth is created directly
inside lab namespaces, and the lab's traffic stays on lab bridges::

    with NatLab() as lab:
        a = lab.host_behind("eim-apdf", "a")          # a router of that kind, a host on its LAN
        b = lab.host_behind("symmetric", "b")
        lab.inet.popen(["python3", "server.py", "203.0.113.1:3478"])
        a.run(["ping", "-c1", "203.0.113.1"])
        a.router.flush_conntrack()                    # the NAT forgets every mapping
        a.router.set_kind("udp-blocked")              # and now drops UDP

Address plan (TEST-NET-3 for the internet, 10.240.0.0/16 for LANs; none of it leaves the lab):

=====================  =========================================================================
internet               namespace ``inet``, bridge ``br0``, 203.0.113.0/24; 203.0.113.1 and .2 are
                       the servers' addresses (control, DERP, STUN)
router n (1, 2, ...)   WAN ``wan`` 203.0.113.(10+n) on the internet, or an address on its upstream
                       router's LAN (double NAT); LAN bridge ``lan`` 10.240.n.1/24
host on LAN n          ``eth0`` 10.240.n.10, .11, ...; default route via 10.240.n.1
public host (``none``) ``eth0`` 203.0.113.100, .101, ... directly on the internet
=====================  =========================================================================

NAT kinds (an nftables table ``ip natlab`` in the router's namespace; :data:`KINDS` adds the host
kinds ``none`` and ``double``):

``eim``
    endpoint-independent mapping (masquerade keeps the source port while the tuple is free) and
    endpoint-independent filtering ("full cone"): the router remembers every UDP mapping it made
    (external port -> internal address and port, in a dynamic nftables map filled after SNAT) and
    forwards unsolicited inbound UDP to a mapped port to its owner.
``eim-apdf``
    endpoint-independent mapping, address-and-port-dependent filtering: plain conntrack
    masquerade, the usual home router.
``symmetric``
    endpoint-dependent mapping for UDP (``masquerade fully-random``: a random external port for
    every new 5-tuple) with address-and-port-dependent filtering. TCP keeps plain masquerade, so
    a conntrack flush (``set_kind``) does not reset the host's open TCP connections.
``udp-blocked``
    only TCP to ports 80 and 443 (and ICMP) leaves the LAN; all UDP is dropped.

Every kind drops forwarded traffic by default (``ct state established,related`` comes back) and
drops unsolicited packets from the WAN to the router itself. The latter matters: an accepted
unsolicited UDP packet gets a *confirmed* conntrack entry, which then takes the tuple a later
outbound flow would have used, and masquerade picks another port; an "easy" NAT would turn hard
during a simultaneous open. Real home routers drop such packets, so the lab does too.

Kernel facts the lab depends on (measured in the shared lab): ``/proc/sys/net/*`` is per
namespace (ip_forward, rp_filter, the conntrack UDP timeouts, bridge-nf-call-iptables); with
``br_netfilter`` loaded, new namespaces start with ``bridge-nf-call-iptables=1``, which would send
bridged LAN traffic through the router's forward chain, so the lab turns it off everywhere. A UDP
flow keeps ``nf_conntrack_udp_timeout`` (30 s by default) until it has seen replies and stays
active for more than about 2 s; only then does it get ``nf_conntrack_udp_timeout_stream`` (120 s).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netns import Namespace, NetnsRig, RigError, _skip_or_fail, rig_unavailable_reason, wait_for

#: Router kinds (an nftables ruleset each).
ROUTER_KINDS = ("eim", "eim-apdf", "symmetric", "udp-blocked")
#: Host kinds of the matrix: a public host, one behind each router kind, one behind two NATs.
KINDS = ("none", "eim", "eim-apdf", "symmetric", "udp-blocked", "double")
#: What a "double" host sits behind: (outer router kind, inner router kind).
DOUBLE_NAT = ("eim-apdf", "eim-apdf")

INET_PREFIX = "203.0.113"
INET_NET = ipaddress.IPv4Network(f"{INET_PREFIX}.0/24")
LAN_PREFIX = "10.240"
#: The servers' addresses on the internet bridge.
SERVER_IPS = (f"{INET_PREFIX}.1", f"{INET_PREFIX}.2")
FIRST_PUBLIC_HOST = 100


def natlab_unavailable_reason() -> str | None:
    """Why the lab cannot run here (not root, tools missing), or None."""
    reason = rig_unavailable_reason()
    if reason:
        return reason
    for tool, package in (("nft", "nftables"), ("conntrack", "conntrack")):
        if shutil.which(tool) is None:
            return f"{tool} not installed: apt-get install {package}"
    return None


def skip_unless_natlab() -> None:
    """pytest.skip (or fail, under EMBEDMESH_REQUIRE_INTEROP=1) unless the lab can be built."""
    _skip_or_fail(natlab_unavailable_reason())


def ruleset(kind: str) -> str:
    """The nftables table ``ip natlab`` that makes a router of this kind (see the module doc)."""
    if kind not in ROUTER_KINDS:
        raise ValueError(f"unknown NAT kind {kind!r} (one of {', '.join(ROUTER_KINDS)})")
    lines = ["table ip natlab {"]
    if kind == "eim":
        # Endpoint-independent filtering. conntrack alone filters by address and port, so the
        # router keeps its own record of each UDP mapping, keyed by the external port (one owner
        # per port is enough for a lab). It is written after SNAT (priority srcnat + 10), when
        # the packet's source port is the external one, from the flow's original source.
        lines += [
            "  map eif_owner {",
            "    type inet_service : ipv4_addr . inet_service",
            "    flags dynamic, timeout",
            "    timeout 120s",
            "  }",
            "  chain learn_mapping {",
            "    type filter hook postrouting priority srcnat + 10; policy accept;",
            '    oifname "wan" meta l4proto udp update @eif_owner'
            " { udp sport timeout 120s : ct original ip saddr . ct original proto-src }",
            "  }",
            "  chain inbound_to_owner {",
            "    type nat hook prerouting priority dstnat; policy accept;",
            '    iifname "wan" meta l4proto udp dnat ip to udp dport map @eif_owner',
            "  }",
        ]
    lines += ["  chain outbound_nat {", "    type nat hook postrouting priority srcnat; policy accept;"]
    if kind == "symmetric":
        # Endpoint-dependent for UDP only. TCP keeps its port: after a conntrack flush, a TCP
        # flow's next segment is picked up again (nf_conntrack_tcp_loose) and must keep its
        # external port, or every open connection (DERP, control) of the host would be reset.
        lines.append('    oifname "wan" meta l4proto udp masquerade fully-random')
    lines += [
        '    oifname "wan" masquerade',
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy drop;",
        "    ct state established,related accept",
    ]
    if kind == "udp-blocked":
        lines += [
            '    iifname "lan" oifname "wan" tcp dport { 80, 443 } accept',
            '    iifname "lan" oifname "wan" meta l4proto icmp accept',
        ]
    else:
        lines.append('    iifname "lan" oifname "wan" accept')
    if kind == "eim":
        lines.append('    iifname "wan" ct status dnat accept')  # what inbound_to_owner let in
    lines += [
        "  }",
        "  chain to_router {",
        "    type filter hook input priority filter; policy accept;",
        '    iifname "wan" ct state established,related accept',
        '    iifname "wan" icmp type echo-request accept',
        # No ICMP answer and, above all, no confirmed conntrack entry (see the module doc).
        '    iifname "wan" drop',
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ConntrackEntry:
    """One line of ``conntrack -L``: the original and reply tuples, seconds left, flags."""

    proto: str
    timeout: int
    original: tuple[str, int, str, int]  # src, sport, dst, dport
    reply: tuple[str, int, str, int]
    assured: bool
    line: str


_TUPLE = re.compile(r"src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+)")


def parse_conntrack(text: str) -> list[ConntrackEntry]:
    """Parse ``conntrack -L`` output (lines like ``udp 17 28 src=... dst=... sport=...``)."""
    out: list[ConntrackEntry] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[2].isdigit():
            continue
        tuples = _TUPLE.findall(line)
        if len(tuples) < 2:
            continue
        (s1, d1, sp1, dp1), (s2, d2, sp2, dp2) = tuples[0], tuples[1]
        out.append(
            ConntrackEntry(
                parts[0],
                int(parts[2]),
                (s1, int(sp1), d1, int(dp1)),
                (s2, int(sp2), d2, int(dp2)),
                "[ASSURED]" in line,
                line,
            )
        )
    return out


class Router:
    """A NAT router of the lab: namespace, WAN address, LAN subnet, and its current kind."""

    def __init__(
        self, lab: NatLab, name: str, ns: Namespace, index: int, wan_ip: str, upstream: Router | None
    ) -> None:
        self.lab = lab
        self.name = name
        self.ns = ns
        self.index = index
        self.wan_ip = wan_ip
        self.upstream = upstream
        self.lan = ipaddress.IPv4Network(f"{LAN_PREFIX}.{index}.0/24")
        self.lan_ip = f"{LAN_PREFIX}.{index}.1"
        self.kind = ""
        self._next_host = 10
        self._next_port = 0

    def __repr__(self) -> str:
        return f"Router({self.name}, {self.kind}, wan {self.wan_ip}, lan {self.lan})"

    @property
    def public_ip(self) -> str:
        """The address the internet sees this router's hosts from (the outermost WAN)."""
        router: Router = self
        while router.upstream is not None:
            router = router.upstream
        return router.wan_ip

    def _take_lan_address(self) -> str:
        ip = f"{LAN_PREFIX}.{self.index}.{self._next_host}"
        self._next_host += 1
        return ip

    def _lan_port_name(self) -> str:
        self._next_port += 1
        return f"h{self._next_port}"

    def set_kind(self, kind: str) -> None:
        """Load this kind's ruleset in place of the current one and flush conntrack: every
        mapping is forgotten, as after a router reboot."""
        text = ruleset(kind)
        path = self.lab.tmpdir / f"nft-{self.name}-{kind}.conf"
        path.write_text(text)
        self.ns.run(["nft", "delete", "table", "ip", "natlab"], check=False)
        self.ns.run(["nft", "-f", str(path)])
        self.flush_conntrack()
        self.kind = kind

    def block_udp_with(self, ip: str) -> None:
        """A firewall rule on top of the NAT: drop UDP to and from ``ip`` (both directions, and
        flows already open too); everything else (STUN, DERP over TCP) still passes. Lifted by
        :meth:`unblock_udp` or by the next :meth:`set_kind`."""
        self.ns.run(["nft", "add", "chain", "ip", "natlab", "peer_block",
                     "{ type filter hook forward priority filter - 10; policy accept; }"])  # fmt: skip
        for direction in ("daddr", "saddr"):
            self.ns.run(["nft", "add", "rule", "ip", "natlab", "peer_block", "ip", direction, ip,
                         "meta", "l4proto", "udp", "drop"])  # fmt: skip

    def unblock_udp(self) -> None:
        """Remove every :meth:`block_udp_with` rule."""
        self.ns.run(["nft", "flush", "chain", "ip", "natlab", "peer_block"], check=False)
        self.ns.run(["nft", "delete", "chain", "ip", "natlab", "peer_block"], check=False)

    def flush_conntrack(self) -> None:
        """``conntrack -F``: drop every connection (and so every NAT mapping) the router tracks."""
        # Exit 1 with "0 flow entries" on an empty table is fine.
        self.ns.run(["conntrack", "-F"], check=False)

    def conntrack(self, proto: str = "udp") -> list[ConntrackEntry]:
        """The router's tracked connections of one protocol."""
        out = self.ns.run(["conntrack", "-L", "-p", proto], check=False).stdout
        return parse_conntrack(out)

    def set_udp_timeouts(self, udp: int, stream: int) -> None:
        """The conntrack UDP timeouts of this router (per namespace): ``udp`` for a flow that has
        not (yet) been bidirectional for a while, ``stream`` for one that has."""
        self.ns.run(
            [
                "sysctl",
                "-q",
                "-w",
                f"net.netfilter.nf_conntrack_udp_timeout={int(udp)}",
                f"net.netfilter.nf_conntrack_udp_timeout_stream={int(stream)}",
            ]
        )

    def udp_timeouts(self) -> tuple[int, int]:
        def read(name: str) -> int:
            return int(self.ns.run(["sysctl", "-n", f"net.netfilter.{name}"]).stdout.strip())

        return read("nf_conntrack_udp_timeout"), read("nf_conntrack_udp_timeout_stream")


@dataclass
class LabHost:
    """A host of the lab: its namespace, its address, the router it sits behind (None: public)."""

    lab: NatLab
    name: str
    ns: Namespace
    ip: str
    router: Router | None
    kind: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"LabHost({self.name}, {self.kind}, {self.ip})"

    @property
    def public_ip(self) -> str:
        return self.router.public_ip if self.router is not None else self.ip

    @property
    def routers(self) -> list[Router]:
        """The routers between this host and the internet, nearest first."""
        out: list[Router] = []
        router = self.router
        while router is not None:
            out.append(router)
            router = router.upstream
        return out

    def run(self, cmd: str | Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.ns.run(cmd, **kwargs)

    def popen(self, cmd: str | Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return self.ns.popen(cmd, **kwargs)


class NatLab:
    """The internet namespace, and the routers and hosts added to it; close() removes them all.

    Pass a :class:`NetnsRig` to share one (the lab then leaves closing it to the owner), or let
    the lab make and close its own.
    """

    def __init__(self, rig: NetnsRig | None = None) -> None:
        reason = natlab_unavailable_reason()
        if reason:
            raise RigError(reason)
        self._owns_rig = rig is None
        self.rig = rig or NetnsRig()
        self.routers: dict[str, Router] = {}
        self.hosts: dict[str, LabHost] = {}
        self._next_router = 1
        self._next_public = FIRST_PUBLIC_HOST
        self._next_inet_port = 0
        try:
            self.inet = self._namespace("inet")
            self.inet.ip("link", "add", "br0", "type", "bridge")
            for ip in SERVER_IPS:
                self.inet.ip("addr", "add", f"{ip}/24", "dev", "br0")
            self.inet.ip("link", "set", "br0", "up")
        except BaseException:
            self.close(raise_errors=False)
            raise

    # context manager --------------------------------------------------------------------------
    def __enter__(self) -> NatLab:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(raise_errors=exc_type is None)

    def close(self, raise_errors: bool = True) -> None:
        """Remove everything (when the lab made its rig; otherwise the rig's owner does)."""
        if self._owns_rig:
            self.rig.close(raise_errors=raise_errors)

    @property
    def tmpdir(self) -> Path:
        return self.rig.tmpdir

    # building ---------------------------------------------------------------------------------
    def _namespace(self, hint: str) -> Namespace:
        ns = self.rig.add_namespace(hint)
        settings = [
            "net.ipv4.conf.all.rp_filter=0",  # asymmetric paths through NATs must not be dropped
            "net.ipv4.conf.default.rp_filter=0",
            # no IPv6: no router advertisements, no link-local candidates for the peers to chase
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ]
        ns.run(["sysctl", "-q", "-w", *settings])
        # Only present when br_netfilter is loaded; then it defaults to 1 in a new namespace.
        ns.run(["sh", "-c", "f=/proc/sys/net/bridge/bridge-nf-call-iptables; [ ! -e $f ] || echo 0 > $f"])
        return ns

    def _plug_into_internet(self, ns: Namespace, ifname: str) -> None:
        self._next_inet_port += 1
        port = f"p{self._next_inet_port}"
        # Both ends are created where they live: nothing ever appears in the root namespace.
        ns.ip("link", "add", ifname, "type", "veth", "peer", "name", port, "netns", self.inet.name or "")
        self.inet.ip("link", "set", port, "master", "br0", "up")

    def _plug_into_lan(self, ns: Namespace, ifname: str, router: Router) -> str:
        port = router._lan_port_name()
        ns.ip("link", "add", ifname, "type", "veth", "peer", "name", port, "netns", router.ns.name or "")
        router.ns.ip("link", "set", port, "master", "lan", "up")
        return router._take_lan_address()

    def add_router(self, name: str, kind: str, upstream: Router | None = None) -> Router:
        """A NAT router of ``kind``: WAN on the internet, or on ``upstream``'s LAN (double NAT)."""
        if name in self.routers or name in self.hosts:
            raise ValueError(f"the lab already has {name!r}")
        index = self._next_router
        if index > 80:
            raise RigError("the lab's address plan has room for 80 routers")
        self._next_router += 1
        ns = self._namespace(f"r{name}")
        if upstream is None:
            wan_ip = f"{INET_PREFIX}.{10 + index}"
            self._plug_into_internet(ns, "wan")
            gateway = SERVER_IPS[0]
        else:
            wan_ip = self._plug_into_lan(ns, "wan", upstream)
            gateway = upstream.lan_ip
        ns.ip("addr", "add", f"{wan_ip}/24", "dev", "wan")
        ns.ip("link", "set", "wan", "up")
        ns.ip("route", "add", "default", "via", gateway, "dev", "wan")
        ns.ip("link", "add", "lan", "type", "bridge")
        ns.ip("addr", "add", f"{LAN_PREFIX}.{index}.1/24", "dev", "lan")
        ns.ip("link", "set", "lan", "up")
        ns.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        router = Router(self, name, ns, index, wan_ip, upstream)
        router.set_kind(kind)
        self.routers[name] = router
        return router

    def add_host(self, name: str, router: Router | None, kind: str | None = None) -> LabHost:
        """A host on ``router``'s LAN, or (None) a public host directly on the internet."""
        if name in self.routers or name in self.hosts:
            raise ValueError(f"the lab already has {name!r}")
        ns = self._namespace(name)
        if router is None:
            ip = f"{INET_PREFIX}.{self._next_public}"
            self._next_public += 1
            self._plug_into_internet(ns, "eth0")
            gateway = SERVER_IPS[0]
        else:
            ip = self._plug_into_lan(ns, "eth0", router)
            gateway = router.lan_ip
        ns.ip("addr", "add", f"{ip}/24", "dev", "eth0")
        ns.ip("link", "set", "eth0", "up")
        ns.ip("route", "add", "default", "via", gateway, "dev", "eth0")
        host = LabHost(self, name, ns, ip, router, kind or (router.kind if router else "none"))
        self.hosts[name] = host
        return host

    def host_behind(self, kind: str, name: str) -> LabHost:
        """A host of a matrix kind (:data:`KINDS`) with routers of its own: ``none`` is public,
        ``double`` sits behind :data:`DOUBLE_NAT`, the others behind one router of that kind
        (named ``<name>-r``)."""
        if kind == "none":
            return self.add_host(name, None, "none")
        if kind == "double":
            outer = self.add_router(f"{name}-o", DOUBLE_NAT[0])
            inner = self.add_router(f"{name}-i", DOUBLE_NAT[1], upstream=outer)
            return self.add_host(name, inner, "double")
        if kind not in ROUTER_KINDS:
            raise ValueError(f"unknown host kind {kind!r} (one of {', '.join(KINDS)})")
        return self.add_host(name, self.add_router(f"{name}-r", kind), kind)

    # inspection -------------------------------------------------------------------------------
    def namespace_names(self) -> list[str]:
        return [n.name or "" for n in self.rig.namespaces]

    @contextlib.contextmanager
    def capture(self, ns: Namespace, ifname: str, bpf: str = "") -> Iterator[Path]:
        """tcpdump on ``ifname`` in ``ns`` for the block; yields the pcap path (complete after the
        block)."""
        cap = self.rig.capture(ns, ifname, bpf)
        try:
            yield cap.path
        finally:
            cap.stop()


# --------------------------------------------------------------------------------------------------
# a tailnet in the lab: control, DERP and STUN on the internet; tailscaled and embedmesh on hosts

#: Where the servers listen. Control and DERP use ports 80 and 443, the only TCP ports a
#: "udp-blocked" router lets out (as corporate firewalls do).
CONTROL_LISTEN = f"{SERVER_IPS[0]}:80"
EMBEDMESH_DERP_LISTEN = f"{SERVER_IPS[0]}:443"
DERPER_LISTEN = f"{SERVER_IPS[1]}:80"
STUN_PORT = 3478
DERP_REGION = 900
DERP_REGION_CODE = "lab"
DERP_SERVERS = ("embedmesh", "derper", "embedded")


def derp_map(derp: str) -> dict[str, Any] | None:
    """The lab's DERP map (one region, 900 "lab") for ``--derp-map``; None for "embedded", whose
    region the control server publishes itself.

    ``embedmesh``: `embedmesh derp serve` on 203.0.113.1:443 with its STUN server on :3478, and
    derper's STUN on 203.0.113.2:3478 as a STUN-only node of the region (netcheck learns whether a
    NAT's mapping varies by destination only from two STUN addresses). ``derper``: derper on
    203.0.113.2:80, its STUN on :3478. ``embedded``: the control server's own relay on
    203.0.113.1:443 and its STUN on :3478 (region 999).
    """
    if derp not in DERP_SERVERS:
        raise ValueError(f"derp must be one of {DERP_SERVERS}")
    if derp == "embedded":
        return None
    stun_ip = SERVER_IPS[1]
    if derp == "embedmesh":
        host, port = EMBEDMESH_DERP_LISTEN.split(":")
        nodes = [
            {"Name": "900a", "RegionID": DERP_REGION, "HostName": host, "IPv4": host,
             "DERPPort": int(port), "STUNPort": STUN_PORT, "InsecureForTests": True},
            {"Name": "900s", "RegionID": DERP_REGION, "HostName": stun_ip, "IPv4": stun_ip,
             "STUNPort": STUN_PORT, "STUNOnly": True, "InsecureForTests": True},
        ]  # fmt: skip
    else:
        host, port = DERPER_LISTEN.split(":")
        nodes = [
            {"Name": "900a", "RegionID": DERP_REGION, "HostName": host, "IPv4": host,
             "DERPPort": int(port), "STUNPort": STUN_PORT, "InsecureForTests": True},
        ]  # fmt: skip
    region = {
        "RegionID": DERP_REGION,
        "RegionCode": DERP_REGION_CODE,
        "RegionName": "the NAT lab",
        "Nodes": nodes,
    }
    return {"Regions": {str(DERP_REGION): region}}


class _StateDirs:
    """What tailnet.Tailscaled needs of a TailnetRig: fresh 0700 folders in the rig's temp folder."""

    def __init__(self, tmpdir: Path) -> None:
        self.tmpdir = tmpdir
        self._n = 0

    def state_dir(self, name: str) -> Path:
        self._n += 1
        path = self.tmpdir / f"{name}-{self._n}"
        path.mkdir(mode=0o700)
        return path


def _log_text(proc: subprocess.Popen[Any]) -> str:
    path = getattr(proc, "log_path", None)
    if path is None:
        return ""
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


class LabTailnet:
    """``embedmesh control serve`` on the lab's internet, with a DERP region and STUN (see
    :func:`derp_map` for the three ``derp`` choices); tailscaled and embedmesh nodes on lab hosts
    join it."""

    def __init__(self, lab: NatLab, bins: Any, derp: str = "embedmesh") -> None:
        import tailnet as _tailnet

        self._tailnet = _tailnet
        self.lab = lab
        self.bins = bins
        self.derp = derp
        self.dirs = _StateDirs(lab.tmpdir)
        state = self.dirs.state_dir("control")
        self.state = state
        self.url = f"http://{CONTROL_LISTEN}"
        env = _tailnet.child_env()
        self.processes: dict[str, subprocess.Popen[Any]] = {}
        if derp in ("embedmesh", "derper"):
            if bins is None:
                raise RigError("the lab's derper (STUN, or the relay) needs the Tailscale binaries")
            self.processes["derper"] = lab.inet.popen(
                [str(bins.derper), "-a", DERPER_LISTEN, "-http-port", "-1", "-stun-port", str(STUN_PORT),
                 "-c", str(state / "derper.json")],
                log_name="derper", env=env,
            )  # fmt: skip
        if derp == "embedmesh":
            self.processes["derp"] = lab.inet.popen(
                [sys.executable, "-m", "embedmesh.cli.main", "derp", "serve", "--listen", EMBEDMESH_DERP_LISTEN,
                 "--key-file", str(state / "embedmesh-derp.json"), "--stun-port", str(STUN_PORT)],
                log_name="embedmesh-derp", env=env,
            )  # fmt: skip
        serve = [sys.executable, "-m", "embedmesh.cli.main", "control", "serve", "--listen", CONTROL_LISTEN,
                 "--state-dir", str(state)]  # fmt: skip
        the_map = derp_map(derp)
        if the_map is None:
            host, port = EMBEDMESH_DERP_LISTEN.split(":")
            serve += ["--derp-port", port, "--derp-host", host, "--stun-port", str(STUN_PORT)]
        else:
            map_file = state / "derp-map.json"
            map_file.write_text(json.dumps(the_map, indent=1))
            # Only the lab's region: the embedded relay would be a second one, on a port that
            # "udp-blocked" routers do not let out.
            serve += ["--derp-map", str(map_file), "--no-derp"]
        self.processes["control"] = lab.inet.popen(serve, log_name="embedmesh-control", env=env)
        self._wait_ready()
        self._key: str | None = None

    def _wait_ready(self, timeout: float = 30.0) -> None:
        checks = [("control", CONTROL_LISTEN, "/health")]
        if self.derp == "derper":
            checks.append(("derper", DERPER_LISTEN, "/derp/probe"))
        else:  # embedmesh's relay, standalone or embedded in the control server
            checks.append(("derp", EMBEDMESH_DERP_LISTEN, "/derp/probe"))

        def ready() -> bool:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise RigError(f"{name} exited with {proc.returncode}:\n{_log_text(proc)[-3000:]}")
            for _name, listen, path in checks:
                probe = [
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-m",
                    "2",
                    "-w",
                    "%{http_code}",
                    f"http://{listen}{path}",
                ]
                if self.lab.inet.run(probe, check=False).stdout.strip() != "200":
                    return False
            return True

        wait_for(ready, timeout=timeout, interval=0.1, what="control and DERP in the lab")

    def cli(self, *args: str) -> str:
        """`embedmesh control ARGS --state-dir S` in the internet namespace; its stdout."""
        argv = [sys.executable, "-m", "embedmesh.cli.main", "control", *args, "--state-dir", str(self.state)]
        return self.lab.inet.run(argv, env=self._tailnet.child_env()).stdout

    def authkey(self) -> str:
        """One reusable, pre-approved auth key for every node of the lab (made once)."""
        if self._key is None:
            out = self.cli("authkey", "create", "--reusable", "--preapproved", "--expiry", "2h", "--json")
            self._key = str(json.loads(out)["key"])
        return self._key

    def tailscaled(self, host: LabHost, name: str | None = None) -> LabTailscaled:
        """tailscaled (userspace networking) on host, started and `tailscale up` (not waited for:
        call ``wait_up()``)."""
        return LabTailscaled(self, host, name or host.name)

    def embedmesh(self, host: LabHost, name: str | None = None) -> LabEmbedmesh:
        """`embedmesh up` on host, with a SOCKS5 proxy and the lab's service ports served."""
        return LabEmbedmesh(self, host, name or f"em-{host.name}")

    def logs(self, tail: int = 40) -> str:
        parts = []
        for name, proc in self.processes.items():
            lines = _log_text(proc).splitlines()[-tail:]
            parts.append(f"----- {name} (exit {proc.poll()}) -----\n" + "\n".join(lines))
        return "\n".join(parts)


#: Set to 1: embedmesh nodes log at debug level (``embedmesh -vv up``).
DEBUG_ENV = "EMBEDMESH_NATLAB_DEBUG"
#: The TCP services every lab host runs on its loopback, and serves to the tailnet: tailscaled's
#: userspace netstack forwards tailnet TCP to 127.0.0.1 of its namespace, `embedmesh up --serve`
#: does the same.
ECHO_PORT = 7000
SINK_PORT = 7001
TOOLS = Path(__file__).resolve().parent / "natlab_tools.py"


@dataclass
class PeerPath:
    """How a node reaches one peer right now."""

    kind: str  # "direct", "derp" or "none"
    address: str  # "ip:port" when direct, the DERP region code when relayed, "" otherwise


class LabPeer:
    """What the matrix needs of any node in the lab (tailscaled or embedmesh)."""

    host: LabHost
    name: str
    socks: str  # the node's SOCKS5 proxy, on its namespace's loopback

    def start_services(self) -> None:
        """The echo and sink servers on the host's loopback (once per host)."""
        if self.host.extra.get("services"):
            return
        for command, port, extra in (("echo", ECHO_PORT, []), ("sink", SINK_PORT, ["--every", "0.25"])):
            proc = self.host.popen(
                [sys.executable, str(TOOLS), command, f"127.0.0.1:{port}", *extra],
                log_name=f"{command}-{self.host.name}",
            )
            self.host.extra[command] = proc
            wait_for(lambda p=proc: "listening" in _log_text(p), 10, 0.05, f"{command} on {self.host.name}")  # type: ignore[misc]
        self.host.extra["services"] = True

    def ipv4(self) -> str:
        raise NotImplementedError

    def path_to(self, peer: LabPeer) -> PeerPath:
        raise NotImplementedError

    def echo(self, peer: LabPeer, payload: str = "natlab hello", timeout: float = 20.0) -> dict[str, Any]:
        """One TCP round trip to the peer's echo service through this node's SOCKS5 proxy:
        ``{"connect_s", "ttfb_s", "echo", "started"}`` (started: wall-clock time of the connect)."""
        started = time.time()
        out = self.host.run(
            [sys.executable, str(TOOLS), "echo-client", f"{peer.ipv4()}:{ECHO_PORT}", "--socks", self.socks,
             "--payload", payload, "--timeout", str(timeout)],
            timeout=timeout + 10, check=False,
        )  # fmt: skip
        if out.returncode != 0:
            raise RigError(f"echo from {self.name} to {peer.name} failed: {out.stdout} {out.stderr}")
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        result["started"] = started
        return result


class LabTailscaled(LabPeer):
    """A tailscaled in a lab host, joined to the lab's tailnet."""

    def __init__(self, net: LabTailnet, host: LabHost, name: str) -> None:
        tailnet = net._tailnet
        self.net = net
        self.host = host
        self.name = name
        self.socks = f"127.0.0.1:{tailnet.Tailscaled.socks5_port}"
        self.ts = tailnet.Tailscaled(net.dirs, net.bins, name, tailnet.Host(host.ns, host.ip, name))  # type: ignore[arg-type]
        self.ts.start()
        self._wait_up = self.ts.up_async(net.url, net.authkey(), timeout=60)
        self._ip: str | None = None
        self._api: Any = None

    def wait_up(self) -> None:
        self._wait_up()

    def status(self) -> dict[str, Any]:
        """tailscaled's status (`tailscale status --json`), read from its LocalAPI socket: a poll
        costs no process."""
        import httpx

        if self._api is None:
            self._api = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.ts.socket)), timeout=5)
        reply = self._api.get("http://local-tailscaled.sock/localapi/v0/status")
        reply.raise_for_status()
        return reply.json()  # type: ignore[no-any-return]

    def ipv4(self) -> str:
        if self._ip is None:
            self._ip = self.ts.ipv4()
        return self._ip

    def _peer_status(self, peer: LabPeer) -> dict[str, Any] | None:
        want = peer.ipv4()
        for p in (self.status().get("Peer") or {}).values():
            if want in (p.get("TailscaleIPs") or []):
                return p  # type: ignore[no-any-return]
        return None

    def path_to(self, peer: LabPeer) -> PeerPath:
        p = self._peer_status(peer)
        if p is None:
            return PeerPath("none", "")
        if p.get("CurAddr"):
            return PeerPath("direct", str(p["CurAddr"]))
        if p.get("Relay") and (p.get("RxBytes") or 0) > 0:
            return PeerPath("derp", str(p["Relay"]))
        return PeerPath("none", "")

    def close(self) -> None:
        if self._api is not None:
            self._api.close()


class LabEmbedmesh(LabPeer):
    """`embedmesh up` in a lab host: a node of the lab's tailnet, with a SOCKS5 proxy into it and
    the host's echo and sink services served on the same ports."""

    socks_port = 1080

    def __init__(self, net: LabTailnet, host: LabHost, name: str) -> None:
        from embedmesh.localapi import SOCKET_NAME

        self.net = net
        self.host = host
        self.name = name
        self.socks = f"127.0.0.1:{self.socks_port}"
        self.state = net.dirs.state_dir(f"embedmesh-{name}")
        key_file = self.state / "authkey"
        key_file.write_text(net.authkey())
        key_file.chmod(0o600)
        self.socket = self.state / SOCKET_NAME
        env = net._tailnet.child_env()
        argv = [
            sys.executable, "-m", "embedmesh.cli.main", *(["-vv"] if os.environ.get(DEBUG_ENV) else []),
            "up", "--control-url", net.url,
            "--auth-key", f"file:{key_file}", "--hostname", name, "--state-dir", str(self.state),
            "--socks5", self.socks,
            "--serve", f"{ECHO_PORT}=127.0.0.1:{ECHO_PORT}", "--serve", f"{SINK_PORT}=127.0.0.1:{SINK_PORT}",
        ]  # fmt: skip
        self.process = host.popen(argv, log_name=f"embedmesh-{name}", env=env)
        self._ip: str | None = None
        self._api: Any = None

    def status(self) -> dict[str, Any]:
        """The node's status from its local API (what `embedmesh status --json` prints)."""
        import httpx

        if self.process.poll() is not None:
            raise RigError(
                f"embedmesh up {self.name} exited with {self.process.returncode}:\n{self.log()[-3000:]}"
            )
        if self._api is None:
            self._api = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), timeout=5)
        reply = self._api.get("http://embedmesh/v1/status")
        reply.raise_for_status()
        return reply.json()  # type: ignore[no-any-return]

    def wait_up(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if not self.socket.exists():
                if self.process.poll() is not None:
                    self.status()  # raises with the log
                return False
            try:
                return bool(self.status().get("ready"))
            except (OSError, RigError) as exc:
                if isinstance(exc, RigError):
                    raise
                return False
            except Exception:  # the local API is still starting
                return False

        wait_for(ready, timeout=timeout, interval=0.1, what=f"embedmesh node {self.name} to be up")

    def ipv4(self) -> str:
        if self._ip is None:
            self._ip = next(a.split("/")[0] for a in self.status()["addresses"] if ":" not in a)
        return self._ip

    def path_to(self, peer: LabPeer) -> PeerPath:
        want = peer.ipv4()
        for p in self.status()["peers"]:
            if want in [a.split("/")[0] for a in p.get("addresses") or []]:
                kind = str(p.get("path") or "none")
                address = p.get("path_address")
                if isinstance(address, list):
                    address = f"{address[0]}:{address[1]}"
                return PeerPath(kind, str(address or ""))
        return PeerPath("none", "")

    def log(self) -> str:
        return _log_text(self.process)

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
