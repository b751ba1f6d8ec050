"""wg-quick configuration files: parse the text a plain WireGuard network hands out.

The format is the union of what wg(8) reads (``PrivateKey``, ``ListenPort``, ``FwMark``; a peer's
``PublicKey``, ``PresharedKey``, ``AllowedIPs``, ``Endpoint``, ``PersistentKeepalive``) and what
wg-quick(8) adds for the OS interface (``Address``, ``DNS``, ``MTU``, ``Table``, the ``Pre``/``Post``
hooks, ``SaveConfig``). Both tools match keys case-insensitively, cut comments at the first ``#`` and
trim whitespace around keys and values; so does :func:`parse_wireguard_config`.

embedmesh has no OS interface, so the keys that only configure one (routing table, hooks, firewall
mark, writing the file back) cannot be honoured: they are accepted, skipped and listed in
:attr:`WireGuardConfig.ignored` so the node can warn about them. Everything else that wg or wg-quick
would reject, or would accept while silently doing something other than what the file says (the same
network routed to two peers, a peer carrying the interface's own key), is a :class:`ConfigError`
naming the line. Keys never appear in error messages or reprs.

The parser takes ``str``: callers decode the file (UTF-8) themselves. Lone surrogates or any other
odd characters in the text end up in a ``ConfigError``, never in another exception.
"""

from __future__ import annotations

import base64
import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_address,
    ip_interface,
    ip_network,
)

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from embedmesh.errors import ConfigError

__all__ = [
    "IGNORED_KEYS",
    "InterfaceConfig",
    "PeerConfig",
    "WireGuardConfig",
    "decode_key",
    "encode_key",
    "parse_wireguard_config",
]

KEY_LEN = 32
_KEY_LEN_BASE64 = 44
_ZERO_KEY = bytes(KEY_LEN)

# RFC 8200 §5: every link that carries IPv6 has an MTU of at least 1280.
IPV6_MIN_MTU = 1280
# RFC 791: every IPv4 host must accept 576-byte datagrams; below that nothing works reliably.
MIN_MTU = 576
MAX_MTU = 65535

_INTERFACE_KEYS = ("PrivateKey", "ListenPort", "Address", "DNS", "MTU")
_PEER_KEYS = ("PublicKey", "PresharedKey", "AllowedIPs", "Endpoint", "PersistentKeepalive")
# wg-quick keys that act on the OS interface or the host (routing table, shell hooks, writing the file
# back) and wg's FwMark (a socket mark for policy routing): a userspace node has nothing to apply them to.
IGNORED_KEYS = ("Table", "PreUp", "PostUp", "PreDown", "PostDown", "SaveConfig", "FwMark")
# wg(8) accumulates AllowedIPs lines, wg-quick(8) accumulates Address and DNS lines (and the hooks).
_REPEATABLE = frozenset({"Address", "DNS", "AllowedIPs"})

_CANONICAL = {name.lower(): name for name in (*_INTERFACE_KEYS, *_PEER_KEYS, *IGNORED_KEYS)}

_WHITESPACE = " \t\r\v\f"
_DIGITS = re.compile(r"[0-9]+")
_BASE64_KEY = re.compile(r"[A-Za-z0-9+/]{43}=")
_HEX_KEY = re.compile(r"[0-9A-Fa-f]{64}")
_KEY_LIKE_RUN = re.compile(r"[A-Za-z0-9+/]{40,}=*")
_SHOWABLE_KEY = re.compile(r"[A-Za-z][A-Za-z0-9 _-]{0,23}")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}\.?")
_SCOPE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# wg-quick(8) sends a DNS entry to resolvconf as a nameserver when it looks like an address, as a search
# domain otherwise; "looks like" is its own test, kept so that a mistyped address is not taken for a domain.
_LOOKS_LIKE_ADDRESS = re.compile(r"[0-9.]+|.*:.*")
_LIST_SEPARATORS = re.compile(r"[, \t\r\v\f]+")

