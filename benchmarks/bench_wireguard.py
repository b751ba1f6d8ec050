"""WireGuard engine throughput against the raw cipher, in one run.

Prints handshakes per second, transport packets per second (encrypt and decrypt through the
device) for 1,280-byte IP packets, and the cost of the bare ChaCha20-Poly1305 call with OpenSSL
(``cryptography``) and libsodium (pynacl), so the engine's own overhead is a ratio.

    python benchmarks/bench_wireguard.py [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import random
import struct
import time

import nacl.bindings as sodium
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from embedmesh.wire.ip import PROTO_UDP, build_ip
from embedmesh.wireguard import crypto
from embedmesh.wireguard.device import WireGuardDevice

A_EP = ("198.18.0.1", 51820)
B_EP = ("198.18.0.2", 51820)


def timed(fn, seconds: float) -> float:  # type: ignore[no-untyped-def]
    """Calls per second of fn() (fn runs a batch of 100 and returns nothing)."""
    count = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        fn()
        count += 100
    return count / (time.perf_counter() - start)


def pair(rng: random.Random) -> tuple[WireGuardDevice, WireGuardDevice]:
    a = WireGuardDevice(crypto.generate_private_key(rng.randbytes(32)), random_bytes=rng.randbytes, rng=rng)
    b = WireGuardDevice(crypto.generate_private_key(rng.randbytes(32)), random_bytes=rng.randbytes, rng=rng)
    a.add_peer(b.public_key, allowed_ips=["100.64.0.2/32"], endpoint=B_EP)
    b.add_peer(a.public_key, allowed_ips=["100.64.0.1/32"], endpoint=A_EP)
    return a, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    args = parser.parse_args()
    rng = random.Random(7)
    seconds = args.seconds

    # Handshakes: initiation + response + confirmation, each a full X25519-heavy exchange.
    a, b = pair(rng)
    peer_b = a.peers[b.public_key]
    clock = [0.0]

    def handshakes() -> None:
        for _ in range(100):
            clock[0] += 10.0  # past REKEY_TIMEOUT so every call starts a fresh handshake
            a.initiate_handshake(peer_b, clock[0])
            for data, _ in a.datagrams_to_send():
                b.receive_datagram(data, A_EP, clock[0])
            for data, _ in b.datagrams_to_send():
                a.receive_datagram(data, B_EP, clock[0])
            for data, _ in a.datagrams_to_send():
                b.receive_datagram(data, A_EP, clock[0])

    hs = timed(handshakes, seconds)

    a, b = pair(rng)
    payload = rng.randbytes(1280 - 28)
    packet = build_ip(bytes([100, 64, 0, 1]), bytes([100, 64, 0, 2]), PROTO_UDP, b"\x00" * 8 + payload)
    assert len(packet) == 1280
    a.send_packet(packet, 1.0)
    for _ in range(3):
        for src, dst, ep in ((a, b, A_EP), (b, a, B_EP)):
            for data, _ in src.datagrams_to_send():
                dst.receive_datagram(data, ep, 1.0)
    encrypted: list[bytes] = []

    def encrypt() -> None:
        send = a.send_packet
        for _ in range(100):
            send(packet, 1.0)
        out = a.datagrams_to_send()
        if len(encrypted) < 200_000:
            encrypted.extend(d for d, _ in out)

    enc = timed(encrypt, seconds)
    index = [0]

    def decrypt() -> None:
        receive = b.receive_datagram
        i = index[0]
        for data in encrypted[i : i + 100]:
            receive(data, A_EP, 1.0)
        index[0] = i + 100

    dec = timed(decrypt, min(seconds, 0.9 * len(encrypted) / 100 / 20_000)) if encrypted else 0.0
    assert b.counters["drop_replay"] == 0

    key = rng.randbytes(32)
    ossl = ChaCha20Poly1305(key)
    plaintext = packet
    nonce_pack = struct.Struct("<4xQ").pack

    def raw_openssl() -> None:
        for i in range(100):
            ossl.encrypt(nonce_pack(i), plaintext, None)

    def raw_sodium() -> None:
        for i in range(100):
            sodium.crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, None, nonce_pack(i), key)

    raw_o = timed(raw_openssl, seconds)
    raw_s = timed(raw_sodium, seconds)

    print(f"handshakes (initiation+response+confirm): {hs:10.0f} /s")
    print(
        f"transport encrypt, 1280-byte packets:      {enc:10.0f} /s  ({1e6 / enc:.2f} µs, {enc * 1280 / 1e6:.0f} MB/s)"
    )
    print(
        f"transport decrypt, 1280-byte packets:      {dec:10.0f} /s  ({1e6 / dec:.2f} µs, {dec * 1280 / 1e6:.0f} MB/s)"
    )
    print(f"raw seal, cryptography (OpenSSL):          {raw_o:10.0f} /s  ({1e6 / raw_o:.2f} µs)")
    print(f"raw seal, pynacl (libsodium):              {raw_s:10.0f} /s  ({1e6 / raw_s:.2f} µs)")
    print(f"OpenSSL / libsodium speed:                 {raw_o / raw_s:10.2f}x")
    print(f"engine encrypt cost / raw OpenSSL seal:    {raw_o / enc:10.2f}x")
    print(f"engine decrypt cost / raw OpenSSL seal:    {raw_o / dec:10.2f}x")


if __name__ == "__main__":
    main()
