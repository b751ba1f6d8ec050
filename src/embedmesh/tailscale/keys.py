"""Tailscale's key types and their text forms (as ``tailscale.com/types/key`` writes them).

Every key is 32 raw bytes. Its text form is a type prefix and 64 hex digits, for example
``nodekey:1a2b…``; that is also its JSON form (``encoding/json`` uses ``MarshalText``):

===================  ================  =====================================================
type                 prefix            what it is
===================  ================  =====================================================
:class:`MachinePublic`    ``mkey:``     a machine's (or the control server's) Noise static key
:class:`NodePublic`       ``nodekey:``  a node's WireGuard public key
:class:`DiscoPublic`      ``discokey:`` a node's disco key (path discovery)
:class:`ChallengePublic`  ``chalpub:``  the per-connection challenge in the early payload
:class:`NLPublic`         ``nlpub:``    a tailnet-lock key
:class:`MachinePrivate`, :class:`NodePrivate`, :class:`DiscoPrivate`  ``privkey:``  private keys
===================  ================  =====================================================

Parsing follows Go's ``parseHex``: the prefix must match exactly, the hex digits may be in either
case, and the length must be exact. Writing is always lower case. The all-zero key is a valid value
that means "none" (``IsZero`` in Go): a zero disco key in a network map means the peer has no disco.
Go has no text form for disco private keys; embedmesh writes them as ``privkey:`` in its own state.

Private keys never show their bytes in ``repr`` and compare in constant time.
"""

from __future__ import annotations

import base64
import hmac
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Self, TypeVar

from embedmesh.errors import ConfigError
from embedmesh.state import ensure_private_dir, write_private_file
from embedmesh.tailscale.errors import KeyFormatError
from embedmesh.wireguard.crypto import generate_private_key
from embedmesh.wireguard.crypto import public_key as _x25519_public

KEY_SIZE = 32
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_ZERO = bytes(KEY_SIZE)


def _parse_hex(text: str | bytes, prefix: str, what: str) -> bytes:
    """Go's ``parseHex``: ``prefix`` then exactly 64 hex digits of either case."""
    if isinstance(text, str):
        try:
            data = text.encode("ascii")
        except UnicodeEncodeError:
            raise KeyFormatError(f"{what}: key text is not ASCII") from None
    else:
        data = bytes(text)
    expected = prefix.encode("ascii")
    if not data.startswith(expected):
        raise KeyFormatError(f"{what}: key text does not start with {prefix!r}")
    digits = data[len(expected) :]
    if len(digits) != 2 * KEY_SIZE:
        raise KeyFormatError(f"{what}: key hex has {len(digits)} digits, want {2 * KEY_SIZE}")
    if not _HEX_DIGITS.issuperset(digits):
        raise KeyFormatError(f"{what}: invalid hex digit in key")
    return bytes.fromhex(digits.decode("ascii"))


def _check_raw(raw: bytes | bytearray | memoryview, what: str) -> bytes:
    raw = bytes(raw)
    if len(raw) != KEY_SIZE:
        raise KeyFormatError(f"{what}: a key is {KEY_SIZE} bytes, got {len(raw)}")
    return raw


class PublicKey:
    """A 32-byte public key of one type; subclasses fix the prefix. Immutable and hashable."""

    __slots__ = ("_raw",)
    PREFIX: ClassVar[str] = ""

    _raw: bytes

    def __init__(self, raw: bytes | bytearray | memoryview) -> None:
        object.__setattr__(self, "_raw", _check_raw(raw, type(self).__name__))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    @classmethod
    def zero(cls) -> Self:
        """The all-zero key, which the protocol reads as "no key"."""
        return cls(_ZERO)

    @classmethod
    def from_text(cls, text: str | bytes) -> Self:
        """Parse ``<prefix><64 hex>``; raises :class:`KeyFormatError`."""
        return cls(_parse_hex(text, cls.PREFIX, cls.__name__))

    @classmethod
    def from_untyped_hex(cls, text: str | bytes) -> Self:
        """Parse 64 bare hex digits (the pre-JSON ``/key`` answer); raises :class:`KeyFormatError`."""
        return cls(_parse_hex(text, "", cls.__name__))

    @property
    def raw(self) -> bytes:
        """The 32 raw bytes."""
        return self._raw

    @property
    def is_zero(self) -> bool:
        return self._raw == _ZERO

    def to_text(self) -> str:
        """``<prefix><64 lower-case hex>``, as Go's ``MarshalText``."""
        return self.PREFIX + self._raw.hex()

    def short_string(self) -> str:
        """Go's ``ShortString``: ``[`` + 5 base64 characters of the first bytes + ``]`` ("" if zero)."""
        if self.is_zero:
            return ""
        return "[" + base64.b64encode(self._raw[:4]).decode("ascii")[:5] + "]"

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_text()!r})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, PublicKey)
        return self._raw == other._raw

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._raw))

    def __reduce__(self) -> tuple[type[Self], tuple[bytes]]:
        return (type(self), (self._raw,))


class MachinePublic(PublicKey):
    """A machine's Noise static public key (``mkey:``); also the control server's key."""

    __slots__ = ()
    PREFIX = "mkey:"


class NodePublic(PublicKey):
    """A node's WireGuard public key (``nodekey:``)."""

    __slots__ = ()
    PREFIX = "nodekey:"


class DiscoPublic(PublicKey):
    """A node's disco public key (``discokey:``); zero in a network map means no disco."""

    __slots__ = ()
    PREFIX = "discokey:"


