"""MagicDNS: the tailnet's names, served in-process and to every peer.

- ``message``: the DNS wire format of the query path (strict, bounded parsers; no dnslib).
- ``records``: :class:`MagicZone`, the names a network map describes (rebuilt on every map).
- ``resolver``: :class:`Resolver`, the sans-IO core that answers locally or forwards, with a cache.
- ``upstream``: the host's resolvers (resolv.conf) and the anyio client that asks them.
- ``server``: :class:`DnsService`, the anyio driver: sockets at 100.100.100.100:53 on the overlay
  and on a local port, upstream exchanges, timers, and the node's stub resolver.

See docs/magicdns.md.
"""

from embedmesh.dns.records import MagicZone
from embedmesh.dns.resolver import Client, Resolver
from embedmesh.dns.server import SERVICE_V4, SERVICE_V6, DnsService
from embedmesh.dns.upstream import HostDnsConfig, ResolvConf, Upstream, parse_resolv_conf

__all__ = [
    "SERVICE_V4",
    "SERVICE_V6",
    "Client",
    "DnsService",
    "HostDnsConfig",
    "MagicZone",
    "ResolvConf",
    "Resolver",
    "Upstream",
    "parse_resolv_conf",
]