IPNetwork = IPv4Network | IPv6Network
IPInterface = IPv4Interface | IPv6Interface
IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """One ``[Peer]``: who the peer is, which overlay networks it owns and where to reach it."""

    public_key: bytes
    """Raw 32-byte Curve25519 public key."""
    preshared_key: bytes | None = field(repr=False)
    """Raw 32-byte symmetric key mixed into the handshake, or None (an all-zero key also means none)."""
    allowed_ips: tuple[IPNetwork, ...]
    """Overlay networks routed to this peer and accepted from it; host bits are masked off."""
    endpoint: tuple[str, int] | None
    """Underlay ``(host, port)``: an IP literal (IPv6 without brackets) or a hostname resolved later."""
    persistent_keepalive: int | None
    """Seconds between keepalives, or None when off (the file's ``off`` and ``0`` both mean off)."""


@dataclass(frozen=True, slots=True)
class InterfaceConfig:
    """The ``[Interface]`` section: this node's key, underlay port and overlay addresses."""

    private_key: bytes = field(repr=False)
    """Raw 32-byte Curve25519 private key."""
    listen_port: int | None
    """Underlay UDP port; None (absent) or 0 lets the node pick one."""
    addresses: tuple[IPInterface, ...]
    """Overlay addresses with their prefix; a bare address is a /32 or /128."""
    dns: tuple[IPAddress, ...]
    """DNS servers, in file order."""
    dns_search: tuple[str, ...]
    """Search domains: the DNS entries that are not IP addresses, in file order."""
    mtu: int | None
    """Overlay MTU, or None for the default."""
    line: int | None = field(default=None, compare=False)
    """The line of the ``[Interface]`` header, for errors about the section as a whole."""

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte public key that peers list for this node."""
        return X25519PrivateKey.from_private_bytes(self.private_key).public_key().public_bytes_raw()


@dataclass(frozen=True, slots=True)
class WireGuardConfig:
    """A whole wg-quick configuration: one interface and its peers, in file order."""

    interface: InterfaceConfig
    peers: tuple[PeerConfig, ...]
    ignored: tuple[tuple[int, str], ...] = ()
    """``(line, key)`` for every wg-quick key that was accepted but cannot be honoured without an OS
    interface (see :data:`IGNORED_KEYS`), so the node can warn about each one."""


def encode_key(key: bytes) -> str:
    """Return the 44-character base64 form of a raw 32-byte key, as ``wg genkey`` prints it."""
    if len(key) != KEY_LEN:
        raise ValueError(f"a WireGuard key is {KEY_LEN} bytes, not {len(key)}")
    return base64.b64encode(key).decode("ascii")


def decode_key(text: str) -> bytes:
    """Return the raw 32 bytes of a base64 WireGuard key; :class:`ConfigError` unless it is exactly one.

    As strict as wg(8): 44 characters, standard alphabet, ``=`` padding, and no stray bits in the last
    character (those would silently decode to a different key than the one written).
    """
    key, problem = _decode_key(text)
    if key is None:
        raise ConfigError(f"not a valid WireGuard key ({problem})")
    return key


def parse_wireguard_config(text: str) -> WireGuardConfig:
    """Parse a wg-quick configuration; :class:`ConfigError` naming the line for anything wrong in it."""
    if not isinstance(text, str):
        raise TypeError(f"parse_wireguard_config takes str, not {type(text).__name__}; decode the file first")
    reader = _Reader()
    for number, line in _lines(text):
        reader.feed(number, line)
    return reader.finish()


# --- lines and sections ------------------------------------------------------------------------------


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, content)`` with comments cut and whitespace trimmed, skipping empty lines.

    Lines end at ``\\n`` only (CRLF works because ``\\r`` is trimmed): ``str.splitlines`` would also break
    at form feeds and Unicode separators, and the numbers would no longer match the user's editor.
    """
    # Editors on Windows put a byte-order mark at the start of UTF-8 files.
    text = text.removeprefix("\ufeff")
    for index, raw in enumerate(text.split("\n")):
        line = raw.partition("#")[0].strip(_WHITESPACE)
        if line:
            yield index + 1, line


