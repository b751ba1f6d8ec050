"""How `embedmesh up` ends and how scripts drive it: signals, `embedmesh down` and
`embedmesh status --wait`.

A CI job, a container or a systemd unit runs `embedmesh up` in the background, waits until the
node is ready, does its work and stops the node. Each step here gives such a script one plain
answer: an exit code and, on failure, one line.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import click

from embedmesh.errors import EmbedmeshError
from embedmesh.localapi import LocalAPIError, NodeNotRunningError, request
from embedmesh.statelock import holder_pid, is_locked

#: How often `status --wait` and `down` look again.
POLL_INTERVAL = 0.1


def cli_error(exc: BaseException) -> click.ClickException | None:
    """The one-line error for ``exc`` if it is an embedmesh error or already a CLI error (task
    groups wrap what their tasks raise: a group of one is unwrapped), else None."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, click.ClickException):
        return exc
    if isinstance(exc, EmbedmeshError):
        return click.ClickException(str(exc))
    return None


class Lifecycle:
    """How `embedmesh up` ends: SIGINT (Ctrl-C), SIGTERM and SIGHUP, or `embedmesh down` through
    the local API, all close the node the same way (an ephemeral node logs out) and exit 0.

    CI runners, `docker stop` and systemd stop a process with SIGTERM, and a script's background
    job ignores SIGINT, so each of these must mean "leave cleanly". A second signal while the
    node closes is not caught: it stops the process at once, as users expect of a second Ctrl-C.
    """

    def __init__(self, node: Any) -> None:
        self.node = node
        self.scope = anyio.CancelScope()
        #: None: the node's default (only an ephemeral node logs out); True: `down --logout`.
        self.logout: bool | None = None
        #: What `up` is still opening once the node is up; "" when everything listens.
        self.opening = "opening its forwards, proxies and DNS listeners"
        self._starting = False
        self._outer: anyio.CancelScope | None = None

    def waiting_for(self) -> str:
        """What `up` still waits for, in words ("" once the node and its gateways are ready)."""
        return str(self.node.waiting_for()) or self.opening

    def ready(self) -> None:
        """Every forward, proxy and DNS listener of `up` listens."""
        self.opening = ""

    def down(self, logout: bool) -> None:
        """Stop (called by the local API once its answer to `down` went out)."""
        self.logout = True if logout else None
        self.scope.cancel()

    async def run(self, serve: Callable[[], Awaitable[None]]) -> None:
        """Start the node, run ``serve()`` until it returns or a signal or `down` stops it, then
        close the node.

        The node's task groups nest in the scope where it started, so it must close in that same
        scope, with no cancelled scope around its close (its logout would be cancelled): a stop
        cancels only ``serve()``. While the node is still starting (waiting for its control
        server, say), a signal cancels everything instead, and the node cleans up after itself.
        """
        async with anyio.create_task_group() as tg:
            self._outer = tg.cancel_scope
            tg.start_soon(self._watch_signals)
            self._starting = True
            await self.node.start()
            self._starting = False
            try:
                with self.scope:
                    await serve()
            finally:
                await self.node.close(logout=self.logout)
                tg.cancel_scope.cancel()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                click.echo(f"{signal.Signals(signum).name}: leaving", err=True)
                scope = self._outer if self._starting else self.scope
                assert scope is not None
                scope.cancel()
                return


def _not_running(state_dir: Path, exc: NodeNotRunningError) -> str:
    """Why the local API did not answer, in one line: nothing runs there, or a node that is
    still starting (it holds the folder's lock, but serves its API only once it has joined)."""
    if is_locked(state_dir):
        pid = holder_pid(state_dir)
        who = f" (PID {pid})" if pid is not None else ""
        return f"the node in {state_dir}{who} is starting: it has not joined its network yet"
    return str(exc)


def read_status(state_dir: Path) -> dict[str, Any]:
    """The running node's status from its local API, or a one-line ClickException."""
    try:
        data: dict[str, Any] = anyio.run(request, state_dir, "GET", "/v1/status")
    except NodeNotRunningError as exc:
        raise click.ClickException(_not_running(state_dir, exc)) from None
    except LocalAPIError as exc:
        raise click.ClickException(str(exc)) from None
    return data


def wait_ready(state_dir: Path, timeout: float) -> dict[str, Any]:
    """Wait until the node in ``state_dir`` is ready (in its network, every forward, proxy and
    DNS listener of `up` listening) and return its status; a one-line ClickException when
    ``timeout`` seconds pass first or the node stops.

    A script may start this right after `embedmesh up ... &`, before the node exists: until
    the node has been seen, "nothing runs there" is only a reason to wait.
    """
    deadline = time.monotonic() + timeout
    reason = f"no node is running (state dir {state_dir})"
    seen = False
    while True:
        try:
            data: dict[str, Any] = anyio.run(request, state_dir, "GET", "/v1/status")
        except NodeNotRunningError as exc:
            starting = is_locked(state_dir)
            if seen and not starting:
                raise click.ClickException(
                    f"the node in {state_dir} stopped before it was ready (see the output of `embedmesh up`)"
                ) from None
            seen = seen or starting
            reason = _not_running(state_dir, exc)
        except LocalAPIError as exc:
            raise click.ClickException(str(exc)) from None
        else:
            seen = True
            if data.get("ready"):
                return data
            reason = str(data.get("waiting_for") or "not ready")
        if time.monotonic() >= deadline:
            raise click.ClickException(f"the node is not ready after {timeout:g} s: {reason}")
        time.sleep(POLL_INTERVAL)


def stop_node(state_dir: Path, logout: bool, timeout: float) -> int | None:
    """Stop the `embedmesh up` of ``state_dir`` and wait until it has closed (its lock on the
    folder is gone); returns its PID. A one-line ClickException if nothing runs there or it
    does not stop within ``timeout`` seconds."""
    pid: int | None
    try:
        answer = anyio.run(request, state_dir, "POST", "/v1/down", {"logout": logout})
        pid = answer.get("pid") if isinstance(answer, dict) else None
    except NodeNotRunningError as exc:
        pid = holder_pid(state_dir) if is_locked(state_dir) else None
        if pid is None:
            raise click.ClickException(str(exc)) from None
        # Still joining, so no local API yet: SIGTERM is the same clean stop. The PID is the
        # lock holder's, a process of this user (the folder is 0700).
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    except LocalAPIError as exc:
        raise click.ClickException(str(exc)) from None
    # Wait for the lock, not for the PID: a background job of the caller's shell stays a zombie
    # until the shell reaps it, but the kernel drops its lock as soon as it exits.
    deadline = time.monotonic() + timeout
    while is_locked(state_dir):
        if time.monotonic() >= deadline:
            who = f" (PID {pid})" if pid is not None else ""
            raise click.ClickException(f"the node in {state_dir}{who} did not stop within {timeout:g} s")
        time.sleep(POLL_INTERVAL / 2)
    return pid
