"""Runs embedmesh's controlbase cores against tsvectors (Tailscale's Go controlbase) and records
the transcript, for the interop tests and for tests/tailscale/make_vectors.py.

The exchange inside Noise is tsvectors' echo protocol: each message is [u32 BE length][payload] and
comes back unchanged; length 0xFFFFFFFF ends it. Every function here kills its process on the way
out, whatever happened.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedmesh.tailscale.controlbase import (
    ClientConnection,
    EarlyPayloadReader,
    ServerConnection,
    encode_early_payload,
)
from embedmesh.tailscale.keys import ChallengePublic, MachinePrivate, MachinePublic

END = 0xFFFFFFFF
_U32 = struct.Struct("!I")
TIMEOUT = 60.0


@dataclass
class Transcript:
    """Everything that crossed the pipe, in order, plus what each side made of it."""

    python_out: bytearray = field(default_factory=bytearray)
    go_out: bytearray = field(default_factory=bytearray)
    plaintext_in: bytearray = field(default_factory=bytearray)
    report: dict[str, Any] = field(default_factory=dict)
    handshake_hash: bytes = b""
    tx_counter: int = 0
    rx_counter: int = 0


class _Pipe:
    def __init__(self, process: subprocess.Popen[bytes], transcript: Transcript) -> None:
        self.process = process
        self.transcript = transcript
        self.deadline = time.monotonic() + TIMEOUT
        assert process.stdin is not None and process.stdout is not None
        self._in = process.stdout.fileno()
        self._out = process.stdin

    def write(self, data: bytes) -> None:
        self.transcript.python_out += data
        self._out.write(data)
        self._out.flush()

    def read(self) -> bytes:
        remaining = self.deadline - time.monotonic()
        ready, _, _ = select.select([self._in], [], [], max(remaining, 0))
        if not ready:
            raise TimeoutError("tsvectors sent nothing in time")
        data = os.read(self._in, 65536)
        if not data:
            stderr = self.process.stderr.read().decode() if self.process.stderr else ""
            raise EOFError(f"tsvectors closed the stream: {stderr}")
        self.transcript.go_out += data
        return data


def _spawn(binary: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(binary), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _finish(process: subprocess.Popen[bytes]) -> dict[str, Any]:
    assert process.stdin is not None and process.stderr is not None
    process.stdin.close()
    try:
        process.wait(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = process.stderr.read().decode()
    if process.returncode != 0:
        raise AssertionError(f"tsvectors exited {process.returncode}: {stderr}")
    lines = [line for line in stderr.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def messages(sizes: list[int], seed: int) -> list[bytes]:
    """Deterministic message contents (so a recorded transcript can be checked offline)."""
    out = []
    for i, size in enumerate(sizes):
        stream = b""
        counter = 0
        while len(stream) < size:
            stream += hashlib.sha256(f"{seed}/{i}/{counter}".encode()).digest()
            counter += 1
        out.append(stream[:size])
    return out


def python_client_vs_go_server(
    binary: Path,
    server_key: MachinePrivate,
    client_key: MachinePrivate,
    ephemeral: bytes,
    challenge: ChallengePublic,
    version: int,
    sizes: list[int],
    *,
    empty_records: bool = True,
    server_public: MachinePublic | None = None,
) -> Transcript:
    """Our ClientConnection talks to Go's controlbase.Server (which sends an early payload).

    ``server_public`` overrides the key the client expects (a wrong one must fail)."""
    transcript = Transcript()
    process = _spawn(binary, "noise-server", "-key", server_key.raw.hex(), "-challenge", challenge.raw.hex())
    try:
        pipe = _Pipe(process, transcript)
        expected = server_public if server_public is not None else server_key.public()
        client = ClientConnection(client_key, expected, version, ephemeral)
        pipe.write(client.initiation)
        early = EarlyPayloadReader()
        stream = bytearray()

        def pump(need: int) -> None:
            while not client.established or len(stream) < need:
                plaintext = client.receive_data(pipe.read())
                transcript.plaintext_in += plaintext
                stream.extend(early.receive(plaintext))

        pump(0)
        for message in messages(sizes, seed=version):
            # An empty record first: Go must skip it (and count its nonce).
            prefix = client.send_record(b"") if empty_records else b""
            pipe.write(prefix + client.send(_U32.pack(len(message)) + message))
            pump(4 + len(message))
            got = bytes(stream[4 : 4 + len(message)])
            assert _U32.unpack_from(stream)[0] == len(message) and got == message, "echo differs"
            del stream[: 4 + len(message)]
        pipe.write(client.send(_U32.pack(END)))
        pump(4)
        assert _U32.unpack_from(stream)[0] == END
        assert early.early_payload is not None
        transcript.report = _finish(process)
        transcript.report["early_challenge"] = early.early_payload.node_key_challenge.to_text()
        assert client.session is not None
        transcript.handshake_hash = client.session.handshake_hash
        transcript.tx_counter, transcript.rx_counter = client.tx.counter, client.rx.counter
        return transcript
    finally:
        _kill(process)


def go_client_vs_python_server(
    binary: Path,
    server_key: MachinePrivate,
    client_key: MachinePrivate,
    ephemeral: bytes,
    challenge: ChallengePublic,
    version: int,
    sizes: list[int],
    *,
    go_server_public: MachinePublic | None = None,
) -> Transcript:
    """Go's controlbase.Client (wrapped in ts2021.Conn) talks to our ServerConnection.

    ``go_server_public`` overrides the key the Go client expects (a wrong one must fail)."""
    transcript = Transcript()
    process = _spawn(
        binary,
        "noise-client",
        "-key",
        client_key.raw.hex(),
        "-server",
        (go_server_public if go_server_public is not None else server_key.public()).raw.hex(),
        "-version",
        str(version),
        "-sizes",
        ",".join(map(str, sizes)),
    )
    try:
        pipe = _Pipe(process, transcript)
        server = ServerConnection(server_key, ephemeral)
        stream = bytearray()

        def feed() -> None:
            plaintext = server.receive_data(pipe.read())
            transcript.plaintext_in += plaintext
            stream.extend(plaintext)

        while not server.established:
            feed()
        pipe.write(server.data_to_send() + server.send(encode_early_payload(challenge)))
        while True:
            while len(stream) < 4:
                feed()
            (length,) = _U32.unpack_from(stream)
            if length == END:
                pipe.write(server.send(_U32.pack(END)))
                break
            while len(stream) < 4 + length:
                feed()
            # Echo in pieces of odd sizes, so records and messages don't line up.
            echo = bytes(stream[: 4 + length])
            del stream[: 4 + length]
            for start in range(0, len(echo), 3000):
                pipe.write(server.send(echo[start : start + 3000]))
        transcript.report = _finish(process)
        assert server.session is not None
        transcript.handshake_hash = server.session.handshake_hash
        transcript.tx_counter, transcript.rx_counter = server.tx.counter, server.rx.counter
        transcript.report["python_saw_peer"] = server.session.peer.to_text()
        transcript.report["python_saw_version"] = server.session.version
        return transcript
    finally:
        _kill(process)