class _Reader:
    """Sorts lines into sections as they come, then checks the sections against each other in :meth:`finish`."""

    def __init__(self) -> None:
        self._interface: _InterfaceLines | None = None
        self._peers: list[_PeerLines] = []
        self._current: _InterfaceLines | _PeerLines | None = None
        self._ignored: list[tuple[int, str]] = []

    def feed(self, number: int, line: str) -> None:
        if line.startswith("["):
            self._header(number, line)
            return
        key_text, equals, value = line.partition("=")
        key_text = key_text.strip(_WHITESPACE)
        value = value.strip(_WHITESPACE)
        colon_key = _CANONICAL.get(line.partition(":")[0].strip(_WHITESPACE).lower())
        if colon_key and (":" in key_text or not equals):
            raise ConfigError(
                f"write '{colon_key} = value': keys and values are separated by '=', not ':'", number
            )
        if _KEY_LIKE_RUN.fullmatch(line):
            raise ConfigError(
                "this line holds what looks like a bare key; write it as 'PrivateKey = <key>' "
                "(or PublicKey, PresharedKey)",
                number,
            )
        if not equals:
            # Not echoed: a line without "=" may well be a pasted key.
            raise ConfigError(
                "expected a section header ([Interface] or [Peer]) or a 'Key = Value' line", number
            )
        if not key_text:
            raise ConfigError("this line has '=' but no key before it", number)
        section = self._current
        key = _CANONICAL.get(key_text.lower())
        if key is None:
            raise ConfigError(_unknown_key_message(key_text, section), number)
        if section is None:
            where = "a [Peer] section" if key in _PEER_KEYS else "the [Interface] section"
            raise ConfigError(f"{key} comes before any section header; move it into {where}", number)
        if isinstance(section, _InterfaceLines) and key in _PEER_KEYS:
            raise ConfigError(f"{key} belongs in a [Peer] section, not in [Interface]", number)
        if isinstance(section, _PeerLines) and key not in _PEER_KEYS:
            raise ConfigError(f"{key} belongs in the [Interface] section, not in a [Peer]", number)
        if key in IGNORED_KEYS:
            self._ignored.append((number, key))
            return
        section.set(key, value, number)

    def _header(self, number: int, line: str) -> None:
        if not line.endswith("]"):
            raise ConfigError(
                f"section header {_show(line)} has no closing ']'; use [Interface] or [Peer]", number
            )
        # wg(8) drops all whitespace before matching, so "[ Peer ]" is a peer there too.
        name = "".join(line[1:-1].split()).lower()
        if name == "interface":
            if self._interface is not None:
                raise ConfigError(
                    f"second [Interface] section (the first is on line {self._interface.line}); "
                    "a configuration has exactly one",
                    number,
                )
            self._interface = self._current = _InterfaceLines(number)
        elif name == "peer":
            self._current = _PeerLines(number)
            self._peers.append(self._current)
        else:
            raise ConfigError(f"unknown section {_show(line)}; use [Interface] or [Peer]", number)

    def finish(self) -> WireGuardConfig:
        if self._interface is None:
            line = self._peers[0].line if self._peers else 1
            raise ConfigError(
                "the configuration has no [Interface] section; it needs one with this node's PrivateKey",
                line,
            )
        interface = self._interface.build()
        own_public_key = interface.public_key
        peers: list[PeerConfig] = []
        key_lines: dict[bytes, int] = {}
        network_lines: dict[IPNetwork, int] = {}
        for section in self._peers:
            peer = section.build()
            key_line = section.seen["PublicKey"]
            if peer.public_key == own_public_key:
                raise ConfigError(
                    "PublicKey is this node's own public key (derived from the [Interface] PrivateKey); "
                    "a [Peer] needs the other side's public key",
                    key_line,
                )
            if peer.public_key == interface.private_key:
                raise ConfigError(
                    "PublicKey is this node's PrivateKey; put the peer's public key here, and since the "
                    "private key has been copied around, consider generating a new one with `wg genkey`",
                    key_line,
                )
            if peer.public_key in key_lines:
                raise ConfigError(
                    f"the [Peer] with its PublicKey on line {key_lines[peer.public_key]} has the same key; "
                    "merge the two sections into one",
                    key_line,
                )
            key_lines[peer.public_key] = key_line
            for network, line in section.allowed_ips.items():
                if network in network_lines:
                    # wg(8) would silently move the route to the later peer.
                    raise ConfigError(
                        f"AllowedIPs {network} is already routed to the [Peer] with AllowedIPs on line "
                        f"{network_lines[network]}; each network goes to one peer, so remove it from one",
                        line,
                    )
                network_lines[network] = line
            peers.append(peer)
        return WireGuardConfig(interface=interface, peers=tuple(peers), ignored=tuple(self._ignored))


