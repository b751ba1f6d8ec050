"""A Linux TUN device as a :class:`~embedmesh.runtime.links.Link`: the overlay stack face to face
with the kernel's own TCP/IP.

This is for tests and benchmarks, not for applications: opening a TUN device needs
``CAP_NET_ADMIN`` (root), which is exactly what embedmesh exists to avoid. The interop suite
creates the device in the root namespace with :func:`open_tun`, moves it into a network namespace
(``ip link set <name> netns <ns>``; the file descriptor stays attached to the device), configures
the kernel's side there (addresses, MTU, up) and runs curl, socat or Python against the stack
through it.

The device is opened with ``IFF_TUN | IFF_NO_PI``: every ``read`` returns one bare IP packet and
every ``write`` takes one, which is what :class:`~embedmesh.netstack.stack.Netstack` speaks. No
offloads are requested (no ``IFF_VNET_HDR``, no ``TUNSETOFFLOAD``), so the kernel segments and
checksums everything before it reaches us, and expects complete packets back. The device is not
persistent: closing the descriptor deletes it, wherever it lives by then.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
from collections import Counter

from embedmesh.runtime.links import Deliver

logger = logging.getLogger("embedmesh.runtime")

TUN_DEVICE = "/dev/net/tun"
#: ``_IOW('T', 202, int)`` from <linux/if_tun.h>.
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
#: Refuse to attach to a device that already exists (Linux ≥ 3.8): a test never shares one.
IFF_TUN_EXCL = 0x8000
IFNAMSIZ = 16
#: ``struct ifreq``: the name, the flags, then padding to 40 bytes.
_IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")
#: Largest IP packet a TUN device can hand over (IPv4/IPv6 total length without jumbograms).
MAX_PACKET = 65535
#: Packets read per :meth:`TunLink.read` call. The reader task comes back at once if more wait; the
#: bound only lets the stack's output and the application run between batches.
DEFAULT_READ_BATCH = 256


def open_tun(name: str, *, exclusive: bool = True) -> int:
    """Create the TUN device ``name`` and return its non-blocking, close-on-exec descriptor.

    Needs CAP_NET_ADMIN. The device appears DOWN and without addresses in the caller's network
    namespace; it disappears when the descriptor is closed.
    """
    encoded = name.encode()
    if not encoded or len(encoded) >= IFNAMSIZ:
        raise ValueError(f"TUN device name {name!r} must have 1 to {IFNAMSIZ - 1} characters")
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise OSError(errno.ENODEV, f"{TUN_DEVICE} is missing: load the tun module (modprobe tun)") from None
    flags = IFF_TUN | IFF_NO_PI | (IFF_TUN_EXCL if exclusive else 0)
    try:
        fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(encoded, flags))
    except PermissionError:
        os.close(fd)
        raise PermissionError(
            errno.EPERM, f"creating TUN device {name} needs CAP_NET_ADMIN (run the interop tests as root)"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


class TunLink:
    """A TUN device carrying the overlay's IP packets (for tests and benchmarks; see the module).

    ``read`` drains up to ``read_batch`` packets per call; ``send`` writes one packet at once, and
    a packet the device cannot take (its queue is full, or it is down) is dropped and counted, like
    a full NIC ring: TCP recovers, UDP was never promised delivery.
    """

    def __init__(self, fd: int, name: str, *, read_batch: int = DEFAULT_READ_BATCH) -> None:
        self.fd = fd
        self.name = name
        self.read_batch = read_batch
        self.counters: Counter[str] = Counter()
        self._closed = False

    @classmethod
    def create(cls, name: str, *, read_batch: int = DEFAULT_READ_BATCH) -> TunLink:
        """Create the device (see :func:`open_tun`) and wrap it."""
        return cls(open_tun(name), name, read_batch=read_batch)

    def __repr__(self) -> str:
        return f"TunLink({self.name!r}, fd={self.fd}{', closed' if self._closed else ''})"

    # ------------------------------------------------------------------ Link

    def readables(self) -> list[socket.socket | int]:
        return [self.fd]

    def read(self, readable: socket.socket | int, deliver: Deliver, now: float) -> None:
        fd = self.fd
        read = os.read
        count = 0
        try:
            while count < self.read_batch:
                try:
                    packet = read(fd, MAX_PACKET)
                except BlockingIOError:
                    break
                except InterruptedError:
                    continue
                if not packet:
                    break
                count += 1
                deliver(packet, now)
        finally:
            self.counters["rx_packets"] += count

    def send(self, packet: bytes) -> None:
        try:
            os.write(self.fd, packet)
        except BlockingIOError:
            self.counters["drop_tx_full"] += 1
            return
        except OSError as exc:
            # EIO: the device is down; EINVAL: not an IP packet the kernel accepts.
            self.counters[f"drop_tx_{errno.errorcode.get(exc.errno or 0, 'error').lower()}"] += 1
            return
        self.counters["tx_packets"] += 1

    def flush(self) -> None:
        """Nothing to do: every packet was written in :meth:`send`."""

    def next_deadline(self) -> float | None:
        return None

    def handle_timeout(self, now: float) -> None:
        pass

    def close(self) -> None:
        """Close the descriptor, which deletes the device. Safe to call twice."""
        if not self._closed:
            self._closed = True
            os.close(self.fd)
