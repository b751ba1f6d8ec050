"""Fuzz target: WireGuard's message parsers (initiation, response, cookie reply, transport header)."""

from __future__ import annotations

import sys

from embedmesh.errors import ParseError
from embedmesh.wireguard import messages


def TestOneInput(data: bytes) -> None:
    kind = messages.message_type(data)
    assert 0 <= kind <= 4
    for parse in (
        messages.parse_initiation,
        messages.parse_response,
        messages.parse_cookie_reply,
        messages.parse_transport_header,
    ):
        try:
            parsed = parse(data)
        except ParseError:
            continue
        if hasattr(parsed, "to_bytes"):
            assert parsed.to_bytes() == data


if __name__ == "__main__":
    from harness import run

    run(TestOneInput)
    sys.exit(0)
