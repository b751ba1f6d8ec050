"""The runtime loop: real file descriptors and a real clock driving the sans-IO cores.

One reader task per link descriptor drains everything waiting (one wake-up, many packets), runs the
stack over the whole batch, then flushes what the cores produced as one batch and wakes the
application tasks whose sockets changed. One timer task sleeps until the earliest deadline of the
link and the stack, or until an application call moves that deadline closer.
"""

from __future__ import annotations

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
        read = self.link.read
        stack = self.stack
        deliver = stack.receive
        begin_batch = stack.begin_batch
        end_batch = stack.end_batch
        clock = self.clock
        while True:
            await anyio.wait_readable(readable)
            now = clock()
            # One batch (one read of the link): TCP ACKs its in-order data once, at the end.
            begin_batch()
            try:
                read(readable, deliver, now)
            finally:
                end_batch(now)
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
