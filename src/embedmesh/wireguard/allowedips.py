"""Cryptokey routing: the table from overlay prefixes to peers (whitepaper §2).

Sending, the destination address picks the peer (longest prefix wins); receiving, the source
address of a decrypted packet must map back to the peer that sent it. A prefix belongs to one peer
at a time: inserting it again moves it, as ``wg set`` does.

One hash table per prefix length, probed from the longest length present, makes a lookup a few dict
probes in C, with no per-bit trie walk in Python.
"""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Generic, TypeVar

T = TypeVar("T")
Network = IPv4Network | IPv6Network
_MISSING = object()


class _Family(Generic[T]):
    __slots__ = ("bits", "lengths", "tables")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.tables: dict[int, dict[int, T]] = {}
        self.lengths: list[int] = []

    def _reindex(self) -> None:
        self.lengths = sorted((n for n, t in self.tables.items() if t), reverse=True)


class AllowedIPs(Generic[T]):
    """A longest-prefix-match table over IPv4 and IPv6 prefixes."""

    __slots__ = ("_cache", "_v4", "_v6")

    def __init__(self) -> None:
        self._v4: _Family[T] = _Family(32)
        self._v6: _Family[T] = _Family(128)
        # Exact-address answers: a busy node talks to few addresses, and one dict probe beats the
        # per-length walk. Cleared on every change of the table, and when it grows too large.
        self._cache: dict[bytes, T | None] = {}

    def _family(self, network: Network) -> _Family[T]:
        return self._v4 if network.version == 4 else self._v6

    def insert(self, network: Network | str, value: T) -> None:
        """Route ``network`` (host bits are masked off) to ``value``."""
        net = ip_network(network, strict=False) if isinstance(network, str) else network
        family = self._family(net)
        key = int(net.network_address) >> (family.bits - net.prefixlen)
        family.tables.setdefault(net.prefixlen, {})[key] = value
        family._reindex()
        self._cache.clear()

    def remove(self, network: Network | str) -> None:
        net = ip_network(network, strict=False) if isinstance(network, str) else network
        family = self._family(net)
        table = family.tables.get(net.prefixlen)
        if table is not None:
            table.pop(int(net.network_address) >> (family.bits - net.prefixlen), None)
            family._reindex()
        self._cache.clear()

    def remove_value(self, value: T) -> None:
        """Drop every prefix that routes to ``value`` (a peer being removed)."""
        for family in (self._v4, self._v6):
            for table in family.tables.values():
                for key in [k for k, v in table.items() if v is value]:
                    del table[key]
            family._reindex()
        self._cache.clear()

    def lookup(self, address: bytes) -> T | None:
        """The value of the longest prefix containing ``address`` (4 or 16 raw bytes), or None."""
        cache = self._cache
        found = cache.get(address, _MISSING)
        if found is not _MISSING:
            return found  # type: ignore[return-value]
        if len(cache) >= 4096:
            cache.clear()
        found = cache[address] = self._walk(address)
        return found

    def _walk(self, address: bytes) -> T | None:
        family = self._v4 if len(address) == 4 else self._v6
        number = int.from_bytes(address, "big")
        bits = family.bits
        tables = family.tables
        for length in family.lengths:
            found = tables[length].get(number >> (bits - length))
            if found is not None:
                return found
        return None

    def entries(self) -> Iterator[tuple[Network, T]]:
        for family, cls in ((self._v4, IPv4Network), (self._v6, IPv6Network)):
            for length, table in family.tables.items():
                for key, value in table.items():
                    yield cls((key << (family.bits - length), length)), value

    def networks_of(self, value: T) -> list[Network]:
        """The prefixes routed to ``value``, sorted."""
        found = [net for net, v in self.entries() if v is value]
        return sorted(found, key=lambda n: (n.version, n.network_address, n.prefixlen))