class _SectionLines:
    """One section as read so far: each value parsed on its own line, duplicates refused there."""

    kind = ""

    def __init__(self, line: int) -> None:
        self.line = line  # of the header
        self.seen: dict[str, int] = {}  # key -> first line that set it

    def set(self, key: str, value: str, line: int) -> None:
        first = self.seen.setdefault(key, line)
        if first != line and key not in _REPEATABLE:
            raise ConfigError(
                f"{key} is set twice in this [{self.kind}] section (first on line {first}); keep only one",
                line,
            )
        self._set(key, value, line)

    def _set(self, key: str, value: str, line: int) -> None:
        raise NotImplementedError

    def _missing(self, key: str, hint: str) -> ConfigError:
        return ConfigError(f"this [{self.kind}] section has no {key}; {hint}", self.line)


# --- [Interface] -------------------------------------------------------------------------------------


class _InterfaceLines(_SectionLines):
    kind = "Interface"

    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.private_key: bytes | None = None
        self.listen_port: int | None = None
        self.addresses: dict[IPInterface, int] = {}  # dict: file order, repeats dropped
        self.dns: list[IPAddress] = []
        self.dns_search: list[str] = []
        self.mtu: int | None = None

    def _set(self, key: str, value: str, line: int) -> None:
        if key == "PrivateKey":
            self.private_key = _parse_key(key, value, line)
            if self.private_key == _ZERO_KEY:
                raise ConfigError(
                    "PrivateKey is all zeros, which WireGuard treats as no key at all; "
                    "generate one with `wg genkey`",
                    line,
                )
        elif key == "ListenPort":
            self.listen_port = _parse_number(value, 0, 65535)
            if self.listen_port is None:
                raise ConfigError(
                    f"ListenPort must be a UDP port number from 0 to 65535, not {_show(value)}", line
                )
        elif key == "Address":
            for item in _split_wg_quick_list(value):
                self.addresses.setdefault(_parse_address(item, line), line)
        elif key == "DNS":
            for item in _split_wg_quick_list(value):
                server = _parse_dns_server(item, line)
                if server is None:
                    self.dns_search.append(item)
                else:
                    self.dns.append(server)
        else:  # MTU
            self.mtu = _parse_number(value, MIN_MTU, MAX_MTU)
            if self.mtu is None:
                raise ConfigError(
                    f"MTU must be a number from {MIN_MTU} to {MAX_MTU}, not {_show(value)}", line
                )

    def build(self) -> InterfaceConfig:
        if self.private_key is None:
            raise self._missing("PrivateKey", "generate one with `wg genkey`")
        if self.mtu is not None and self.mtu < IPV6_MIN_MTU:
            ipv6_lines = [line for address, line in self.addresses.items() if address.version == 6]
            if ipv6_lines:
                raise ConfigError(
                    f"MTU {self.mtu} is below {IPV6_MIN_MTU}, the smallest MTU IPv6 allows (RFC 8200 "
                    f"section 5), but the Address on line {ipv6_lines[0]} is IPv6; raise the MTU or drop "
                    "the IPv6 address",
                    self.seen["MTU"],
                )
        return InterfaceConfig(
            private_key=self.private_key,
            listen_port=self.listen_port,
            addresses=tuple(self.addresses),
            dns=tuple(self.dns),
            dns_search=tuple(self.dns_search),
            mtu=self.mtu,
            line=self.line,
        )


