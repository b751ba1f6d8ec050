"""The runtime loop: real file descriptors and a real clock driving the sans-IO cores.

One reader per link descriptor reads a batch of packets per wake-up (a callback that stays
registered on asyncio, a task waiting for readiness elsewhere), runs the stack over the whole batch
(TCP in batch mode: one ACK per connection and batch), then flushes what the cores produced as one
batch and wakes the application tasks whose sockets changed. One timer task sleeps until the earliest deadline of the
link and the stack, or until an application call moves that deadline closer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections.abc import Callable

import anyio
import anyio.abc

from embedmesh.netstack.stack import Netstack
from embedmesh.runtime.links import Link

logger = logging.getLogger("embedmesh.runtime")


class DataPlane:
    """Moves packets between a link and the overlay stack, and keeps their timers."""

    def __init__(self, stack: Netstack, link: Link, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.stack = stack
        self.link = link
        self.clock = clock
        stack.transmit = link.send
        self._wake = anyio.Event()
        self._sleep_until = math.inf
        #: Called after every batch of input, timer run or application call, once output is
        #: flushed: the socket layer wakes the tasks whose connections changed.
        self.after_activity: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ tasks

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            for readable in self.link.readables():
                tg.start_soon(self._read_loop, readable)
            tg.start_soon(self._timer_loop)
            task_status.started()

    async def _read_loop(self, readable: socket.socket | int) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None  # another backend (trio): wait for readiness, then read a batch
        if loop is not None:
            await self._read_by_callback(loop, readable)
            return
        read_batch = self._read_batch
        while True:
            await anyio.wait_readable(readable)
            read_batch(readable)

    async def _read_by_callback(self, loop: asyncio.AbstractEventLoop, readable: socket.socket | int) -> None:
        """On asyncio, a reader callback that stays registered reads each batch inside the event loop.

        anyio's ``wait_readable`` adds and removes the reader, creates a future and wakes this task
        for every batch; a callback costs one ``epoll_wait`` per batch (``research/performance.md``:
        a draining reader callback, 0.88 µs per datagram). While data is waiting, the level-triggered
        selector calls it again after the tasks it woke had their turn. A failure in the cores is
        raised here, in the task, as it would be from the loop.
        """
        fd = readable if isinstance(readable, int) else readable.fileno()
        failed = anyio.Event()
        failure: list[BaseException] = []

        def on_readable() -> None:
            try:
                self._read_batch(readable)
            except BaseException as exc:
                loop.remove_reader(fd)
                failure.append(exc)
                failed.set()

        loop.add_reader(fd, on_readable)
        try:
            await failed.wait()
        finally:
            loop.remove_reader(fd)
        raise failure[0]

    def _read_batch(self, readable: socket.socket | int) -> None:
        """One batch (one read of the link): TCP ACKs its in-order data once, at the end."""
        stack = self.stack
        now = self.clock()
        stack.begin_batch()
        try:
            self.link.read(readable, stack.receive, now)
        finally:
            stack.end_batch(now)
        self.kick()

    async def _timer_loop(self) -> None:
        while True:
            deadline = self._next_deadline()
            self._wake = anyio.Event()
            self._sleep_until = deadline
            delay = deadline - self.clock()
            if delay > 0:
                with anyio.move_on_after(delay if deadline != math.inf else None):
                    await self._wake.wait()
            self._sleep_until = math.inf
            now = self.clock()
            self.link.handle_timeout(now)
            self.stack.handle_timeout(now)
            self._after()

    def _next_deadline(self) -> float:
        deadline = math.inf
        for at in (self.link.next_deadline(), self.stack.next_deadline()):
            if at is not None and at < deadline:
                deadline = at
        return deadline

    # ------------------------------------------------------------------ after every input

    def _after(self) -> None:
        self.link.flush()
        for callback in self.after_activity:
            callback()

    def kick(self) -> None:
        """Flush output, wake changed sockets, and wake the timer task if a deadline moved closer.

        Call after anything that fed the cores outside the reader and timer tasks.
        """
        self._after()
        if self._next_deadline() < self._sleep_until:
            self._wake.set()
