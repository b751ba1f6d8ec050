"""A control-only load client of Tailscale's protocol: many clients in one process, one asyncio loop.

Each client is what a Tailscale client does on the control plane, and nothing else: a TCP
connection to the server on loopback, ``POST /ts2021`` with the Noise IK initiation, HTTP/2 inside
the Noise records (h2), ``POST /machine/register`` with a pre-auth key, then the streaming
``POST /machine/map`` (``Compress: zstd``, endpoints and disco key in the request), whose messages
it unframes and decompresses. To stay cheap at 10,000 clients it does not build a network map: it
keeps a bitmap of the peer ids it has heard of (a regular expression over each decompressed
message finds them) and looks for the endpoints it was told to watch as bytes in each message.

``bench_control_tailscale.py`` starts one or more of these (one per core) and drives them through
stdin and stdout, one JSON object a line:

* out ``{"event": "ready"}``, then in ``{"cmd": "go"}``: the clients start;
* out ``{"event": "registered", "t": T}``: every client of this process holds its first map
  (``T`` is ``time.monotonic()``, which is one clock for all processes on Linux);
* out ``{"event": "converged", "t": T}``: every client knows all ``--total - 1`` peers;
* in ``{"cmd": "change", "client": I, "endpoint": E}``: client ``I`` (if it is ours) sends ``E``
  as its only endpoint in a "lite" map request (``OmitPeers``, not streaming), and every other
  client watches for ``E``; out ``{"event": "seen", "endpoint": E, "t": T, "sent": S}`` once all of
  ours have it (``T``: the last arrival; ``S``: when the mover sent it, if it is ours);
* in ``{"cmd": "stop"}``: out ``{"event": "stats", "cpu": seconds, "rss": bytes, ...}``, exit.

Errors (a refused registration, a connection that broke) end the process with a message on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import sys
import time
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx

from embedmesh.tailscale import controlbase, controlhttp, mapframe, tailcfg
from embedmesh.tailscale.keys import DiscoPrivate, MachinePrivate, MachinePublic, NodePrivate

WINDOW = 16 << 20
#: Both servers write a node as ``"ID":<n>,"StableID":...`` (tailcfg.Node's field order).
_PEER_ID = re.compile(rb'"ID":(\d+),"StableID"')
_SELF = re.compile(rb'"Node":\{"ID":(\d+),')


class LoadClient(asyncio.Protocol):
    """One Tailscale client's control connection (see the module docstring)."""

    def __init__(self, fleet: Fleet, index: int) -> None:
        self.fleet = fleet
        self.index = index
        self.machine = MachinePrivate.generate(os.urandom(32))
        self.node = NodePrivate.generate(os.urandom(32)).public()
        self.disco = DiscoPrivate.generate(os.urandom(32)).public()
        self.hostinfo = tailcfg.hostinfo(f"load{index}", "linux", version="tsload")
        self.noise = controlbase.ClientConnection(
            self.machine, fleet.server_key, tailcfg.CAPABILITY_VERSION, os.urandom(32)
        )
        self.upgrade: controlhttp.UpgradeClient | None = controlhttp.UpgradeClient(
            fleet.host, self.noise.initiation
        )
        self.early = controlbase.EarlyPayloadReader()
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.transport: asyncio.Transport | None = None
        self.reader = mapframe.MapStreamReader(compressed=True)
        self.bodies: dict[int, bytearray] = {}
        self.status: dict[int, int] = {}
        self.register_stream = 0
        self.map_stream = 0
        self.self_id = -1
        self.known = bytearray(fleet.total + 2)
        self.peers = 0
        self.has_map = False
        self.restarts = 0
        self.endpoints = [f"192.0.2.{index % 250 + 1}:41641"]
        self.connected = asyncio.get_running_loop().create_future()

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        assert self.upgrade is not None
        transport.write(self.upgrade.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.fleet.stopping:
            self.fleet.fail(f"client {self.index}: connection lost ({exc})")

    def data_received(self, data: bytes) -> None:
        try:
            self._receive(data)
        except Exception as exc:  # a load client reports and stops; it does not recover
            self.fleet.fail(f"client {self.index}: {type(exc).__name__}: {exc}")

    def _receive(self, data: bytes) -> None:
        if self.upgrade is not None:
            leftover = self.upgrade.receive_data(data)
            if leftover is None:
                return
            self.upgrade = None
            data = leftover
        established = self.noise.established
        plaintext = self.noise.receive_data(data)
        if not established and self.noise.established:
            self._start()
        plaintext = self.early.receive(plaintext) if plaintext else b""
        if plaintext:
            for event in self.h2.receive_data(plaintext):
                self._dispatch(event)
        self._flush()

    # ------------------------------------------------------------------ HTTP/2

    def _start(self) -> None:
        self.h2.initiate_connection()
        self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW})
        self.h2.increment_flow_control_window(WINDOW)
        body = tailcfg.register_request(self.node, hostinfo=self.hostinfo, auth_key=self.fleet.auth_key)
        self.register_stream = self._post("/machine/register", body)

    def _post(self, path: str, body: bytes) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(
            stream_id,
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":authority", self.fleet.host),
                (":path", path),
                ("content-length", str(len(body))),
            ],
        )
        self.h2.send_data(stream_id, body, end_stream=True)
        self.bodies[stream_id] = bytearray()
        return stream_id

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None:
            self.transport.write(self.noise.send(data))

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            for key, value in event.headers or ():
                if key == b":status":
                    self.status[event.stream_id] = int(value)
        elif isinstance(event, h2.events.DataReceived):
            self.h2.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
            if event.stream_id == self.map_stream and self.map_stream:
                for message in self.reader.receive_data(event.data or b""):
                    self._message(message)
            elif event.stream_id in self.bodies:
                self.bodies[event.stream_id] += event.data or b""
        elif isinstance(event, h2.events.StreamEnded):
            stream_id = event.stream_id
            body = bytes(self.bodies.pop(stream_id, b""))
            status = self.status.pop(stream_id, 0)
            if stream_id == self.register_stream:
                answer = json.loads(body) if status == 200 else {}
                if not answer.get("MachineAuthorized"):
                    raise RuntimeError(f"registration refused: HTTP {status} {body[:200]!r}")
                self.map_stream = self._map(stream=True, endpoints=self.endpoints)
            elif stream_id == self.map_stream:
                # Tailscale's client polls again when a map stream ends (headscale ends them
                # now and then); the new stream starts with a full map.
                self.restarts += 1
                self.reader = mapframe.MapStreamReader(compressed=True)
                self.map_stream = self._map(stream=True, endpoints=self.endpoints)
            elif status != 200:
                raise RuntimeError(f"a lite map request got HTTP {status} {body[:200]!r}")
        elif isinstance(event, h2.events.StreamReset):
            raise RuntimeError(f"the server reset stream {event.stream_id}")
        elif isinstance(event, h2.events.ConnectionTerminated) and not self.fleet.stopping:
            raise RuntimeError(f"the server ended the connection ({event.error_code!r})")

    def _map(self, *, stream: bool, endpoints: list[str]) -> int:
        body = tailcfg.map_request(
            self.node,
            self.disco,
            hostinfo=self.hostinfo,
            endpoints=endpoints,
            stream=stream,
            omit_peers=not stream,
        )
        return self._post("/machine/map", body)

    def change_endpoint(self, endpoint: str) -> None:
        self.endpoints = [endpoint]
        self._map(stream=False, endpoints=[endpoint])
        self._flush()

    # ------------------------------------------------------------------ map messages

    def _message(self, body: bytes) -> None:
        now = time.monotonic()
        fleet = self.fleet
        known = self.known
        if not self.has_map:
            if b'"Node":' not in body:
                return
            self.has_map = True
            match = _SELF.search(body)
            self.self_id = int(match.group(1)) if match else -1
            fleet.first_map(self, now)
        if b'"Peers":[' in body or b'"PeersChanged":[' in body:
            if b'"Peers":[' in body and b'"Peers":[]' not in body:
                # A full list replaces what was known.
                self.known = known = bytearray(len(known))
                self.peers = 0
            added = 0
            self_id = self.self_id
            for text in _PEER_ID.findall(body):
                peer = int(text)
                if peer == self_id:
                    continue
                if peer >= len(known):
                    known.extend(bytes(peer + 1 - len(known)))
                if not known[peer]:
                    known[peer] = 1
                    added += 1
            if added:
                self.peers += added
                if self.peers >= fleet.total - 1:
                    fleet.converged_one(self, now)
        if fleet.watching:
            for endpoint in [e for e in fleet.watching if e in body]:
                fleet.saw(self, endpoint, now)