def _split_wg_quick_list(text: str) -> list[str]:
    # wg-quick(8) turns commas into spaces and lets the shell split words, so both separate entries and
    # empty ones vanish.
    return [item for item in _LIST_SEPARATORS.split(text) if item]


def _parse_address(item: str, line: int) -> IPInterface:
    address, slash, prefix = item.partition("/")
    parsed = _parse_overlay_ip(address)
    if parsed is None:
        raise ConfigError(
            f"Address entry {_show(item)} is not an IP address with an optional prefix length, "
            "like 10.0.0.2/24 or fd00::2/64",
            line,
        )
    length = _parse_prefix(item, prefix, parsed.max_prefixlen, "Address", line) if slash else None
    if length is None:
        length = parsed.max_prefixlen
    return ip_interface(f"{parsed}/{length}")


def _parse_dns_server(item: str, line: int) -> IPAddress | None:
    """Return the server address, or None when ``item`` is a search domain."""
    address = _parse_ip(item)
    if address is not None:
        if address.version == 6 and address.scope_id is not None:
            raise ConfigError(
                f"DNS server {_show(item)} has an IPv6 scope, which means nothing without an OS link", line
            )
        return address
    if _LOOKS_LIKE_ADDRESS.fullmatch(item):
        raise ConfigError(f"DNS entry {_show(item)} looks like an IP address but is not a valid one", line)
    if not _is_hostname(item):
        raise ConfigError(
            f"DNS entry {_show(item)} is neither a server's IP address nor a valid search domain", line
        )
    return None


# --- [Peer] ------------------------------------------------------------------------------------------


class _PeerLines(_SectionLines):
    kind = "Peer"

    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.public_key: bytes | None = None
        self.preshared_key: bytes | None = None
        # Each network with the AllowedIPs line that first names it; a dict keeps file order and drops
        # repeats (10.0.0.1/24 and 10.0.0.0/24 are one network).
        self.allowed_ips: dict[IPNetwork, int] = {}
        self.endpoint: tuple[str, int] | None = None
        self.persistent_keepalive: int | None = None

    def _set(self, key: str, value: str, line: int) -> None:
        if key == "PublicKey":
            self.public_key = _parse_key(key, value, line)
            if self.public_key == _ZERO_KEY:
                raise ConfigError("PublicKey is all zeros, which no WireGuard peer can have", line)
        elif key == "PresharedKey":
            psk = _parse_key(key, value, line)
            # The handshake always mixes in a preshared key; having none means the all-zero key.
            self.preshared_key = None if psk == _ZERO_KEY else psk
        elif key == "AllowedIPs":
            for network in _parse_allowed_ips(value, line):
                self.allowed_ips.setdefault(network, line)
        elif key == "Endpoint":
            self.endpoint = _parse_endpoint(value, line)
        else:  # PersistentKeepalive
            seconds = 0 if value.lower() == "off" else _parse_number(value, 0, 65535)
            if seconds is None:
                raise ConfigError(
                    "PersistentKeepalive must be 'off' or a number of seconds from 0 to 65535, "
                    f"not {_show(value)}",
                    line,
                )
            self.persistent_keepalive = seconds or None

    def build(self) -> PeerConfig:
        if self.public_key is None:
            raise self._missing(
                "PublicKey", "add the peer's public key (its owner gets it with `wg pubkey < privatekey`)"
            )
        return PeerConfig(
            public_key=self.public_key,
            preshared_key=self.preshared_key,
            allowed_ips=tuple(self.allowed_ips),
            endpoint=self.endpoint,
            persistent_keepalive=self.persistent_keepalive,
        )


