"""The ts2021 transport: replays of Go's transcripts, the frame rules, and hostile input."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from embedmesh.errors import ParseError
from embedmesh.tailscale import controlbase as cb
from embedmesh.tailscale.keys import ChallengePublic, MachinePrivate, MachinePublic
from tests.tailscale.ts_harness import END, messages

VECTORS = json.loads((Path(__file__).resolve().parent / "vectors" / "controlbase.json").read_text())
U32 = struct.Struct("!I")


def _b64(text: str) -> bytes:
    return base64.b64decode(text)


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def _pair(version: int = 130) -> tuple[cb.ClientConnection, cb.ServerConnection]:
    server_key = MachinePrivate.generate(b"\x01" * 32)
    client = cb.ClientConnection(MachinePrivate.generate(b"\x02" * 32), server_key.public(), version, b"\x03" * 32)
    server = cb.ServerConnection(server_key, b"\x04" * 32)
    assert server.receive_data(client.initiation) == b""
    assert client.receive_data(server.data_to_send()) == b""
    return client, server


# --- Known answers: transcripts recorded against tailscale.com v1.102.5 (make_vectors.py) ---------


@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 20])
def test_python_client_replays_go_server_transcript(piece: int) -> None:
    """Our client, with the recorded keys, makes the same bytes and reads Go's server bytes."""
    case = VECTORS["python_client_go_server"]
    server_public = MachinePrivate.from_text(VECTORS["server_key"]).public()
    client = cb.ClientConnection(
        MachinePrivate.from_text(VECTORS["client_key"]),
        server_public,
        VECTORS["version"],
        bytes.fromhex(VECTORS["client_ephemeral"]),
    )
    python_out = _b64(case["python_out"])
    assert python_out[: cb.INITIATION_SIZE] == client.initiation
    plaintext = bytearray()
    for chunk in _chunks(_b64(case["go_out"]), piece):
        plaintext += client.receive_data(chunk)
    assert len(plaintext) == case["plaintext_in_length"]
    assert hashlib.sha256(plaintext).hexdigest() == case["plaintext_in_sha256"]
    assert client.session is not None
    assert client.session.handshake_hash.hex() == case["go_report"]["handshake_hash"]
    assert case["go_report"]["peer"] == MachinePrivate.from_text(VECTORS["client_key"]).public().to_text()
    # What Go's server sent first inside Noise: headscale's early payload.
    early = cb.EarlyPayloadReader()
    stream = early.receive(bytes(plaintext))
    assert early.early_payload == cb.EarlyNoise(ChallengePublic.from_text(VECTORS["challenge"]))
    # Our records after the handshake are a pure function of the keys: rebuild them byte for byte.
    rebuilt = bytearray(client.initiation)
    expected_echo = bytearray()
    for message in messages(VECTORS["sizes"], seed=VECTORS["version"]):
        rebuilt += client.send_record(b"") + client.send(U32.pack(len(message)) + message)
        expected_echo += U32.pack(len(message)) + message
    rebuilt += client.send(U32.pack(END))
    assert bytes(rebuilt) == python_out
    assert stream == bytes(expected_echo) + U32.pack(END)
    assert (client.tx.counter, client.rx.counter) == (case["tx_counter"], case["rx_counter"])


@pytest.mark.parametrize("piece", [1, 13, 4096, 1 << 20])
def test_python_server_replays_go_client_transcript(piece: int) -> None:
    """Our server, with the recorded keys, reads Go's client bytes and makes the same answers."""
    case = VECTORS["go_client_python_server"]
    server = cb.ServerConnection(
        MachinePrivate.from_text(VECTORS["server_key"]), bytes.fromhex(VECTORS["server_ephemeral"])
    )
    plaintext = bytearray()
    for chunk in _chunks(_b64(case["go_out"]), piece):
        plaintext += server.receive_data(chunk)
    assert hashlib.sha256(plaintext).hexdigest() == case["plaintext_in_sha256"]
    assert server.session is not None
    assert server.session.version == VECTORS["version"]
    assert server.session.peer == MachinePrivate.from_text(VECTORS["client_key"]).public()
    assert server.session.handshake_hash.hex() == case["go_report"]["handshake_hash"]
    # Rebuild our answers: response, early payload, then each message echoed in 3000-byte pieces.
    rebuilt = bytearray(server.data_to_send())
    assert len(rebuilt) == cb.RESPONSE_SIZE
    rebuilt += server.send(cb.encode_early_payload(ChallengePublic.from_text(VECTORS["challenge"])))
    stream = bytes(plaintext)
    count = 0
    while True:
        (length,) = U32.unpack_from(stream)
        if length == END:
            rebuilt += server.send(U32.pack(END))
            break
        echo, stream = stream[: 4 + length], stream[4 + length :]
        for start in range(0, len(echo), 3000):
            rebuilt += server.send(echo[start : start + 3000])
        count += 1
    assert count == case["go_report"]["messages_verified"] == len(VECTORS["sizes"])
    assert bytes(rebuilt) == _b64(case["python_out"])


