"""Tailscale key types: text forms as Go's types/key writes and parses them, and key files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedmesh.errors import ConfigError, ParseError
from embedmesh.tailscale.keys import (
    ChallengePrivate,
    ChallengePublic,
    DiscoPrivate,
    DiscoPublic,
    KeyFormatError,
    MachinePrivate,
    MachinePublic,
    NLPublic,
    NodePrivate,
    NodePublic,
    load_or_create_private_key_file,
    read_private_key_file,
    write_private_key_file,
)

VECTORS = Path(__file__).resolve().parent / "vectors" / "keys.json"
RAW = bytes(range(32))


def test_text_forms_carry_their_prefix() -> None:
    assert MachinePublic(RAW).to_text() == "mkey:" + RAW.hex()
    assert NodePublic(RAW).to_text() == "nodekey:" + RAW.hex()
    assert DiscoPublic(RAW).to_text() == "discokey:" + RAW.hex()
    assert ChallengePublic(RAW).to_text() == "chalpub:" + RAW.hex()
    assert NLPublic(RAW).to_text() == "nlpub:" + RAW.hex()
    assert NodePrivate(RAW).to_text() == "privkey:" + RAW.hex()
    assert MachinePrivate(RAW).to_text() == "privkey:" + RAW.hex()


def test_parse_accepts_either_case_but_only_its_own_prefix() -> None:
    upper = "nodekey:" + RAW.hex().upper()
    assert NodePublic.from_text(upper) == NodePublic(RAW)
    assert NodePublic.from_text(upper.encode()) == NodePublic(RAW)
    with pytest.raises(KeyFormatError):
        NodePublic.from_text("discokey:" + RAW.hex())
    with pytest.raises(KeyFormatError):
        NodePublic.from_text("NODEKEY:" + RAW.hex())  # the prefix is case-sensitive in Go
    with pytest.raises(KeyFormatError):
        NodePublic.from_text("nodekey:" + RAW.hex()[:-1])
    with pytest.raises(KeyFormatError):
        NodePublic.from_text("nodekey:" + RAW.hex()[:-1] + "g")
    with pytest.raises(KeyFormatError):
        NodePublic.from_text("nodekey:" + "é" * 64)
    assert MachinePublic.from_untyped_hex(RAW.hex()) == MachinePublic(RAW)


def test_key_types_do_not_compare_equal_across_types() -> None:
    assert NodePublic(RAW) != DiscoPublic(RAW)
    assert len({NodePublic(RAW), DiscoPublic(RAW), NodePublic(bytes(RAW))}) == 2
    assert NodePublic.zero().is_zero and not NodePublic(RAW).is_zero


def test_private_keys_hide_their_bytes_and_derive_the_x25519_public() -> None:
    private = NodePrivate.generate(bytes(32))
    assert "privkey" not in repr(private) and private.raw.hex() not in repr(private)
    # Clamped as Go's clamp25519Private: the all-zero draw becomes a valid scalar.
    assert private.raw[0] & 7 == 0 and private.raw[31] & 0x80 == 0 and private.raw[31] & 0x40
    # RFC 7748's base point multiplication, checked against a known pair (§6.1, Alice).
    alice = MachinePrivate(bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"))
    assert alice.public().raw.hex() == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    with pytest.raises(ValueError):
        NodePrivate.zero().public()
    with pytest.raises(ValueError):
        ChallengePrivate(RAW).to_text()


def test_wrong_sizes_are_key_format_errors() -> None:
    for kind in (NodePublic, DiscoPrivate):
        with pytest.raises(KeyFormatError):
            kind(b"\x00" * 31)


def test_short_string_matches_go() -> None:
    # Go: "[" + base64(k)[:5] + "]", "" for the zero key.
    assert NodePublic(RAW).short_string() == "[AAECA]"
    assert NodePublic.zero().short_string() == ""


@pytest.mark.skipif(not VECTORS.exists(), reason="keys.json vectors not generated")
def test_text_forms_match_go_vectors() -> None:
    """tsvectors formatted these raw keys with tailscale.com/types/key (see make_vectors.py)."""
    vectors = json.loads(VECTORS.read_text())
    assert vectors["forms"], "no key vectors"
    for case in vectors["forms"]:
        raw = bytes.fromhex(case["raw"])
        go = case["go"]
        assert MachinePublic(raw).to_text() == go["machine_public"]
        assert NodePublic(raw).to_text() == go["node_public"]
        assert DiscoPublic(raw).to_text() == go["disco_public"]
        assert ChallengePublic(raw).to_text() == go["challenge_public"]
        assert NodePrivate(raw).to_text() == go["node_private"]
        assert MachinePrivate(raw).to_text() == go["machine_private"]
        assert json.dumps({"Key": NodePublic(raw).to_text()}, separators=(",", ":")) == go["node_public_json"]
        if "node_private_public" in go:
            assert NodePrivate(raw).public().to_text() == go["node_private_public"]
            assert MachinePrivate(raw).public().to_text() == go["machine_private_public"]
    for case in vectors["unmarshal"]:
        if case["go"]["ok"]:
            assert NodePublic.from_text(case["text"]).to_text() == case["go"]["sender"]
        else:
            with pytest.raises(KeyFormatError):
                NodePublic.from_text(case["text"])


@given(st.binary(min_size=32, max_size=32))
def test_text_round_trip(raw: bytes) -> None:
    for kind in (MachinePublic, NodePublic, DiscoPublic, ChallengePublic, NLPublic):
        key = kind(raw)
        assert kind.from_text(key.to_text()) == key
        assert kind.from_text(key.to_text().upper().replace(kind.PREFIX.upper(), kind.PREFIX)) == key
    assert NodePrivate.from_text(NodePrivate(raw).to_text()) == NodePrivate(raw)


@given(st.one_of(st.text(max_size=90), st.binary(max_size=90)))
def test_garbage_text_raises_only_key_format_error(text: str | bytes) -> None:
    for kind in (NodePublic, DiscoPublic, MachinePrivate):
        try:
            kind.from_text(text)
        except KeyFormatError as exc:
            assert isinstance(exc, ParseError)


def test_key_file_is_private_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "state" / "machine.key"
    draws: list[int] = []

    def random_bytes(n: int) -> bytes:
        draws.append(n)
        return b"\x11" * n

    key, created = load_or_create_private_key_file(path, MachinePrivate, random_bytes)
    assert created and draws == [32]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_text() == key.to_text() + "\n"
    again, created = load_or_create_private_key_file(path, MachinePrivate, random_bytes)
    assert not created and again == key and draws == [32]


def test_key_file_is_tightened_and_damage_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    write_private_key_file(path, NodePrivate.generate(os.urandom(32)))
    path.chmod(0o644)
    read_private_key_file(path, NodePrivate)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = "privkey:" + "ab" * 31 + "zz"
    path.write_text(secret)
    with pytest.raises(ConfigError) as info:
        read_private_key_file(path, NodePrivate)
    assert secret not in str(info.value) and "delete it" in str(info.value)
    path.write_text(NodePrivate.zero().to_text())
    with pytest.raises(ConfigError):
        read_private_key_file(path, NodePrivate)
    with pytest.raises(ConfigError):
        read_private_key_file(tmp_path / "missing.key", NodePrivate)