def _parse_allowed_ips(text: str, line: int) -> Iterator[IPNetwork]:
    # wg(8): an empty value is an empty list, but an empty entry inside a list is an error.
    if not text:
        return
    for raw in text.split(","):
        item = raw.strip(_WHITESPACE)
        if not item:
            raise ConfigError(
                "AllowedIPs has an empty entry (two commas in a row, or a comma at an end)", line
            )
        if item[0] in "+-":
            raise ConfigError(
                f"AllowedIPs entry {_show(item)} starts with {item[0]!r}, which only `wg set` understands "
                "(to add or remove one network); a configuration file lists the networks themselves",
                line,
            )
        address, slash, prefix = item.partition("/")
        parsed = _parse_overlay_ip(address)
        if parsed is None:
            raise ConfigError(
                f"AllowedIPs entry {_show(item)} is not an IP network; write it like 10.0.0.0/24, "
                "fd00::/64, or a single address such as 10.0.0.2",
                line,
            )
        length = _parse_prefix(item, prefix, parsed.max_prefixlen, "AllowedIPs", line) if slash else None
        if length is None:
            length = parsed.max_prefixlen
        # Host bits set (10.0.0.1/24): wg(8) warns and masks them off, and so do we, silently.
        yield ip_network(f"{parsed}/{length}", strict=False)


def _parse_endpoint(text: str, line: int) -> tuple[str, int]:
    example = "write it as host:port, like vpn.example.com:51820, 203.0.113.1:51820 or [2001:db8::1]:51820"
    if not text:
        raise ConfigError(f"Endpoint is empty; {example}", line)
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ConfigError(f"Endpoint {_show(text)} opens '[' without closing it; {example}", line)
        colon, port_text = rest[:1], rest[1:]
        if colon != ":":
            raise ConfigError(f"Endpoint {_show(text)} has no ':port' after ']'; {example}", line)
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ConfigError(f"Endpoint {_show(text)} has no port; {example}", line)
        if ":" in host:
            raise ConfigError(
                f"Endpoint {_show(text)} has an IPv6 address without brackets; write [address]:port, "
                "like [2001:db8::1]:51820",
                line,
            )
    if not host:
        raise ConfigError(f"Endpoint {_show(text)} has no host before the port; {example}", line)
    port = _parse_number(port_text, 1, 65535)
    if port is None:
        raise ConfigError(
            f"Endpoint {_show(text)} needs a port number from 1 to 65535 after the last ':'", line
        )
    address = _parse_ip(host)
    if address is not None:
        if (
            address.version == 6
            and address.scope_id is not None
            and not _SCOPE_ID.fullmatch(address.scope_id)
        ):
            raise ConfigError(f"Endpoint {_show(text)} has an unusable IPv6 scope", line)
        return str(address), port
    if not _is_hostname(host):
        raise ConfigError(f"Endpoint host {_show(host)} is neither an IP address nor a valid hostname", line)
    return host, port


# --- values ------------------------------------------------------------------------------------------


def _decode_key(text: str) -> tuple[bytes | None, str]:
    """Return ``(key, "")`` or ``(None, what is wrong)``; the problem never quotes the text itself."""
    expected = f"expected {_KEY_LEN_BASE64} characters of base64 for {KEY_LEN} bytes"
    if _HEX_KEY.fullmatch(text):
        return None, f"{expected}; this looks like a hex key, which wg and wg-quick do not read"
    if len(text) != _KEY_LEN_BASE64:
        return None, f"{expected}, got {len(text)}"
    if not _BASE64_KEY.fullmatch(text):
        return None, f"{expected}, ending in '='; it has characters outside base64 or '=' in the wrong place"
    key = base64.b64decode(text, validate=True)
    if base64.b64encode(key).decode("ascii") != text:
        # The 43rd character carries 2 bits past the 32nd byte; wg(8) rejects them when set.
        return (
            None,
            f"{expected}; its last character before '=' is not one base64 can end on, so it was mistyped",
        )
    return key, ""


