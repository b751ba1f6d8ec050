"""Overlay address allocation: a stable IPv4 from 100.64.0.0/10 and an IPv6 derived from it.

The IPv6 address is ``fd7a:115c:a1e0::`` followed by the 32 bits of the IPv4 address, as Tailscale
does, so one number identifies both and the pool only tracks IPv4 addresses. Allocation takes the
lowest free address; an address is free only once the node holding it is gone (deleted or reaped
ephemeral), never while that node exists.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from embedmesh.control.errors import ControlError

IPV4_RANGE = IPv4Network("100.64.0.0/10")
IPV6_RANGE = IPv6Network("fd7a:115c:a1e0::/48")
#: ChromeOS uses this block for its own VMs (tailscale net/tsaddr), and 100.100.100.100 is the
#: MagicDNS service address.
RESERVED_V4 = (IPv4Network("100.115.92.0/23"), IPv4Network("100.100.100.100/32"))

_FIRST = int(IPV4_RANGE.network_address) + 1
_LAST = int(IPV4_RANGE.broadcast_address) - 1
_V6_BASE = int(IPV6_RANGE.network_address)


def ipv6_for(ipv4: IPv4Address) -> IPv6Address:
    """``fd7a:115c:a1e0::<ipv4 as the last 32 bits>``."""
    return IPv6Address(_V6_BASE | int(ipv4))


def _skip_reserved(value: int) -> int:
    """``value``, or the first address after the reserved block that contains it."""
    for net in RESERVED_V4:
        if int(net.network_address) <= value <= int(net.broadcast_address):
            return int(net.broadcast_address) + 1
    return value


class PoolExhaustedError(ControlError):
    code = "pool_exhausted"


class AddressPool:
    """The free/used bookkeeping of IPv4 overlay addresses (as integers).

    Free space is a heap of inclusive intervals, so a pool with gaps (deleted nodes) or a sparse
    restore costs memory per gap, not per address.
    """

    def __init__(self, used: Iterable[int] = ()) -> None:
        self._used: set[int] = set(used)
        self._free: list[tuple[int, int]] = []
        cursor = _FIRST
        for value in sorted(self._used):
            if value > cursor:
                self._free.append((cursor, value - 1))
            cursor = max(cursor, value + 1)
        if cursor <= _LAST:
            self._free.append((cursor, _LAST))
        heapq.heapify(self._free)

    def __contains__(self, address: IPv4Address) -> bool:
        return int(address) in self._used

    def __len__(self) -> int:
        return len(self._used)

    def allocate(self) -> IPv4Address:
        while self._free:
            start, end = heapq.heappop(self._free)
            value = _skip_reserved(start)
            if value > end:
                continue
            if value < end:
                heapq.heappush(self._free, (value + 1, end))
            if value in self._used:
                continue
            self._used.add(value)
            return IPv4Address(value)
        raise PoolExhaustedError("no free address left in 100.64.0.0/10: delete unused nodes")

    def release(self, address: IPv4Address) -> None:
        value = int(address)
        if value in self._used:
            self._used.discard(value)
            heapq.heappush(self._free, (value, value))
