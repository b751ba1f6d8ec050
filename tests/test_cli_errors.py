"""Errors a user sees: one line that says what to do, from the API (an embedmesh error) and the
CLI (exit status 1, no traceback), each worded for who reads it (a programmer or an operator)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner, Result

from embedmesh import ConfigError, EmbedmeshError, Node, NodeError, UpTimeoutError
from embedmesh.cli.main import main
from embedmesh.control.errors import ApprovalRefusedError
from tests.control.control_harness import Admin, start_server

EMBEDMESH = [sys.executable, "-m", "embedmesh.cli.main"]


def invoke(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input, env=env)


def assert_one_line_error(result: Result, *fragments: str) -> str:
    """Exit status 1 through click (not an uncaught exception), one line on stderr, no traceback."""
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def approval_server(tmp_path: Path) -> Iterator[tuple[Any, Admin]]:
    running = start_server(tmp_path / "control", approval_required=True)
    try:
        yield running, Admin(running)
    finally:
        running.stop()


# ------------------------------------------------------------------ a control URL without a scheme


@pytest.mark.parametrize(
    ("url", "advice"),
    [
        ("127.0.0.1:8080", "write 'http://127.0.0.1:8080'"),
        ("localhost:8080", "write 'http://localhost:8080'"),
        ("ftp://127.0.0.1:8080", "the scheme must be http or https"),
        ("http://127.0.0.1:99999", "the port must be a number"),
    ],
)
def test_node_refuses_a_control_url_it_cannot_use_and_says_what_to_write(url: str, advice: str) -> None:
    with pytest.raises(ConfigError, match=advice):
        Node(control_url=url, auth_key="emk-unused")


def test_up_with_a_control_url_without_scheme_says_what_to_write() -> None:
    result = invoke("up", "--control-url", "127.0.0.1:8080")
    assert_one_line_error(result, "--control-url http://127.0.0.1:8080")


# ------------------------------------------------------------------ every command: one line, no traceback


@pytest.mark.parametrize(
    "args",
    [
        ("up", "--control-url", "ftp://127.0.0.1:1"),
        ("up", "--control-url", "http://127.0.0.1:1", "--auth-key", "emk-x", "--control-timeout", "0"),
        ("up", "--control-url", "http://127.0.0.1:1", "--auth-key", "file:/nonexistent/key"),
        ("up", "--wireguard-config", "{bad_config}"),
        ("pubkey",),
        ("status", "--state-dir", "{tmp}"),
        ("ping", "web", "--state-dir", "{tmp}"),
        ("control", "nodes", "list", "--state-dir", "{tmp}"),
        ("control", "authkey", "create", "--state-dir", "{tmp}", "--expiry", "soon"),
    ],
    ids=lambda args: " ".join(a.replace("{", "").replace("}", "") for a in args[:5]),
)
def test_command_failures_are_one_line(tmp_path: Path, args: tuple[str, ...]) -> None:
    bad_config = tmp_path / "bad.conf"
    bad_config.write_text("[Interface]\nPrivateKey = not-a-key\n")
    argv = [a.format(tmp=tmp_path, bad_config=bad_config) for a in args]
    result = invoke(*argv, input="not a key\n")
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1].startswith("Error: "), result.stderr


def test_embedmesh_errors_from_any_command_and_task_group_are_one_line() -> None:
    """The top-level group turns an embedmesh error from any command (even several, raised in a
    task group and so wrapped in an ExceptionGroup) into one line; other exceptions stay loud."""

    @main.command("raise-direct")
    def raise_direct() -> None:
        raise NodeError("the node is not running: start it first")

    @main.command("raise-grouped")
    def raise_grouped() -> None:
        async def fail(message: str) -> None:
            raise ConfigError(message)

        async def run() -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(fail, "port 1080 is in use")
                tg.start_soon(fail, "port 1080 is in use")

        anyio.run(run)

    @main.command("raise-bug")
    def raise_bug() -> None:
        raise KeyError("a bug")

    try:
        assert_one_line_error(invoke("raise-direct"), "the node is not running: start it first")
        assert_one_line_error(invoke("raise-grouped"), "port 1080 is in use")
        bug = invoke("raise-bug")
        assert isinstance(bug.exception, KeyError)
    finally:
        for name in ("raise-direct", "raise-grouped", "raise-bug"):
            main.commands.pop(name, None)


# ------------------------------------------------------------------ up(timeout=...) says what it waits for


def test_up_timeout_while_waiting_for_approval_names_the_node_and_the_command(
    approval_server: tuple[Any, Admin],
) -> None:
    running, admin = approval_server
    key = admin.key()

    async def main_() -> None:
        async with Node(
            hostname="newbie", control_url=running.url, auth_key=key, listen_host="127.0.0.1"
        ) as n:
            with pytest.raises(UpTimeoutError) as caught:
                await n.up(timeout=0.3)
            assert isinstance(caught.value, TimeoutError) and isinstance(caught.value, EmbedmeshError)
            assert caught.value.waiting_for == "approval"
            node_id = n._control.node_id  # type: ignore[union-attr]
            assert f"embedmesh control nodes approve {node_id}" in str(caught.value)
            assert "up() timed out after 0.3 s: waiting for approval by an admin" in str(caught.value)

    anyio.run(main_)


def test_up_timeout_while_the_node_is_still_starting_says_so() -> None:
    """A control server that accepts and never answers: up() in another task times out saying it
    waits for registration, not approval."""

    async def main_() -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        accepted: list[anyio.abc.SocketStream] = []

        async def hold(stream: anyio.abc.SocketStream) -> None:
            accepted.append(stream)
            await anyio.sleep_forever()

        node = Node(
            hostname="slow", control_url=f"http://127.0.0.1:{port}", auth_key="emk-x", control_timeout=0
        )
        start_error: list[BaseException] = []

        async def start() -> None:
            try:
                await node.start()
            except EmbedmeshError as exc:
                start_error.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, hold)
            tg.start_soon(start)
            with anyio.fail_after(5):
                while not accepted:
                    await anyio.sleep(0.01)
            with (
                anyio.fail_after(5),
                pytest.raises(UpTimeoutError) as caught,
            ):
                await node.up(timeout=0.2)
            assert caught.value.waiting_for == "start"
            assert f"timed out after 0.2 s: waiting for the control server at http://127.0.0.1:{port}" in str(
                caught.value
            )
            for stream in accepted:
                await stream.aclose()
            with anyio.fail_after(15):
                while not start_error:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        await node.close()

    anyio.run(main_)


def test_up_before_start_is_a_node_error_not_a_hang() -> None:
    async def main_() -> None:
        node = Node(hostname="x", control_url="http://127.0.0.1:1", auth_key="emk-x")
        with anyio.fail_after(2), pytest.raises(NodeError, match="async with node"):
            await node.up(timeout=10)

    anyio.run(main_)


# ------------------------------------------------------------------ refused, expired: worded for a programmer


def test_refused_node_gets_an_approval_refused_error_that_speaks_to_a_programmer(
    approval_server: tuple[Any, Admin], caplog: pytest.LogCaptureFixture
) -> None:
    running, admin = approval_server
    key = admin.key()

    async def main_() -> None:
        with caplog.at_level(logging.WARNING, logger="embedmesh"):
            async with Node(
                hostname="newbie", control_url=running.url, auth_key=key, listen_host="127.0.0.1"
            ) as n:
                node_id = n._control.node_id  # type: ignore[union-attr]
                pending = [
                    r for r in caplog.records if getattr(r, "embedmesh_event", None) == "pending_approval"
                ]
                assert len(pending) == 1 and pending[0].node_id == node_id  # type: ignore[attr-defined]
                assert "up()" in pending[0].getMessage()
                refuse = threading.Timer(0.1, admin.delete, [node_id])
                refuse.start()
                with pytest.raises(ApprovalRefusedError) as caught:
                    await n.up(timeout=10)
                refuse.join()
        message = str(caught.value)
        assert "auth_key=" in message and running.url in message and "\n" not in message

    anyio.run(main_)


def test_key_expiry_warning_speaks_to_a_programmer_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    running = start_server(tmp_path / "control")
    admin = Admin(running)
    try:
        key = admin.key()

        async def main_() -> None:
            async with Node(
                hostname="a", control_url=running.url, auth_key=key, listen_host="127.0.0.1"
            ) as n:
                await n.up(timeout=10)
                with caplog.at_level(logging.WARNING, logger="embedmesh"):
                    admin.post(f"/nodes/{n._control.node_id}/expire")  # type: ignore[union-attr]
                    with anyio.fail_after(10):
                        while n.status().state != "key_expired":
                            await anyio.sleep(0.02)
                    await anyio.sleep(0.2)
            expired = [r for r in caplog.records if "expired" in r.getMessage()]
            assert len(expired) == 1, [r.getMessage() for r in expired]
            assert getattr(expired[0], "embedmesh_event", None) == "key_expired"
            assert "auth_key=" in expired[0].getMessage()

        anyio.run(main_)
    finally:
        running.stop()


# ------------------------------------------------------------------ auth keys from files


def test_auth_key_from_a_file_joins_and_an_open_file_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    running = start_server(tmp_path / "control")
    admin = Admin(running)
    try:
        key_file = tmp_path / "key"
        key_file.write_text(admin.key() + "\n")
        key_file.chmod(0o644)

        async def main_() -> None:
            with caplog.at_level(logging.WARNING, logger="embedmesh"):
                node = Node(hostname="f", control_url=running.url, auth_key=f"file:{key_file}")
            assert f"chmod 600 {key_file}" in caplog.text and admin.key() not in caplog.text
            async with node:
                await node.up(timeout=10)
                assert node.name == "f"

        anyio.run(main_)
        with pytest.raises(ConfigError, match="is empty"):
            (tmp_path / "empty").write_text("\n")
            Node(control_url=running.url, auth_key=f"file:{tmp_path / 'empty'}")
    finally:
        running.stop()


def test_up_help_says_how_to_keep_the_key_out_of_the_command_line() -> None:
    text = invoke("up", "--help").output
    assert "file:PATH" in text and "EMBEDMESH_AUTH_KEY" in text and "/proc/PID/cmdline" in text


# ------------------------------------------------------------------ the CLI words them for an operator


def _spawn_up(
    url: str, tmp_path: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*EMBEDMESH, "up", "--control-url", url, "--listen-host", "127.0.0.1", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _wait_node(admin: Admin, name: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for node in admin.nodes():
            if node["name"] == name:
                return node
        time.sleep(0.05)
    raise AssertionError(f"{name} never registered")


def test_cli_tells_the_operator_what_to_run_while_pending_and_when_refused(
    approval_server: tuple[Any, Admin], tmp_path: Path
) -> None:
    running, admin = approval_server
    key_file = tmp_path / "key"
    key_file.write_text(admin.key() + "\n")
    key_file.chmod(0o640)
    proc = _spawn_up(running.url, tmp_path, "--hostname", "pending", "--auth-key", f"file:{key_file}")
    try:
        node = _wait_node(admin, "pending")
        time.sleep(0.3)  # let the warning reach stderr
        admin.delete(node["id"])
        _, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert f"chmod 600 {key_file}" in stderr
    assert f"ask the admin of {running.url} to run `embedmesh control nodes approve {node['id']}`" in stderr
    assert "up()" not in stderr and "auth_key=" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("Error: an admin of") and "--auth-key file:PATH" in last, last


def test_cli_tells_the_operator_what_to_do_when_the_key_expires(tmp_path: Path) -> None:
    running = start_server(tmp_path / "control")
    admin = Admin(running)
    key_file = tmp_path / "key"
    key_file.write_text(admin.key())
    key_file.chmod(0o600)
    state = tmp_path / "state"
    proc = _spawn_up(
        running.url,
        tmp_path,
        "--hostname",
        "exp",
        "--state-dir",
        str(state),
        env={"EMBEDMESH_AUTH_KEY": f"file:{key_file}"},
    )
    try:
        node = _wait_node(admin, "exp")
        assert node["state"] == "authorized"
        admin.post(f"/nodes/{node['id']}/expire")
        deadline = time.monotonic() + 10
        while admin.nodes()[0]["state"] != "key_expired" and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        proc.terminate()
        _, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
        running.stop()
    assert "chmod" not in stderr  # 0600: nothing to report
    assert f"ask the admin of {running.url} to run `embedmesh control nodes approve {node['id']}`" in stderr
    assert f"--state-dir {state} --auth-key file:PATH" in stderr
    assert "auth_key=" not in stderr
