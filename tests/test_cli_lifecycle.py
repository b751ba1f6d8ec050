"""`embedmesh up` as CI jobs, containers and services run it: stopped by SIGTERM/SIGHUP or
`embedmesh down`, waited for with `embedmesh status --wait`, one node per state folder, and one
line (no traceback) when no node runs where a command looks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.control.control_harness import Admin, start_server

ROOT = Path(__file__).resolve().parent.parent
EMBEDMESH = [sys.executable, "-m", "embedmesh.cli.main"]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), str(ROOT)) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("EMBEDMESH_AUTH_KEY", None)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def wait_for(predicate: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def run_cli(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EMBEDMESH, *args], capture_output=True, text=True, timeout=timeout, env=cli_env(**env)
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The CLI's error: exit code non-zero, one line on stderr, no traceback."""
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


class Procs:
    """`embedmesh up` processes of a test; whatever is still running at the end is killed."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[str]] = []

    def up(self, *args: str, **env: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [*EMBEDMESH, "up", "--listen-host", "127.0.0.1", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(**env),
        )
        self.started.append(process)
        return process


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    yield p
    for process in p.started:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


@pytest.fixture
def control(tmp_path: Path) -> Iterator[tuple[Any, Admin]]:
    # The server's usual ephemeral timeout (not the harness's 0.5 s): a node that is gone at
    # once was deleted by its logout, not by the server timing it out.
    running = start_server(tmp_path / "control", ephemeral_timeout=120)
    try:
        yield running, Admin(running)
    finally:
        running.stop()


def listed(admin: Admin, name: str) -> list[dict[str, Any]]:
    return [n for n in admin.nodes() if n["name"] == name]


def stop(process: subprocess.Popen[str], signum: int) -> tuple[int, str, str]:
    process.send_signal(signum)
    out, err = process.communicate(timeout=15)
    return process.returncode, out, err


def test_sigterm_and_sighup_close_cleanly_and_an_ephemeral_node_leaves_at_once(
    tmp_path: Path, control: tuple[Any, Admin], procs: Procs
) -> None:
    running, admin = control
    key = admin.key(reusable=True, ephemeral=True, preapproved=True)
    for run, signum in enumerate((signal.SIGTERM, signal.SIGHUP)):
        state = tmp_path / f"job-{run}"  # a fresh identity per job, as a CI runner has
        process = procs.up(
            "--control-url", running.url, "--hostname", "ci-rerun", "--state-dir", str(state),
            EMBEDMESH_AUTH_KEY=key,
        )
        wait_for(lambda: any(n["online"] for n in listed(admin, "ci-rerun")), what="the node to join")
        # The same name each time: the previous job's node is gone, so the name is free.
        assert [n["name"] for n in admin.nodes()] == ["ci-rerun"]
        code, out, err = stop(process, signum)
        assert code == 0, (out, err)
        assert "Traceback" not in err
        assert listed(admin, "ci-rerun") == [], "the ephemeral node is still listed after it stopped"
        assert not (state / "embedmesh.sock").exists()


def test_down_stops_up_through_its_local_api_and_waits_until_it_closed(
    tmp_path: Path, control: tuple[Any, Admin], procs: Procs
) -> None:
    running, admin = control
    key = admin.key(reusable=True, preapproved=True)
    state = tmp_path / "svc"
    process = procs.up(
        "--control-url", running.url, "--hostname", "svc", "--state-dir", str(state), "--auth-key", key
    )
    wait_for(lambda: (state / "embedmesh.sock").exists(), what="the local API")
    result = run_cli("down", "--state-dir", str(state))
    assert result.returncode == 0, result
    assert f"PID {process.pid}" in result.stdout
    # down returned once the node had closed: the process exits at once, cleanly.
    assert process.wait(timeout=2) == 0
    (node,) = listed(admin, "svc")
    assert node["state"] == "authorized"  # a plain down does not log a lasting node out

    # Nothing runs there now: one line, non-zero.
    assert one_line_error(run_cli("down", "--state-dir", str(state))).startswith(
        f"Error: no node is running (state dir {state}): start one with"
    )

    # --logout: the node rejoins from its state folder, then leaves the tailnet for good.
    process = procs.up("--control-url", running.url, "--hostname", "svc", "--state-dir", str(state))
    wait_for(lambda: (state / "embedmesh.sock").exists(), what="the local API")
    result = run_cli("down", "--state-dir", str(state), "--logout")
    assert result.returncode == 0, result
    assert process.wait(timeout=2) == 0
    (node,) = listed(admin, "svc")
    assert node["state"] == "key_expired"


def test_status_wait_returns_once_the_node_and_its_gateways_are_ready(
    tmp_path: Path, control: tuple[Any, Admin], procs: Procs
) -> None:
    running, admin = control
    key = admin.key(preapproved=True)
    state = tmp_path / "ci"
    socks_port, forward_port = free_port(), free_port()
    # The script's order: start the node in the background, then wait for it right away.
    waiter = subprocess.Popen(
        [*EMBEDMESH, "status", "--wait", "--timeout", "60", "--state-dir", str(state), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        procs.up(
            "--control-url", running.url, "--hostname", "ci", "--state-dir", str(state),
            "--socks5", f"127.0.0.1:{socks_port}", "--forward", f"127.0.0.1:{forward_port}=ci:80",
            EMBEDMESH_AUTH_KEY=key,
        )
        out, err = waiter.communicate(timeout=60)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
    assert waiter.returncode == 0, err
    # When it returns, everything listens: no retry loop needed in the script.
    assert port_open(socks_port) and port_open(forward_port)
    assert '"ready": true' in out and '"name": "ci"' in out


def test_status_wait_times_out_with_the_reason(
    tmp_path: Path, procs: Procs
) -> None:
    running = start_server(tmp_path / "control", approval_required=True)
    try:
        admin = Admin(running)
        key = admin.key()
        state = tmp_path / "pending"
        procs.up("--control-url", running.url, "--hostname", "pending", "--state-dir", str(state),
                 EMBEDMESH_AUTH_KEY=key)
        wait_for(lambda: (state / "embedmesh.sock").exists(), what="the local API")
        (node,) = listed(admin, "pending")
        line = one_line_error(run_cli("status", "--wait", "--timeout", "1", "--state-dir", str(state)))
        assert line == (
            "Error: the node is not ready after 1 s: waiting for approval by an admin "
            f"(embedmesh control nodes approve {node['id']})"
        )
    finally:
        running.stop()

    # Nothing ever started there.
    empty = tmp_path / "empty"
    line = one_line_error(run_cli("status", "--wait", "--timeout", "0.5", "--state-dir", str(empty)))
    assert line.startswith(f"Error: the node is not ready after 0.5 s: no node is running (state dir {empty})")


def test_a_second_up_on_one_state_dir_refuses_naming_the_pid(
    tmp_path: Path, control: tuple[Any, Admin], procs: Procs
) -> None:
    running, admin = control
    key = admin.key(reusable=True, preapproved=True)
    state = tmp_path / "one"
    first = procs.up("--control-url", running.url, "--hostname", "one", "--state-dir", str(state),
                     EMBEDMESH_AUTH_KEY=key)
    wait_for(lambda: (state / "embedmesh.sock").exists(), what="the first node")
    second = procs.up("--control-url", running.url, "--hostname", "one", "--state-dir", str(state),
                      EMBEDMESH_AUTH_KEY=key)
    _, err = second.communicate(timeout=30)
    lines = err.strip().splitlines()
    assert second.returncode == 1 and len(lines) == 1, err
    assert f"PID {first.pid}" in lines[0] and str(state) in lines[0]
    # The first one keeps its connection and its local API.
    assert first.poll() is None
    assert run_cli("status", "--state-dir", str(state)).returncode == 0
    assert len(listed(admin, "one")) == 1 and listed(admin, "one")[0]["online"]


def test_a_stale_socket_is_one_line_for_status_and_replaced_by_up(
    tmp_path: Path, control: tuple[Any, Admin], procs: Procs
) -> None:
    running, admin = control
    state = tmp_path / "crashed"
    state.mkdir(mode=0o700)
    # What a killed node leaves behind: a socket file that nothing listens on.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(state / "embedmesh.sock"))
    stale.close()
    line = one_line_error(run_cli("status", "--state-dir", str(state)))
    assert line.startswith(f"Error: no node is running (state dir {state}")
    line = one_line_error(run_cli("ping", "peer", "--state-dir", str(state)))
    assert line.startswith(f"Error: no node is running (state dir {state}")

    procs.up("--control-url", running.url, "--hostname", "back", "--state-dir", str(state),
             EMBEDMESH_AUTH_KEY=admin.key(preapproved=True))
    wait_for(lambda: run_cli("status", "--state-dir", str(state)).returncode == 0, what="the new node's API")


def test_up_gives_up_on_an_unreachable_control_server_after_control_timeout(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run_cli("up", "--control-url", url, "--control-timeout", "1.5", "--auth-key", "k")
    elapsed = time.monotonic() - started
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    # It says what it waits for while it waits, then gives up in one line.
    assert f"waiting for the control server at {url}" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: cannot reach the control server at {url} for 1.5 s"), last
    assert elapsed >= 1.5
