"""Errors of the Tailscale-protocol cores, all under :class:`embedmesh.errors.ParseError`.

Every parser in :mod:`embedmesh.tailscale` raises only these (or plain :class:`ParseError`), so a
driver catches one family at its boundary and drops the bad frame, packet or connection.
"""

from __future__ import annotations

from embedmesh.errors import ParseError


class TailscaleProtocolError(ParseError):
    """Bytes from a Tailscale-protocol peer do not form a valid message."""


class KeyFormatError(TailscaleProtocolError):
    """A key's text form is not ``<prefix>:<64 hex digits>`` with the expected prefix."""