class Fleet:
    """This process's clients and their progress."""

    def __init__(
        self, url: str, server_key: MachinePublic, auth_key: str, first: int, count: int, total: int
    ) -> None:
        self.url = url
        self.host = url.split("://", 1)[-1]
        self.server_key = server_key
        self.auth_key = auth_key
        self.first = first
        self.total = total
        self.clients: dict[int, LoadClient] = {}
        self.count = count
        self.stopping = False
        self.with_map = 0
        self.last_first_map = 0.0
        self.converged: set[int] = set()
        self.last_converged = 0.0
        #: endpoint (bytes) -> the clients of ours still to see it, and the last arrival.
        self.watching: dict[bytes, set[int]] = {}
        self.last_seen: dict[bytes, float] = {}
        self.sent: dict[bytes, float] = {}
        self.done = asyncio.get_running_loop().create_future()

    def emit(self, **fields: Any) -> None:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    def fail(self, message: str) -> None:
        if not self.stopping:
            self.stopping = True
            print(f"tsload: {message}", file=sys.stderr, flush=True)
            os._exit(2)

    def first_map(self, client: LoadClient, now: float) -> None:
        self.with_map += 1
        self.last_first_map = max(self.last_first_map, now)
        if self.with_map == self.count:
            self.emit(event="registered", t=self.last_first_map)

    def converged_one(self, client: LoadClient, now: float) -> None:
        if client.index not in self.converged:
            self.converged.add(client.index)
            self.last_converged = max(self.last_converged, now)
            if len(self.converged) == self.count:
                self.emit(event="converged", t=self.last_converged)

    def saw(self, client: LoadClient, endpoint: bytes, now: float) -> None:
        waiting = self.watching[endpoint]
        waiting.discard(client.index)
        self.last_seen[endpoint] = max(self.last_seen.get(endpoint, 0.0), now)
        if not waiting:
            del self.watching[endpoint]
            self.emit(
                event="seen",
                endpoint=endpoint.decode(),
                t=self.last_seen.pop(endpoint),
                sent=self.sent.pop(endpoint, None),
            )

    def change(self, mover: int, endpoint: str) -> None:
        key = endpoint.encode()
        self.watching[key] = {i for i in self.clients if i != mover}
        if mover in self.clients:
            self.sent[key] = time.monotonic()
            self.clients[mover].change_endpoint(endpoint)
        if not self.watching[key]:
            del self.watching[key]
            self.emit(event="seen", endpoint=endpoint, t=time.monotonic(), sent=self.sent.pop(key, None))


