"""Live interop with Tailscale's own Go code (tailscale.com v1.102.5), built by tests/tailscale/gobuild.py.

Our controlbase client against Go's ``controlbase.Server`` and Go's ``controlbase.Client`` (wrapped
in ``ts2021.Conn``, which reads our early payload) against our server, over a pipe, with fresh
random keys every run and records that exercise splitting, empty records and many nonces. Skips
with the reason when Go is missing; fails instead under ``EMBEDMESH_REQUIRE_INTEROP=1``.
"""

from __future__ import annotations

import os

import pytest

from embedmesh.tailscale.keys import ChallengePublic, MachinePrivate
from tests.tailscale import ts_harness
from tests.tailscale.gobuild import tsvectors

pytestmark = pytest.mark.interop

SIZES = [0, 1, 4076, 4077, 4078, 8154, 8155, 65536, 3]


def _key() -> MachinePrivate:
    return MachinePrivate.generate(os.urandom(32))


@pytest.mark.parametrize("version", [113, 130, 142, 0xFFFF])
def test_python_client_with_go_server(version: int) -> None:
    server_key, client_key = _key(), _key()
    challenge = ChallengePublic(os.urandom(32))
    t = ts_harness.python_client_vs_go_server(
        tsvectors(), server_key, client_key, os.urandom(32), challenge, version, SIZES
    )
    assert t.report["mode"] == "noise-server"
    assert t.report["messages_echoed"] == len(SIZES)
    assert t.report["version"] == version
    assert t.report["peer"] == client_key.public().to_text()
    assert t.report["handshake_hash"] == t.handshake_hash.hex()
    assert t.report["early_challenge"] == challenge.to_text()
    # Go counted every record we sent, the empty ones too (one nonce each).
    assert t.tx_counter > len(SIZES) * 2


@pytest.mark.parametrize("version", [113, 142])
def test_go_client_with_python_server(version: int) -> None:
    server_key, client_key = _key(), _key()
    challenge = ChallengePublic(os.urandom(32))
    t = ts_harness.go_client_vs_python_server(
        tsvectors(), server_key, client_key, os.urandom(32), challenge, version, SIZES
    )
    assert t.report["mode"] == "noise-client"
    assert t.report["messages_verified"] == len(SIZES)
    assert t.report["peer"] == server_key.public().to_text()
    assert t.report["python_saw_peer"] == client_key.public().to_text()
    assert t.report["python_saw_version"] == version == t.report["version"]
    assert t.report["handshake_hash"] == t.handshake_hash.hex()
    assert t.report["early_challenge"] == challenge.to_text()


def test_go_server_refuses_a_client_with_the_wrong_server_key() -> None:
    # Go's server can't open the initiation, so it closes the pipe without a response.
    with pytest.raises(EOFError, match="decrypting machine key"):
        ts_harness.python_client_vs_go_server(
            tsvectors(), _key(), _key(), os.urandom(32), ChallengePublic(os.urandom(32)), 130, [1],
            server_public=_key().public(),
        )


def test_python_server_refuses_a_go_client_with_the_wrong_server_key() -> None:
    from embedmesh.tailscale.controlbase import HandshakeError

    binary = tsvectors()
    server_key, other = _key(), _key()
    with pytest.raises(HandshakeError):
        # The Go client encrypts to `other`'s public key; our server (server_key) can't open it.
        ts_harness.go_client_vs_python_server(
            binary, server_key, _key(), os.urandom(32), ChallengePublic(os.urandom(32)), 130, [1],
            go_server_public=other.public(),
        )


def test_without_go_the_interop_tests_skip_or_fail_under_require(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.tailscale import gobuild

    monkeypatch.setattr(gobuild, "go_binary", lambda: None)
    monkeypatch.delenv(gobuild.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="Go is not installed"):
        gobuild.tsvectors()
    monkeypatch.setenv(gobuild.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="forbids skipping"):
        gobuild.tsvectors()


def test_map_frames_both_ways_with_go_zstdframe() -> None:
    """Go's zstdframe (as Tailscale's servers encode and controlclient decodes) and ours agree."""
    import base64
    import random

    from embedmesh.tailscale import mapframe
    from tests.tailscale.make_vectors import run_mode

    rng = random.Random(os.urandom(8))
    bodies = [
        mapframe.KEEPALIVE_JSON,
        b"",
        bytes(rng.randrange(256) for _ in range(5000)),  # incompressible
        (b'{"PeersChangedPatch":[{"NodeID":%d}]}' % rng.randrange(1 << 40)) * 3000,  # > one 128 KiB block
    ]
    ours = [mapframe.MapFrameEncoder(level=level).encode(b)[4:] for b in bodies for level in (1, 3)]
    answer = run_mode(
        tsvectors(),
        "zstd",
        {"encode": [base64.b64encode(b).decode() for b in bodies], "decode": [base64.b64encode(f).decode() for f in ours]},
    )
    for body, default, fastest in zip(bodies, answer["encoded"], answer["encoded_fastest"], strict=True):
        for encoded in (default, fastest):
            frame = base64.b64decode(encoded)
            assert mapframe.MapStreamReader().receive_data(len(frame).to_bytes(4, "little") + frame) == [body]
    expected = [b for b in bodies for _ in (1, 3)]
    for body, result in zip(expected, answer["decoded"], strict=True):
        assert result["ok"], result
        assert base64.b64decode(result.get("data", "")) == body


def test_disco_packets_both_ways_with_go() -> None:
    """Fresh disco keys and nonces: Go opens what we seal and we open what Go seals."""
    import base64

    from embedmesh.tailscale import disco
    from embedmesh.tailscale.keys import DiscoPrivate
    from tests.tailscale.make_vectors import DISCO_MESSAGES, message_from_json, run_mode
    from tests.tailscale.test_disco import to_json

    go_key, our_key = DiscoPrivate.generate(os.urandom(32)), DiscoPrivate.generate(os.urandom(32))
    box = disco.DiscoBox(our_key, go_key.public())
    messages = [message_from_json(m) for m in DISCO_MESSAGES]
    ours = [box.seal(m, os.urandom(24)) for m in messages]
    answer = run_mode(
        tsvectors(),
        "disco",
        {
            "private": go_key.raw.hex(),
            "peer": our_key.public().raw.hex(),
            "seal": DISCO_MESSAGES,
            "open": [base64.b64encode(p).decode() for p in ours],
        },
    )
    assert answer["public"] == go_key.public().to_text()
    for message, sealed, opened in zip(messages, answer["sealed"], answer["opened"], strict=True):
        assert box.open(base64.b64decode(sealed)) == message
        assert opened["ok"] and opened["sender"] == our_key.public().to_text()
        assert opened["message"] == to_json(message)
