"""Regenerates the known-answer vectors in tests/tailscale/vectors/ from Tailscale's Go code.

    PYTHONPATH=src python3 -m tests.tailscale.make_vectors

Runs tsvectors (tailscale.com v1.102.5: controlbase, ts2021, disco, types/key) against embedmesh's
cores with fixed keys and writes what both sides sent. The tests replay these files without Go,
so every run checks the Python code against bytes that Go produced or accepted. Go's own nonces and
ephemeral keys are random, so a regeneration changes the files; each one is valid.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from embedmesh.tailscale.keys import ChallengePublic, MachinePrivate
from tests.tailscale import ts_harness
from tests.tailscale.gobuild import tsvectors

VECTORS = Path(__file__).resolve().parent / "vectors"
KAT_SIZES = [0, 1, 4077, 4078, 9000]


def fixed_bytes(label: str) -> bytes:
    """32 bytes derived from a label (the fixed keys of the vectors)."""
    return hashlib.sha256(b"embedmesh tailscale vectors/" + label.encode()).digest()


def b64(data: bytes | bytearray) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


def controlbase_vectors(binary: Path) -> dict[str, Any]:
    server_key = MachinePrivate.generate(fixed_bytes("server"))
    client_key = MachinePrivate.generate(fixed_bytes("client"))
    challenge = ChallengePublic(fixed_bytes("challenge"))
    version = 130
    client = ts_harness.python_client_vs_go_server(
        binary, server_key, client_key, fixed_bytes("client-ephemeral"), challenge, version, KAT_SIZES
    )
    server = ts_harness.go_client_vs_python_server(
        binary, server_key, client_key, fixed_bytes("server-ephemeral"), challenge, version, KAT_SIZES
    )

    def case(t: ts_harness.Transcript) -> dict[str, Any]:
        return {
            "python_out": b64(t.python_out),
            "go_out": b64(t.go_out),
            "plaintext_in_sha256": hashlib.sha256(t.plaintext_in).hexdigest(),
            "plaintext_in_length": len(t.plaintext_in),
            "go_report": t.report,
            "tx_counter": t.tx_counter,
            "rx_counter": t.rx_counter,
        }

    return {
        "comment": "tsvectors (tailscale.com v1.102.5) against embedmesh; see tests/tailscale/make_vectors.py",
        "server_key": server_key.to_text(),
        "client_key": client_key.to_text(),
        "client_ephemeral": fixed_bytes("client-ephemeral").hex(),
        "server_ephemeral": fixed_bytes("server-ephemeral").hex(),
        "challenge": challenge.to_text(),
        "version": version,
        "sizes": KAT_SIZES,
        "python_client_go_server": case(client),
        "go_client_python_server": case(server),
    }


def run_mode(binary: Path, mode: str, request: dict[str, Any]) -> dict[str, Any]:
    """One request to a JSON mode of tsvectors (disco, zstd): JSON in, JSON out."""
    result = subprocess.run(
        [str(binary), mode], input=json.dumps(request).encode(), capture_output=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"tsvectors {mode} failed: {result.stderr.decode()}")
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


KEY_RAWS = [bytes(32), bytes(range(32)), b"\xff" * 32, fixed_bytes("key-a"), fixed_bytes("key-b")]
UNMARSHAL_TEXTS = [
    "nodekey:" + bytes(range(32)).hex(),
    "nodekey:" + bytes(range(32)).hex().upper(),
    "NODEKEY:" + bytes(range(32)).hex(),
    "nodekey:" + bytes(range(32)).hex()[:-1],
    "nodekey:" + bytes(range(32)).hex() + "0",
    "nodekey:" + "g" * 64,
    "discokey:" + bytes(range(32)).hex(),
    bytes(range(32)).hex(),
    "",
]


def keys_vectors(binary: Path) -> dict[str, Any]:
    """Every text form of a few raw keys, and NodePublic.UnmarshalText on odd inputs, as Go does them."""
    peer = fixed_bytes("peer")
    answer = run_mode(
        binary,
        "disco",
        {
            "private": fixed_bytes("disco").hex(),
            "peer": peer.hex(),
            "keys": [k.hex() for k in KEY_RAWS],
            "unmarshal": UNMARSHAL_TEXTS,
        },
    )
    return {
        "comment": "tsvectors (tailscale.com v1.102.5 types/key); see tests/tailscale/make_vectors.py",
        "forms": [{"raw": k.hex(), "go": forms} for k, forms in zip(KEY_RAWS, answer["keys"], strict=True)],
        "unmarshal": [
            {"text": text, "go": result}
            for text, result in zip(UNMARSHAL_TEXTS, answer["unmarshal"], strict=True)
        ],
    }


def map_bodies() -> list[bytes]:
    """JSON bodies for the map-framing vectors: a keep-alive, a small map, a large one, nothing."""
    peers = ",".join(
        f'{{"ID":{i},"Key":"nodekey:{fixed_bytes(f"peer-{i}").hex()}","Name":"host-{i}.tail.example.",'
        f'"Addresses":["100.64.{i // 250}.{i % 250 + 1}/32"]}}'
        for i in range(1, 400)
    )
    return [
        b'{"KeepAlive":true}',
        b'{"Node":{"ID":1,"Name":"self.tail.example."},"Domain":"tail.example"}',
        ('{"Peers":[' + peers + "]}").encode(),
        b"",
    ]


def hostile_zstd(frame: bytes) -> dict[str, bytes]:
    """zstd inputs on which Go's decoder and ours must agree (accept or refuse)."""
    skippable = b"\x50\x2a\x4d\x18\x03\x00\x00\x00abc"
    return {
        "two_frames": frame + frame,
        "skippable_then_frame": skippable + frame,
        "truncated": frame[:-1],
        "truncated_header": frame[:5],
        "trailing_garbage": frame + b"\x00",
        "bad_checksum": frame[:-1] + bytes([frame[-1] ^ 1]),
        "not_zstd": b'{"KeepAlive":true}',
        "empty": b"",
    }


