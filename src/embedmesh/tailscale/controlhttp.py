"""The HTTP steps around the ts2021 transport (Go's ``control/controlhttp``), sans-IO.

A client first fetches the server's Noise key with ``GET /key?v=<capver>``, then opens the
transport with an HTTP/1.1 upgrade::

    POST /ts2021 HTTP/1.1
    Upgrade: tailscale-control-protocol
    Connection: upgrade
    X-Tailscale-Handshake: <standard base64 of the 101-byte Noise initiation>

and the server answers ``101 Switching Protocols`` with the same ``Upgrade`` value. From then on
the socket carries controlbase frames (the response, maybe an early payload, then records), and
HTTP/2 runs inside them. This module builds and checks those messages with h11; it opens no
socket. Everything it parses raises only :class:`ControlHTTPError` (a ``ParseError``).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

import h11

from embedmesh.tailscale.controlbase import INITIATION_SIZE
from embedmesh.tailscale.errors import TailscaleProtocolError
from embedmesh.tailscale.keys import MachinePublic

UPGRADE_PROTOCOL = "tailscale-control-protocol"
HANDSHAKE_HEADER = "X-Tailscale-Handshake"
UPGRADE_PATH = "/ts2021"
#: Go's client reads at most this much of a ``/key`` answer.
MAX_KEY_RESPONSE = 64 << 10
#: Headers and an error body of a refused upgrade: enough for any real server's text.
MAX_UPGRADE_RESPONSE = 64 << 10


class ControlHTTPError(TailscaleProtocolError):
    """An answer of the control server's HTTP layer is not what the protocol expects."""


class UpgradeRefusedError(ControlHTTPError):
    """The server answered the upgrade with something other than 101 (its status and text)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"the control server refused the ts2021 upgrade: HTTP {status}: {text}")
        self.status = status
        self.text = text


def key_path(capability_version: int) -> str:
    """The path of the server-key request for a client of ``capability_version``."""
    return f"/key?v={capability_version}"


def parse_key_response(body: bytes) -> MachinePublic:
    """The server's Noise public key from a ``/key`` answer.

    Tailscale and headscale send ``{"legacyPublicKey": "mkey:...", "publicKey": "mkey:..."}``
    (headscale only ``publicKey``); a zero or missing ``publicKey`` means a server too old to
    speak Noise, which Tailscale's clients refuse too.
    """
    if len(body) > MAX_KEY_RESPONSE:
        raise ControlHTTPError(f"the /key answer is over {MAX_KEY_RESPONSE} bytes")
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ControlHTTPError(f"the /key answer is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ControlHTTPError("the /key answer is not a JSON object")
    # Go's decoder matches field names case-insensitively.
    lowered = {k.lower(): v for k, v in document.items() if isinstance(k, str)}
    text = lowered.get("publickey")
    if not isinstance(text, str):
        raise ControlHTTPError("the /key answer has no publicKey: not a Tailscale-protocol control server")
    key = MachinePublic.from_text(text)
    if key.is_zero:
        raise ControlHTTPError("the control server has no Noise key (too old a server)")
    return key


def key_response(public: MachinePublic) -> bytes:
    """The server's ``/key`` answer, as Tailscale's control server writes it."""
    zero = "mkey:" + "0" * 64
    return json.dumps({"legacyPublicKey": zero, "publicKey": public.to_text()}, separators=(",", ":")).encode()


class UpgradeClient:
    """The client's half of the upgrade: :attr:`request` to send, then :meth:`receive_data`.

    ``receive_data`` returns None until the server's answer is complete; then the bytes that
    followed the 101 (the start of the Noise stream), or raises :class:`UpgradeRefusedError`.
    """

    def __init__(self, host: str, initiation: bytes) -> None:
        if len(initiation) != INITIATION_SIZE:
            raise ValueError("the initiation is the 101-byte controlbase frame")
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_UPGRADE_RESPONSE)
        headers = [
            ("Host", host),
            ("Upgrade", UPGRADE_PROTOCOL),
            ("Connection", "upgrade"),
            (HANDSHAKE_HEADER, base64.b64encode(initiation).decode()),
            ("Content-Length", "0"),
        ]
        self.request = self._conn.send(h11.Request(method="POST", target=UPGRADE_PATH, headers=headers))
        self.request += self._conn.send(h11.EndOfMessage()) or b""
        self._status = 0
        self._body = bytearray()

    def receive_data(self, data: bytes) -> bytes | None:
        try:
            self._conn.receive_data(data)
            while True:
                event = self._conn.next_event()
                if event is h11.NEED_DATA:
                    if not data:
                        raise ControlHTTPError("the control server closed the connection during the upgrade")
                    return None
                if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                    upgrade = dict(event.headers).get(b"upgrade", b"")
                    if upgrade.lower() != UPGRADE_PROTOCOL.encode():
                        raise ControlHTTPError(
                            f"the control server switched to {upgrade.decode('latin-1')!r}, "
                            f"not {UPGRADE_PROTOCOL}"
                        )
                    leftover, _closed = self._conn.trailing_data
                    return bytes(leftover)
                if isinstance(event, h11.Response):
                    self._status = event.status_code
                elif isinstance(event, h11.Data):
                    if len(self._body) < MAX_UPGRADE_RESPONSE:
                        self._body += event.data[: MAX_UPGRADE_RESPONSE - len(self._body)]
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    raise UpgradeRefusedError(self._status, _text(bytes(self._body)))
        except h11.RemoteProtocolError as exc:
            if not data:
                raise ControlHTTPError("the control server closed the connection during the upgrade") from None
            raise ControlHTTPError(f"the control server's answer to the upgrade is not HTTP/1.1: {exc}") from None


def _text(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    return "".join(c if c.isprintable() else " " for c in text)[:300] or "(no text)"


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """What the server takes from a valid upgrade request: the Noise initiation."""

    initiation: bytes


def check_upgrade_request(method: str, headers: list[tuple[bytes, bytes]]) -> UpgradeRequest:
    """The server's checks of ``POST /ts2021`` (Go's ``controlhttpserver.AcceptHTTP``).

    Raises :class:`ControlHTTPError` with the text to send back with 400.
    """
    fields: dict[bytes, bytes] = {}
    for name, value in headers:
        fields.setdefault(name.lower(), value)
    if method.upper() not in ("POST", "GET"):
        raise ControlHTTPError(f"{method} is not how the ts2021 upgrade is asked for")
    upgrade = fields.get(b"upgrade", b"")
    if upgrade.lower() != UPGRADE_PROTOCOL.encode():
        raise ControlHTTPError("missing or unknown Upgrade header")
    encoded = fields.get(HANDSHAKE_HEADER.lower().encode())
    if not encoded:
        raise ControlHTTPError("no tailscale handshake header")
    try:
        initiation = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ControlHTTPError("handshake header not valid base64") from None
    if len(initiation) != INITIATION_SIZE:
        raise ControlHTTPError("handshake header has the wrong length for a Noise initiation")
    return UpgradeRequest(initiation)