# --- Frame rules ----------------------------------------------------------------------------------


def test_initiation_layout() -> None:
    client, _ = _pair(version=0x1234)
    init = client.initiation
    assert len(init) == 101 and init[:5] == b"\x12\x34\x01\x00\x60"
    assert cb.prologue(142) == b"Tailscale Control Protocol v142"


def test_record_nonce_is_a_big_endian_counter() -> None:
    key = bytes(range(32))
    cipher = cb.RecordCipher(key)
    first, second = cipher.seal(b"a"), cipher.seal(b"b")
    reference = ChaCha20Poly1305(key)
    assert first == reference.encrypt(bytes(12), b"a", None)
    # Little-endian (standard Noise) would put the 1 in byte 4; controlbase puts it in byte 11.
    assert second == reference.encrypt(bytes(11) + b"\x01", b"b", None)
    assert second != reference.encrypt(bytes(4) + b"\x01" + bytes(7), b"b", None)


def test_both_directions_and_record_splitting() -> None:
    client, server = _pair()
    data = bytes(range(256)) * 40  # 10240 bytes: 3 records
    wire = client.send(data)
    assert len(wire) == len(data) + 3 * (3 + 16)
    assert wire[0] == cb.MSG_RECORD and struct.unpack("!H", wire[1:3])[0] == 4093
    assert server.receive_data(wire) == data
    assert client.receive_data(server.send(b"pong")) == b"pong"
    assert client.send(b"") == b""
    assert server.receive_data(client.send_record(b"")) == b""
    assert server.rx.counter == 4  # the empty record used a nonce
    with pytest.raises(ValueError):
        client.send_record(b"x" * (cb.MAX_PLAINTEXT_SIZE + 1))


def test_partial_records_wait_for_more_bytes() -> None:
    client, server = _pair()
    wire = client.send(b"hello") + client.send(b"world")
    out = bytearray()
    for byte in wire:
        out += server.receive_data(bytes([byte]))
    assert out == b"helloworld"


def test_tampered_version_breaks_the_handshake() -> None:
    server_key = MachinePrivate.generate(b"\x01" * 32)
    client = cb.ClientConnection(MachinePrivate.generate(b"\x02" * 32), server_key.public(), 130, b"\x03" * 32)
    init = bytearray(client.initiation)
    init[1] ^= 1  # the server builds its prologue from this header value
    server = cb.ServerConnection(server_key, b"\x04" * 32)
    with pytest.raises(cb.HandshakeError) as info:
        server.accept_initiation(bytes(init))
    assert info.value.reply == b""  # authentication failures get no answer, as in Go
    with pytest.raises(cb.ControlbaseError):
        server.receive_data(b"")


def test_wrong_server_key_fails_on_the_server() -> None:
    client = cb.ClientConnection(
        MachinePrivate.generate(b"\x02" * 32), MachinePrivate.generate(b"\x05" * 32).public(), 130, b"\x03" * 32
    )
    server = cb.ServerConnection(MachinePrivate.generate(b"\x01" * 32), b"\x04" * 32)
    with pytest.raises(cb.HandshakeError):
        server.receive_data(client.initiation)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:2] + b"\x02" + b[3:], "unexpected handshake message type"),
        (lambda b: b[:3] + b"\x00\x61" + b[5:], "wrong handshake initiation length"),
    ],
)
def test_bad_initiation_headers_get_go_error_frames(mutate: Any, message: str) -> None:
    client, _ = _pair()
    server = cb.ServerConnection(MachinePrivate.generate(b"\x01" * 32), b"\x04" * 32)
    with pytest.raises(cb.HandshakeError) as info:
        server.receive_data(mutate(client.initiation)[:5])  # decided from the header alone
    assert info.value.reply == b"\x03" + struct.pack("!H", len(message)) + message.encode()
    # ...and our client shows the server's text.
    fresh = cb.ClientConnection(MachinePrivate.generate(b"\x02" * 32), MachinePublic(b"\x09" * 32), 130, b"\x03" * 32)
    with pytest.raises(cb.ServerRefusedError) as refused:
        fresh.receive_data(info.value.reply)
    assert refused.value.server_message == message
    server2 = cb.ServerConnection(MachinePrivate.generate(b"\x01" * 32), b"\x04" * 32)
    with pytest.raises(cb.HandshakeError) as short:
        server2.accept_initiation(client.initiation[:100])
    assert short.value.reply.endswith(b"wrong handshake initiation size")


def test_bad_responses_break_the_client() -> None:
    for response in (b"\x05\x00\x30" + bytes(48), b"\x02\x00\x31" + bytes(49)):
        fresh = cb.ClientConnection(
            MachinePrivate.generate(b"\x02" * 32), MachinePrivate.generate(b"\x01" * 32).public(), 130, b"\x03" * 32
        )
        with pytest.raises(cb.ControlbaseError):
            fresh.receive_data(response)
        with pytest.raises(cb.ControlbaseError):
            fresh.receive_data(b"")
    fresh = cb.ClientConnection(
        MachinePrivate.generate(b"\x02" * 32), MachinePrivate.generate(b"\x01" * 32).public(), 130, b"\x03" * 32
    )
    with pytest.raises(cb.HandshakeError):  # a low-order ephemeral point
        fresh.receive_data(b"\x02\x00\x30" + bytes(48))