class ChallengePublic(PublicKey):
    """The per-connection challenge key a server sends in the early payload (``chalpub:``)."""

    __slots__ = ()
    PREFIX = "chalpub:"


class NLPublic(PublicKey):
    """A tailnet-lock public key (``nlpub:``), carried in RegisterRequest.NLKey."""

    __slots__ = ()
    PREFIX = "nlpub:"


class PrivateKey:
    """A 32-byte X25519 private key; subclasses fix which public type it yields."""

    __slots__ = ("_raw",)
    PREFIX: ClassVar[str] = "privkey:"

    _raw: bytes

    def __init__(self, raw: bytes | bytearray | memoryview) -> None:
        object.__setattr__(self, "_raw", _check_raw(raw, type(self).__name__))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    @classmethod
    def generate(cls, random_bytes: bytes) -> Self:
        """A new key from 32 random bytes the caller drew (clamped as Go's ``clamp25519Private``)."""
        return cls(generate_private_key(random_bytes))

    @classmethod
    def zero(cls) -> Self:
        return cls(_ZERO)

    @classmethod
    def from_text(cls, text: str | bytes) -> Self:
        """Parse ``privkey:<64 hex>``; raises :class:`KeyFormatError` (never quoting the key)."""
        return cls(_parse_hex(text, cls.PREFIX, cls.__name__))

    @property
    def raw(self) -> bytes:
        """The 32 raw bytes (secret)."""
        return self._raw

    @property
    def is_zero(self) -> bool:
        return hmac.compare_digest(self._raw, _ZERO)

    def public_raw(self) -> bytes:
        """The raw X25519 public key; a zero private key has none (Go panics, this raises)."""
        if self.is_zero:
            raise ValueError(f"a zero {type(self).__name__} has no public key")
        return _x25519_public(self._raw)

    def to_text(self) -> str:
        """``privkey:<64 lower-case hex>`` (for state files only: it is the secret)."""
        return self.PREFIX + self._raw.hex()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<secret>)"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, PrivateKey)
        return hmac.compare_digest(self._raw, other._raw)

    __hash__ = None  # type: ignore[assignment]  # secrets are not dictionary keys


class MachinePrivate(PrivateKey):
    """A machine's Noise static private key."""

    __slots__ = ()

    def public(self) -> MachinePublic:
        return MachinePublic(self.public_raw())


class NodePrivate(PrivateKey):
    """A node's WireGuard private key."""

    __slots__ = ()

    def public(self) -> NodePublic:
        return NodePublic(self.public_raw())


class DiscoPrivate(PrivateKey):
    """A node's disco private key."""

    __slots__ = ()

    def public(self) -> DiscoPublic:
        return DiscoPublic(self.public_raw())


class ChallengePrivate(PrivateKey):
    """The private half of a :class:`ChallengePublic`; Go refuses to write it as text."""

    __slots__ = ()

    def public(self) -> ChallengePublic:
        return ChallengePublic(self.public_raw())

    def to_text(self) -> str:
        raise ValueError("a challenge private key has no text form")


_P = TypeVar("_P", bound=PrivateKey)


def write_private_key_file(path: str | os.PathLike[str], key: PrivateKey) -> None:
    """Store ``key`` as ``privkey:<hex>`` in ``path``: the file 0600 (written atomically), its
    folder 0700, so only this user can read the secret."""
    target = Path(path)
    ensure_private_dir(target.parent)
    write_private_file(target, (key.to_text() + "\n").encode("ascii"))


def read_private_key_file(path: str | os.PathLike[str], kind: type[_P]) -> _P:
    """Read a key written by :func:`write_private_key_file`.

    A file that others can read is tightened to 0600 first. Raises :class:`ConfigError` (saying
    what to do, never quoting the file) when it does not hold one valid key.
    """
    target = Path(path)
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
        if mode & 0o077:
            target.chmod(0o600)
        data = target.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the key file {target}: {exc.strerror or exc}") from None
    try:
        key = kind.from_text(data.strip())
    except KeyFormatError:
        raise ConfigError(
            f"{target} does not hold a {kind.__name__} (privkey:<64 hex digits>); restore it from a "
            "backup, or delete it to make a new key"
        ) from None
    if key.is_zero:
        raise ConfigError(f"{target} holds an all-zero key; delete it to make a new key")
    return key


def load_or_create_private_key_file(
    path: str | os.PathLike[str], kind: type[_P], random_bytes: Callable[[int], bytes]
) -> tuple[_P, bool]:
    """The key stored in ``path``, or a new one (from ``random_bytes(32)``) stored there first.

    Returns the key and whether it was created just now. ``random_bytes`` is ``os.urandom`` in
    production and a seeded source in tests.
    """
    target = Path(path)
    if target.exists():
        return read_private_key_file(target, kind), False
    key = kind.generate(random_bytes(KEY_SIZE))
    write_private_key_file(target, key)
    return key, True


__all__ = [
    "KEY_SIZE",
    "ChallengePrivate",
    "ChallengePublic",
    "DiscoPrivate",
    "DiscoPublic",
    "KeyFormatError",
    "MachinePrivate",
    "MachinePublic",
    "NLPublic",
    "NodePrivate",
    "NodePublic",
    "PrivateKey",
    "PublicKey",
    "load_or_create_private_key_file",
    "read_private_key_file",
    "write_private_key_file",
]
