"""Reading JSON the way Go's ``encoding/json`` reads it into a struct.

Tailscale's peers are Go programs, so a message means what Go makes of it: object keys match field
names case-insensitively (an exact match is not required), the last duplicate wins, unknown keys are
ignored, ``null`` leaves a field at its zero value, and ``NaN``/``Infinity`` are not JSON. Bytes are
UTF-8 (invalid sequences become U+FFFD, as Go does), never UTF-16/32.
"""

from __future__ import annotations

import json
from typing import Any

from embedmesh.tailscale.errors import TailscaleProtocolError

# Go's field-name folding is ASCII case plus the two non-ASCII runes that fold to ASCII letters
# (KELVIN SIGN -> k, LATIN SMALL LETTER LONG S -> s); str.casefold would also fold "ß" to "ss".
_GO_FOLD = {0x212A: "k", 0x017F: "s"}


def fold(name: str) -> str:
    """The key under which Go's ``encoding/json`` matches ``name`` to a field."""
    return name.translate(_GO_FOLD).lower()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class GoObject:
    """A decoded JSON object with Go's field lookup: ``get("publicKey")`` matches any case."""

    __slots__ = ("_fields",)

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        fields: dict[str, Any] = {}
        for key, value in pairs:
            fields[fold(key)] = value  # last duplicate wins, as in Go
        self._fields = fields

    def get(self, name: str) -> Any:
        """The value for field ``name`` (None when absent or null)."""
        return self._fields.get(fold(name))

    def __contains__(self, name: str) -> bool:
        return fold(name) in self._fields

    def items(self) -> list[tuple[str, Any]]:
        """The members as (folded key, value): for maps keyed by data (node ids, DNS suffixes)."""
        return list(self._fields.items())


def loads(data: bytes | str, what: str) -> Any:
    """Decode JSON; objects become :class:`GoObject`. Raises :class:`TailscaleProtocolError`."""
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes | bytearray | memoryview) else data
    try:
        return json.loads(text, object_pairs_hook=GoObject, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise TailscaleProtocolError(f"{what}: not valid JSON") from exc


def load_object(data: bytes | str, what: str, *, allow_null: bool = False) -> GoObject | None:
    """Decode a JSON object (or ``null`` when ``allow_null``); anything else is an error."""
    value = loads(data, what)
    if value is None and allow_null:
        return None
    if not isinstance(value, GoObject):
        raise TailscaleProtocolError(f"{what}: expected a JSON object")
    return value


__all__ = ["GoObject", "fold", "load_object", "loads"]