def test_bad_records_break_the_connection_for_good() -> None:
    client, server = _pair()
    good = client.send(b"first")
    bad = bytearray(client.send(b"second"))
    bad[-1] ^= 1
    # Authentic data before the bad record is still delivered; the failure comes next.
    assert server.receive_data(good + bytes(bad)) == b"first"
    with pytest.raises(cb.ControlbaseError):
        server.receive_data(client.send(b"third"))
    for frame in (b"\x04\x10\x00", b"\x01\x00\x10" + bytes(16), b"\x04\x00\x05" + bytes(5)):
        _, fresh = _pair()
        with pytest.raises(cb.ControlbaseError):
            fresh.receive_data(frame)


def test_nonce_exhaustion() -> None:
    client, server = _pair()
    client.tx.counter = cb.INVALID_COUNTER - 1
    client.send(b"last")
    with pytest.raises(cb.CipherExhaustedError):
        client.send(b"one too many")
    server.rx.counter = cb.INVALID_COUNTER
    with pytest.raises(cb.CipherExhaustedError):
        server.receive_data(b"\x04\x00\x10" + bytes(16))


def test_sending_before_the_handshake_is_a_state_error() -> None:
    server = cb.ServerConnection(MachinePrivate.generate(b"\x01" * 32), b"\x04" * 32)
    with pytest.raises(cb.TransportStateError):
        server.send(b"x")


# --- Early payload ---------------------------------------------------------------------------------


def test_early_payload_round_trip_and_passthrough() -> None:
    challenge = ChallengePublic(bytes(range(32)))
    wire = cb.encode_early_payload(challenge)
    assert wire[:5] == b"\xff\xff\xffTS" and U32.unpack_from(wire, 5)[0] == len(wire) - 9
    reader = cb.EarlyPayloadReader()
    out = bytearray()
    for byte in wire + b"PRI * HTTP/2.0":
        out += reader.receive(bytes([byte]))
    assert reader.decided and reader.early_payload == cb.EarlyNoise(challenge) and out == b"PRI * HTTP/2.0"
    plain = cb.EarlyPayloadReader()
    assert plain.receive(b"PRI * HT") == b""
    assert plain.receive(b"TP/2.0") == b"PRI * HTTP/2.0" and plain.early_payload is None


def test_early_payload_is_decoded_as_go_does() -> None:
    hexkey = "ab" * 32
    assert cb.parse_early_noise(b"null") is None
    assert cb.parse_early_noise(b"{}") == cb.EarlyNoise(ChallengePublic.zero())
    case_folded = cb.parse_early_noise(b'{"NODEKEYCHALLENGE":"chalpub:' + hexkey.encode() + b'","x":1}')
    assert case_folded == cb.EarlyNoise(ChallengePublic(b"\xab" * 32))
    for body in (b"[]", b'{"nodeKeyChallenge":5}', b'{"nodeKeyChallenge":"mkey:' + hexkey.encode() + b'"}', b"{", b"NaN"):
        with pytest.raises(ParseError):
            cb.parse_early_noise(body)
    reader = cb.EarlyPayloadReader()
    with pytest.raises(ParseError):
        reader.receive(cb.EARLY_PAYLOAD_MAGIC + U32.pack(cb.MAX_EARLY_PAYLOAD_SIZE + 1))


# --- Properties ------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.binary(max_size=9000), max_size=6),
    st.integers(min_value=1, max_value=5000),
    st.integers(min_value=0, max_value=0xFFFF),
)
def test_round_trip_with_any_chunking(payloads: list[bytes], piece: int, version: int) -> None:
    client, server = _pair(version)
    assert server.session is not None and server.session.version == version
    wire = b"".join(client.send(p) for p in payloads)
    got = b"".join(server.receive_data(c) for c in _chunks(wire, piece))
    assert got == b"".join(payloads)
    back = b"".join(server.send(p) for p in payloads)
    assert b"".join(client.receive_data(c) for c in _chunks(back, piece)) == b"".join(payloads)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_garbage_raises_only_parse_errors(pieces: list[bytes]) -> None:
    server = cb.ServerConnection(MachinePrivate.generate(b"\x01" * 32), b"\x04" * 32)
    client = cb.ClientConnection(
        MachinePrivate.generate(b"\x02" * 32), MachinePrivate.generate(b"\x01" * 32).public(), 130, b"\x03" * 32
    )
    _, established = _pair()
    early = cb.EarlyPayloadReader()
    for conn in (server, client, established):
        for piece in pieces:
            try:
                conn.receive_data(piece)
            except ParseError:
                break
    for piece in pieces:
        try:
            early.receive(piece)
        except ParseError:
            break
    try:
        cb.parse_early_noise(b"".join(pieces))
    except ParseError:
        pass