def mapframe_vectors(binary: Path) -> dict[str, Any]:
    import zstandard

    bodies = map_bodies()
    ours = [zstandard.ZstdCompressor(level=1, write_checksum=True).compress(b) for b in bodies]
    hostile = hostile_zstd(ours[1])
    answer = run_mode(
        binary,
        "zstd",
        {
            "encode": [b64(b) for b in bodies],
            "decode": [b64(f) for f in ours] + [b64(v) for v in hostile.values()],
        },
    )
    decoded = answer["decoded"]
    return {
        "comment": "tsvectors (tailscale.com v1.102.5 util/zstdframe); see tests/tailscale/make_vectors.py",
        "bodies": [
            {
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "body_length": len(body),
                "go_default": go_default,
                "go_fastest": go_fastest,
                "python_frame_sha256": hashlib.sha256(frame).hexdigest(),
                "go_decoded_python_frame": result["ok"] and base64.b64decode(result.get("data", "")) == body,
            }
            for body, go_default, go_fastest, frame, result in zip(
                bodies, answer["encoded"], answer["encoded_fastest"], ours, decoded, strict=False
            )
        ],
        "hostile": [
            {"name": name, "input": b64(data), "go_ok": result["ok"], "go_error": result.get("error", "")}
            for (name, data), result in zip(hostile.items(), decoded[len(ours) :], strict=True)
        ],
    }


DISCO_MESSAGES: list[dict[str, Any]] = [
    {"type": "ping", "tx_id": "00112233445566778899aabb"},
    {"type": "ping", "tx_id": "0102030405060708090a0b0c", "node_key": "nodekey:" + "ab" * 32},
    {"type": "ping", "tx_id": "0102030405060708090a0b0c", "node_key": "nodekey:" + "cd" * 32, "padding": 1200},
    {"type": "ping", "tx_id": "ffffffffffffffffffffffff", "padding": 20},
    {"type": "pong", "tx_id": "00112233445566778899aabb", "src": "192.0.2.7:41641"},
    {"type": "pong", "tx_id": "0102030405060708090a0b0c", "src": "[2001:db8::1]:65535"},
    {"type": "pong", "tx_id": "0102030405060708090a0b0c", "src": "[::ffff:10.0.0.1]:1"},
    {"type": "call_me_maybe", "endpoints": ["192.0.2.7:41641", "[2001:db8::2]:41642", "10.1.2.3:0"]},
    {"type": "call_me_maybe", "endpoints": []},
]


