"""Builds tests/interop/go/tsvectors (Tailscale's own Go packages, pinned in its go.mod/go.sum).

The binary goes to a cache folder outside the repository, keyed by a hash of the program's sources,
so it is built once per change (about a minute on two cores, plus module downloads the first time).
Without Go the interop tests skip visibly, and fail under ``EMBEDMESH_REQUIRE_INTEROP=1`` (CI).

The cache folder is ``$EMBEDMESH_GO_CACHE`` (default ``~/.cache/embedmesh-interop``), never the repo.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROGRAM_DIR = REPO / "tests" / "interop" / "go" / "tsvectors"
CACHE_DIR = Path(os.environ.get("EMBEDMESH_GO_CACHE", Path.home() / ".cache" / "embedmesh-interop"))
REQUIRE_ENV = "EMBEDMESH_REQUIRE_INTEROP"
BUILD_TIMEOUT = 900
# What `go build` prints when it cannot download modules (no network, no proxy).
_OFFLINE_SIGNS = ("dial tcp", "no such host", "i/o timeout", "connection refused", "network is unreachable")


def go_binary() -> str | None:
    """The Go toolchain: `go` on PATH, else /usr/local/go/bin/go."""
    found = shutil.which("go")
    if found:
        return found
    fallback = Path("/usr/local/go/bin/go")
    return str(fallback) if fallback.exists() else None


def _skip_or_fail(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} (and {REQUIRE_ENV}=1 forbids skipping)", pytrace=False)
    pytest.skip(reason)


def _source_hash(tags: tuple[str, ...] = ()) -> str:
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update(name.encode() + b"\0" + (PROGRAM_DIR / name).read_bytes() + b"\0")
    if tags:  # only then, so the untagged binary keeps its name
        digest.update(b"tags\0" + ",".join(tags).encode())
    return digest.hexdigest()[:16]


def tsvectors(tags: tuple[str, ...] = ()) -> Path:
    """The path of the built tsvectors binary (building it if needed), or skip/fail the test.

    ``tags`` are Go build tags, e.g. ``("ts_debug_websockets",)``: derphttp's WebSocket dialer,
    which Tailscale compiles in only for browsers and with that tag.
    """
    go = go_binary()
    if go is None:
        _skip_or_fail("Go is not installed: the Tailscale interop tests need it to build tsvectors")
        raise AssertionError("unreachable")
    target = CACHE_DIR / f"tsvectors-{_source_hash(tags)}"
    if target.exists():
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".{os.getpid()}.tmp")
    env = dict(os.environ, GOFLAGS="-mod=readonly", CGO_ENABLED="0")
    result = subprocess.run(
        ["nice", "-n", "19", go, "build", "-trimpath", *([f"-tags={','.join(tags)}"] if tags else []), "-o", str(partial), "."],
        cwd=PROGRAM_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        if any(sign in result.stderr for sign in _OFFLINE_SIGNS):
            _skip_or_fail(f"building tsvectors needs the Go module proxy, which is unreachable: {result.stderr[-300:]}")
        pytest.fail(f"building tsvectors failed:\n{result.stderr[-4000:]}", pytrace=False)
    partial.replace(target)
    return target