async def run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    key = controlhttp.parse_key_response(
        httpx.get(args.url + controlhttp.key_path(tailcfg.CAPABILITY_VERSION), timeout=10).content
    )
    fleet = Fleet(args.url, key, args.auth_key, args.first, args.count, args.total)
    host, port = fleet.host.rsplit(":", 1)
    gate = asyncio.Semaphore(args.concurrency)

    async def connect(index: int) -> None:
        async with gate:
            client = LoadClient(fleet, index)
            fleet.clients[index] = client
            # Spread sources over 127.0.0.0/8 so 10,000 connections never run out of local ports.
            source = f"127.{1 + index // 60000}.{index // 250 % 240 + 1}.{index % 250 + 1}"
            await loop.create_connection(lambda: client, host, int(port), local_addr=(source, 0))
            # Hold the slot until this client has its first map: a fleet starting, a bounded number
            # of registrations in flight per process (the rest wait to connect).
            while not client.has_map:
                await asyncio.sleep(0.005)

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    # Everyone starts together, once every process has its imports and the server key.
    fleet.emit(event="ready")
    line = await reader.readline()
    if json.loads(line or b"{}").get("cmd") != "go":
        return
    starting = [asyncio.ensure_future(connect(i)) for i in range(args.first, args.first + args.count)]
    while True:
        line = await reader.readline()
        if not line:
            break
        command = json.loads(line)
        if command["cmd"] == "change":
            fleet.change(int(command["client"]), str(command["endpoint"]))
        elif command["cmd"] == "stop":
            break
    fleet.stopping = True
    for task in starting:
        task.cancel()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peers = [c.peers for c in fleet.clients.values()]
    fleet.emit(
        event="stats",
        cpu=usage.ru_utime + usage.ru_stime,
        rss=usage.ru_maxrss * 1024,
        min_peers=min(peers, default=0),
        with_map=fleet.with_map,
        converged=len(fleet.converged),
        still_watching={e.decode(): sorted(w)[:10] for e, w in fleet.watching.items()},
        restarts=sum(c.restarts for c in fleet.clients.values()),
    )
    for client in fleet.clients.values():
        if client.transport is not None:
            client.transport.abort()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--auth-key", required=True)
    parser.add_argument("--first", type=int, default=0, help="index of this process's first client")
    parser.add_argument("--count", type=int, required=True, help="clients in this process")
    parser.add_argument("--total", type=int, required=True, help="clients in all processes")
    parser.add_argument("--concurrency", type=int, default=32, help="registrations in flight")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, args.count + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