def _parse_key(name: str, text: str, line: int) -> bytes:
    key, problem = _decode_key(text)
    if key is None:
        raise ConfigError(f"{name} is not a valid WireGuard key ({problem})", line)
    return key


def _parse_number(text: str, low: int, high: int) -> int | None:
    """Return the decimal ``text`` if it lies in ``low..high``; ASCII digits only, no sign, no ``_``."""
    if not _DIGITS.fullmatch(text):
        return None
    digits = text.lstrip("0") or "0"
    # Bounded before int(): huge digit strings are slow to convert and, past 4300 digits, an error.
    if len(digits) > len(str(high)):
        return None
    number = int(digits)
    return number if low <= number <= high else None


def _parse_prefix(item: str, prefix: str, max_length: int, key: str, line: int) -> int:
    length = _parse_number(prefix, 0, max_length)
    if length is None:
        family = "IPv4" if max_length == 32 else "IPv6"
        raise ConfigError(
            f"{key} entry {_show(item)} needs a prefix length from 0 to {max_length} for {family} "
            "after the '/'",
            line,
        )
    return length


def _parse_ip(text: str) -> IPAddress | None:
    """An IPv4 or IPv6 literal (IPv6 possibly with a ``%scope``), or None."""
    # ipaddress also reads integers and packed bytes, and accepts leading/trailing oddities in scopes.
    if not text or not text.isascii() or not text.isprintable():
        return None
    try:
        return ip_address(text)
    except ValueError:
        return None


def _parse_overlay_ip(text: str) -> IPAddress | None:
    """An IP literal without an IPv6 ``%scope``: overlay addresses live on no OS link that could scope them."""
    address = _parse_ip(text)
    if address is None or (address.version == 6 and address.scope_id is not None):
        return None
    return address


def _is_hostname(text: str) -> bool:
    if len(text) > 254 or not _HOSTNAME.fullmatch(text):
        return False
    # RFC 3696 §2: a top-level label is never all digits, so "10.0.0.256" is a bad address, not a name.
    return not text.rstrip(".").rpartition(".")[2].isdigit()


def _show(text: str, limit: int = 60) -> str:
    """Quote user text for a message: key-like runs hidden, shortened, odd characters escaped by ``repr``.

    A value pasted under the wrong key (a private key as an Endpoint) must not reach a log.
    """
    text = _KEY_LIKE_RUN.sub("<key hidden>", text)
    if len(text) > limit:
        text = text[:limit] + "..."
    return repr(text)


def _unknown_key_message(key_text: str, section: _SectionLines | None) -> str:
    if section is None:
        expected = "[Interface] or [Peer]"
        known: tuple[str, ...] = (*_INTERFACE_KEYS, *_PEER_KEYS)
    elif isinstance(section, _InterfaceLines):
        expected = "[Interface]"
        known = _INTERFACE_KEYS
    else:
        expected = "[Peer]"
        known = _PEER_KEYS
    # A key that is not a short word may be a pasted secret: never echo it.
    shown = _show(key_text) if _SHOWABLE_KEY.fullmatch(key_text) else "on this line"
    message = f"unknown key {shown}; the keys of {expected} are {', '.join(known)}"
    squashed = "".join(ch for ch in key_text.lower() if ch.isalnum())
    close = [name for name in _CANONICAL.values() if name.lower() == squashed]
    if not close and shown != "on this line":
        close = [
            _CANONICAL[name] for name in difflib.get_close_matches(squashed, _CANONICAL, n=1, cutoff=0.75)
        ]
    if close:
        message += f" (did you mean {close[0]}?)"
    return message
