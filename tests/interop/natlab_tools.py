"""Small network tools the NAT lab runs inside its namespaces (standard library only).

Run as ``python3 natlab_tools.py COMMAND ...``; every command prints JSON lines on stdout.

``reflect ADDR [ADDR ...]``
    A UDP mapping reflector (STUN's idea, without STUN's format): a datagram ``map`` is answered
    from the socket it reached with ``{"mapped": "ip:port"}``, the source the packet arrived from;
    ``other`` is answered the same way, but from the *last* address given (another IP), which
    tells whether the sender's NAT lets in packets from an address it never sent to.
``probe --port P TARGET [TARGET ...] [--other TARGET]``
    From one UDP socket bound to port P: ``map`` to each TARGET, then ``other`` to the --other
    target; prints ``{"local": ..., "mapped": {target: "ip:port" | null}, "other": bool}``.
``echo LISTEN``
    A TCP echo server (what the matrix's time-to-first-byte is measured against).
``echo-client TARGET [--socks HOST:PORT] [--payload TEXT]``
    Connects (through a SOCKS5 proxy when given: tailscaled's or embedmesh's), sends the payload,
    reads it back; prints ``{"connect_s": ..., "ttfb_s": ..., "echo": ...}``.
``sink LISTEN``
    A TCP sink: for each connection, progress lines ``{"bytes": n, "t": seconds}`` and at the end
    ``{"done": true, "bytes": n, "sha256": hex}``.
``send TARGET --bytes N --rate BYTES_PER_S [--socks HOST:PORT] [--seed S]``
    Sends N bytes of a deterministic stream (SHA-256 in counter mode over the seed) at a steady
    rate, then closes; prints progress lines and ``{"done": true, "bytes": n, "sha256": hex}``.
``repeat TARGET --marker HEX --count N [--socks HOST:PORT]``
    Sends the marker N times over one TCP connection (the "relays see only ciphertext" payload).
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import select
import socket
import struct
import sys
import threading
import time


def _emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def _split(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def stream_block(seed: bytes, index: int) -> bytes:
    """Block ``index`` (32 bytes) of the deterministic stream of ``seed``."""
    return hashlib.sha256(seed + index.to_bytes(8, "big")).digest()


def stream_bytes(seed: bytes, total: int) -> bytes:
    """The first ``total`` bytes of the stream (for tests that check a sink's digest)."""
    out = bytearray()
    index = 0
    while len(out) < total:
        out += stream_block(seed, index)
        index += 1
    return bytes(out[:total])


# ------------------------------------------------------------------------------------------ UDP


def cmd_reflect(args: argparse.Namespace) -> int:
    socks = []
    for addr in args.addresses:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(_split(addr))
        socks.append(s)
    other = socks[-1]
    _emit(listening=[f"{h}:{p}" for h, p in (s.getsockname() for s in socks)])
    while True:
        ready, _, _ = select.select(socks, [], [])
        for s in ready:
            try:
                data, (host, port) = s.recvfrom(2048)
            except OSError:
                continue
            reply = json.dumps({"mapped": f"{host}:{port}"}).encode()
            with_socket = other if data.strip() == b"other" else s
            try:
                with_socket.sendto(reply, (host, port))
            except OSError:
                pass


def cmd_probe(args: argparse.Namespace) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", args.port))
    s.settimeout(args.timeout)
    mapped: dict[str, str | None] = {}

    def ask(target: str, what: bytes) -> str | None:
        for _ in range(args.tries):  # UDP: a lost probe is retried
            s.sendto(what, _split(target))
            try:
                data, _ = s.recvfrom(2048)
            except TimeoutError:
                continue
            return str(json.loads(data)["mapped"])
        return None

    for target in args.targets:
        mapped[target] = ask(target, b"map")
    other = None
    if args.other:
        other = ask(args.other, b"other") is not None
    _emit(local=f"{s.getsockname()[0]}:{s.getsockname()[1]}", mapped=mapped, other=other)
    return 0


# ------------------------------------------------------------------------------------------ TCP


def connect(target: str, socks: str | None, timeout: float) -> socket.socket:
    """A TCP connection to target, through a SOCKS5 proxy (no authentication) when given."""
    host, port = _split(target)
    if socks is None:
        return socket.create_connection((host, port), timeout=timeout)
    s = socket.create_connection(_split(socks), timeout=timeout)
    s.sendall(b"\x05\x01\x00")
    if _recv_exact(s, 2) != b"\x05\x00":
        raise OSError("the SOCKS5 proxy refused the handshake")
    try:
        packed = ipaddress.ip_address(host).packed
        request = b"\x05\x01\x00" + (b"\x01" if len(packed) == 4 else b"\x04") + packed
    except ValueError:
        name = host.encode()
        request = b"\x05\x01\x00\x03" + bytes([len(name)]) + name
    s.sendall(request + struct.pack(">H", port))
    head = _recv_exact(s, 4)
    if head[1] != 0:
        raise OSError(f"SOCKS5 connect to {target} failed: reply code {head[1]}")
    rest = {1: 4, 4: 16}.get(head[3])
    if rest is None:
        rest = _recv_exact(s, 1)[0]
    _recv_exact(s, rest + 2)
    return s


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise OSError("connection closed early")
        out += chunk
    return out


def cmd_echo(args: argparse.Namespace) -> int:
    server = socket.create_server(_split(args.listen), reuse_port=False)
    _emit(listening=args.listen)

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def cmd_echo_client(args: argparse.Namespace) -> int:
    payload = args.payload.encode()
    start = time.monotonic()
    with connect(args.target, args.socks, args.timeout) as s:
        connected = time.monotonic()
        s.settimeout(args.timeout)
        s.sendall(payload)
        got = s.recv(65536)
        first = time.monotonic()
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    _emit(connect_s=connected - start, ttfb_s=first - start, echo=got.decode(errors="replace"))
    return 0 if got == payload else 1


def cmd_sink(args: argparse.Namespace) -> int:
    server = socket.create_server(_split(args.listen))
    _emit(listening=args.listen)
    while True:
        conn, _ = server.accept()
        digest = hashlib.sha256()
        total = 0
        start = time.monotonic()
        last = 0.0
        with conn:
            while data := conn.recv(65536):
                digest.update(data)
                total += len(data)
                now = time.monotonic() - start
                if now - last >= args.every:
                    last = now
                    _emit(bytes=total, t=round(now, 3))
        _emit(done=True, bytes=total, sha256=digest.hexdigest(), t=round(time.monotonic() - start, 3))


def cmd_send(args: argparse.Namespace) -> int:
    seed = args.seed.encode()
    digest = hashlib.sha256()
    start = time.monotonic()
    sent = 0
    index = 0
    last = 0.0
    with connect(args.target, args.socks, args.timeout) as s:
        s.settimeout(args.timeout)
        _emit(connected=True, t=round(time.monotonic() - start, 3))
        while sent < args.bytes:
            # 1 KiB per step, held to the rate: a steady stream across path changes.
            block = b"".join(stream_block(seed, index + i) for i in range(32))
            index += 32
            block = block[: args.bytes - sent]
            due = start + (sent + len(block)) / args.rate
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            s.sendall(block)
            digest.update(block)
            sent += len(block)
            now = time.monotonic() - start
            if now - last >= args.every:
                last = now
                _emit(bytes=sent, t=round(now, 3))
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # the sink closes once it has everything
    _emit(done=True, bytes=sent, sha256=digest.hexdigest(), t=round(time.monotonic() - start, 3))
    return 0


def cmd_repeat(args: argparse.Namespace) -> int:
    marker = bytes.fromhex(args.marker)
    with connect(args.target, args.socks, args.timeout) as s:
        for _ in range(args.count):
            s.sendall(marker)
            time.sleep(args.pause)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)
    _emit(done=True, bytes=len(marker) * args.count)
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="natlab_tools.py")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("reflect")
    p.add_argument("addresses", nargs="+")
    p.set_defaults(fn=cmd_reflect)
    p = sub.add_parser("probe")
    p.add_argument("targets", nargs="+")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--other")
    p.add_argument("--timeout", type=float, default=0.3)
    p.add_argument("--tries", type=int, default=2)
    p.set_defaults(fn=cmd_probe)
    p = sub.add_parser("echo")
    p.add_argument("listen")
    p.set_defaults(fn=cmd_echo)
    p = sub.add_parser("echo-client")
    p.add_argument("target")
    p.add_argument("--socks")
    p.add_argument("--payload", default="natlab hello")
    p.add_argument("--timeout", type=float, default=20.0)
    p.set_defaults(fn=cmd_echo_client)
    p = sub.add_parser("sink")
    p.add_argument("listen")
    p.add_argument("--every", type=float, default=1.0)
    p.set_defaults(fn=cmd_sink)
    p = sub.add_parser("send")
    p.add_argument("target")
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--socks")
    p.add_argument("--seed", default="natlab")
    p.add_argument("--every", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(fn=cmd_send)
    p = sub.add_parser("repeat")
    p.add_argument("target")
    p.add_argument("--marker", required=True)
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--pause", type=float, default=0.05)
    p.add_argument("--socks")
    p.add_argument("--timeout", type=float, default=30.0)
    p.set_defaults(fn=cmd_repeat)
    args = parser.parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