def disco_cleartexts() -> dict[str, bytes]:
    """Odd cleartexts on which Go's disco.Parse and ours must agree."""
    tx = bytes(range(12))
    v4 = bytes(10) + b"\xff\xff" + bytes([198, 51, 100, 9])
    return {
        "empty": b"",
        "one_byte": b"\x01",
        "ping_short": b"\x01\x00" + tx[:11],
        "ping_txid_only": b"\x01\x00" + tx,
        "ping_31_extra": b"\x01\x00" + tx + bytes(31),
        "ping_32_zero_extra": b"\x01\x00" + tx + bytes(32),
        "ping_version_7": b"\x01\x07" + tx + b"\x05" * 40,
        "pong_short": b"\x02\x00" + tx + v4 + b"\x01",
        "pong_v4_mapped": b"\x02\x00" + tx + v4 + b"\x12\x34",
        "pong_trailing": b"\x02\x00" + tx + bytes(15) + b"\x01" + b"\x00\x35" + b"junk",
        "cmm_empty": b"\x03\x00",
        "cmm_bad_length": b"\x03\x00" + v4 + b"\x00\x01" + b"\x00",
        "cmm_version_1": b"\x03\x01" + v4 + b"\x00\x01",
        "cmm_two": b"\x03\x00" + v4 + b"\x00\x01" + bytes(15) + b"\x01\xff\xff",
        "unknown_type": b"\x0a\x00" + tx,
        "type_zero": b"\x00\x00",
    }


def disco_vectors(binary: Path) -> dict[str, Any]:
    from embedmesh.tailscale import disco
    from embedmesh.tailscale.keys import DiscoPrivate

    go_private = DiscoPrivate.generate(fixed_bytes("disco-go"))
    py_private = DiscoPrivate.generate(fixed_bytes("disco-python"))
    box = disco.DiscoBox(py_private, go_private.public())
    ours = [
        box.seal(message_from_json(m), fixed_bytes(f"nonce-{i}")[:24]) for i, m in enumerate(DISCO_MESSAGES)
    ]
    cleartexts = disco_cleartexts()
    answer = run_mode(
        binary,
        "disco",
        {
            "private": go_private.raw.hex(),
            "peer": py_private.public().raw.hex(),
            "seal": DISCO_MESSAGES,
            "open": [b64(p) for p in ours],
            "marshal": DISCO_MESSAGES,
            "parse": [b64(c) for c in cleartexts.values()],
        },
    )
    return {
        "comment": "tsvectors (tailscale.com v1.102.5 disco, types/key); see tests/tailscale/make_vectors.py",
        "go_private": go_private.to_text(),
        "python_private": py_private.to_text(),
        "go_public": answer["public"],
        "messages": [
            {"message": m, "go_sealed": sealed, "python_sealed": b64(packet), "go_opened": opened, "go_marshaled": marshaled}
            for m, sealed, packet, opened, marshaled in zip(
                DISCO_MESSAGES, answer["sealed"], ours, answer["opened"], answer["marshaled"], strict=True
            )
        ],
        "parse": [
            {"name": name, "cleartext": b64(data), "go": result}
            for (name, data), result in zip(cleartexts.items(), answer["parsed"], strict=True)
        ],
    }


def message_from_json(m: dict[str, Any]) -> Any:
    """A disco message from tsvectors' JSON form."""
    import ipaddress

    from embedmesh.tailscale import disco
    from embedmesh.tailscale.keys import NodePublic

    def endpoint(text: str) -> tuple[Any, int]:
        host, _, port = text.rpartition(":")
        ip = ipaddress.ip_address(host.strip("[]"))
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # Go unmaps on parse
        return ip, int(port)

    tx = bytes.fromhex(m.get("tx_id", ""))
    if m["type"] == "ping":
        key = NodePublic.from_text(m["node_key"]) if m.get("node_key") else NodePublic.zero()
        return disco.Ping(tx, key, m.get("padding", 0))
    if m["type"] == "pong":
        return disco.Pong(tx, endpoint(m["src"]))
    return disco.CallMeMaybe(tuple(endpoint(e) for e in m.get("endpoints") or []))


def write(name: str, document: dict[str, Any]) -> None:
    VECTORS.mkdir(exist_ok=True)
    (VECTORS / name).write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {VECTORS / name}")


def main() -> None:
    binary = tsvectors()
    write("controlbase.json", controlbase_vectors(binary))
    write("keys.json", keys_vectors(binary))
    write("mapframe.json", mapframe_vectors(binary))
    write("disco.json", disco_vectors(binary))


if __name__ == "__main__":
    main()
