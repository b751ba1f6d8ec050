"""Go programs for the interop tests (real Tailscale software, our own Go helpers), built on first use.

The one Go build helper of the test suite.  Two general entry points:

* ``go_install(name, packages)``: ``go install pkg@version...`` of modules from the Go module proxy
  (``GOBIN`` in the cache), for example ``tailscale.com/cmd/tailscaled@v1.102.5``;
* ``go_build(source)``: ``go build`` of a program folder of the repository (``go.mod`` and ``go.sum``
  committed; ``-mod=readonly``, so the repository's files are never rewritten), optionally of a
  ``tool`` named in its go.mod instead of its main package.

Both return the folder that holds the binaries.  On top of them: ``tailscaled()``,
``tailscale_cli()``, ``derper()`` (tailscale.com v1.102.5), ``oldest_tailscaled()`` and
``oldest_tailscale_cli()`` (OLDEST_TAILSCALE_VERSION, the oldest client the server serves),
``headscale()`` (HEADSCALE_VERSION) and ``go_program(name)`` (``tests/interop/go/<name>/``) return a
binary's path.

Nothing is committed and nothing lands in the repository: binaries, the module cache (GOMODCACHE)
and the build cache (GOCACHE) all live in one folder, ``$EMBEDMESH_GO_CACHE`` (default
``~/.cache/embedmesh-interop``); ``rm -rf`` of it (or ``gopeers.py clean``) forces a cold build::

    gomod/                 GOMODCACHE (written with -modcacherw, so rm -rf works)
    gobuild/               GOCACHE
    bin/<name>-<key>/      one build's binaries and its STAMP.json
    build.lock             an fcntl lock: one build at a time across pytest workers and runs
    logs/<name>-<key>.log  the output of that build

``<key>`` is a hash of everything the binaries depend on: the Go version, the flags, and the module
versions (``go_install``) or the bytes of every file in the program folder, go.mod and go.sum
included (``go_build``).  So two worktrees with different versions of a program each keep theirs,
a change of go.sum rebuilds, and a lookup of a current build is a stat() plus, once per process,
``go env GOVERSION``.  A build happens under the lock and is renamed into place whole, so concurrent
callers (pytest-xdist workers, two runs) build once and never see half a folder.

``require(fn)`` is the pytest helper: fn()'s result, or a skip with the reason (no Go, a failed
build with its log's tail) outside CI and a failure under ``EMBEDMESH_REQUIRE_INTEROP=1``.

As a script: ``python3 tests/interop/gopeers.py build [NAME...]`` builds the known bundles
(``.ci/run`` does this before the tests), ``path BINARY`` prints a binary's path, ``list`` shows
the cache, ``clean`` empties it.  Only the standard library is used (the script runs before
embedmesh is installed).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
GO_SOURCES = HERE / "go"  # our own Go programs, one folder each, with go.mod and go.sum committed

CACHE_ENV = "EMBEDMESH_GO_CACHE"
GO_ENV = "EMBEDMESH_GO"  # a go binary to use instead of the one on PATH / /usr/local/go/bin/go
REQUIRE_ENV = "EMBEDMESH_REQUIRE_INTEROP"

TAILSCALE_VERSION = "v1.102.5"  # newer tags need a newer Go than the machines have (1.26)
# The oldest client release the control server serves (Tailscale 1.80, capability version 113):
# its newest patch, built beside TAILSCALE_VERSION to prove the server against an old client.
OLDEST_TAILSCALE_VERSION = "v1.80.3"
HEADSCALE_VERSION = "v0.29.2"  # the newest release (go.mod: go 1.26.4); pinned in go/headscale/go.mod
BUILD_TIMEOUT = 1800.0  # seconds for one build, cold, on a loaded 2-core machine
DEFAULT_LDFLAGS = "-s -w"  # no symbol tables: smaller binaries, a faster link

T = TypeVar("T")


class GoBuildError(RuntimeError):
    """Go is missing or a build failed; the message says which and what to do."""


@dataclass(frozen=True)
class GoBuild:
    """What one `go install` (module packages at versions) or `go build` (a program folder) makes."""

    name: str  # names the cache folder and the log; binaries are named by `binaries`
    binaries: tuple[str, ...]
    packages: tuple[str, ...] = ()  # "module/path/cmd/x@version" for `go install`
    source: Path | None = None  # a program folder (with go.mod, go.sum) for `go build`
    target: str = "."  # what `go build` builds in source: its main package, or a go.mod `tool`
    ldflags: str = DEFAULT_LDFLAGS
    tags: tuple[str, ...] = ()  # Go build tags (-tags=a,b)

    def __post_init__(self) -> None:
        if (self.source is None) == (not self.packages):
            raise ValueError("a GoBuild has either packages (go install) or a source folder (go build)")
        if self.source is not None and len(self.binaries) != 1:
            raise ValueError("go build of a source folder makes exactly one binary")
        for pkg in self.packages:
            if "@" not in pkg:
                raise ValueError(f"{pkg!r} needs an @version: builds from the proxy are pinned")

    def inputs(self) -> dict[str, object]:
        """Everything the binaries depend on besides the Go version (hashed into the cache key)."""
        # Tags only when there are some, so the keys (cache folders) of tagless builds stay as they were.
        tags: dict[str, object] = {"tags": list(self.tags)} if self.tags else {}
        if self.source is None:
            return {"packages": list(self.packages), "ldflags": self.ldflags, **tags}
        if not (self.source / "go.mod").is_file() or not (self.source / "go.sum").is_file():
            raise GoBuildError(f"{self.source} needs a committed go.mod and go.sum")
        digest = hashlib.sha256()
        for path in sorted(p for p in self.source.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(self.source)).encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
        return {
            "source": self.source.name,
            "target": self.target,
            "ldflags": self.ldflags,
            "sha256": digest.hexdigest(),
            **tags,
        }


def _tailscale_ldflags(version: str) -> str:
    # What Tailscale's build_dist.sh stamps; without it `tailscale version` says
    # "1.102.5-ERR-BuildInfo" (a module build has no git commit to read).
    v = version.removeprefix("v")
    return f"{DEFAULT_LDFLAGS} -X tailscale.com/version.longStamp={v} -X tailscale.com/version.shortStamp={v}"


# The bundles `gopeers.py build` (and so .ci/run) builds; tests may build others with go_install()
# and go_build() directly.
BUNDLES: dict[str, GoBuild] = {
    # tailscaled, the CLI and derper come from one module version: one `go install`, one compile of
    # the shared packages.
    "tailscale": GoBuild(
        "tailscale",
        ("tailscaled", "tailscale", "derper"),
        packages=tuple(
            f"tailscale.com/cmd/{cmd}@{TAILSCALE_VERSION}" for cmd in ("tailscaled", "tailscale", "derper")
        ),
        ldflags=_tailscale_ldflags(TAILSCALE_VERSION),
    ),
    # The oldest client served, in a folder of its own (bin/tailscale-oldest-<key>/); it shares the
    # module and build caches with the bundle above. No derper: the tests run the current one.
    # The tags are build_dist.sh's --extra-small set of that release (no AWS/Kubernetes state
    # stores, SSH server, TAP, BIRD, packet capture, wake-on-LAN, shell completion): what the
    # tests use stays, and the cold build of this second Tailscale costs less.
    "tailscale-oldest": GoBuild(
        "tailscale-oldest",
        ("tailscaled", "tailscale"),
        packages=tuple(
            f"tailscale.com/cmd/{cmd}@{OLDEST_TAILSCALE_VERSION}" for cmd in ("tailscaled", "tailscale")
        ),
        ldflags=_tailscale_ldflags(OLDEST_TAILSCALE_VERSION),
        tags=tuple(
            f"ts_omit_{feature}"
            for feature in ("aws", "bird", "tap", "kube", "completion", "ssh", "wakeonlan", "capture")
        ),
    ),
    # `go install github.com/juanfont/headscale/cmd/headscale@v0.29.2` fails here: the module proxy
    # refuses headscale's version list, which `go install` reads for the deprecation check.  So a
    # module of ours, tests/interop/go/headscale, names headscale as a `tool` at that version, with
    # go.sum committed, and we build the tool from it: the dependency versions of headscale's own
    # go.mod (minimal version selection over one requirement), and only versioned downloads.
    "headscale": GoBuild(
        "headscale",
        ("headscale",),
        source=GO_SOURCES / "headscale",
        target="github.com/juanfont/headscale/cmd/headscale",
    ),
}
for _main_go in sorted(GO_SOURCES.glob("*/main.go")) if GO_SOURCES.is_dir() else ():
    _dir = _main_go.parent
    BUNDLES.setdefault(_dir.name, GoBuild(_dir.name, (_dir.name,), source=_dir))


def cache_dir() -> Path:
    """The cache folder (created on demand by builds, not by this call)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser().resolve()
    return Path.home() / ".cache" / "embedmesh-interop"


def find_go() -> str:
    """The go binary: $EMBEDMESH_GO, else `go` on PATH, else /usr/local/go/bin/go."""
    configured = os.environ.get(GO_ENV)
    if configured:
        if not os.access(configured, os.X_OK):
            raise GoBuildError(f"{GO_ENV}={configured} is not an executable go binary")
        return configured
    found = shutil.which("go")
    if found:
        return found
    if os.access("/usr/local/go/bin/go", os.X_OK):
        return "/usr/local/go/bin/go"
    raise GoBuildError("Go not found: install Go 1.26 (or set EMBEDMESH_GO) to build the Tailscale peers")


_go_version: dict[str, str] = {}


def go_version(go: str) -> str:
    """`go env GOVERSION` (e.g. "go1.26.8"), asked once per process and go binary."""
    if go not in _go_version:
        try:
            out = subprocess.run(
                [go, "env", "GOVERSION"], capture_output=True, text=True, timeout=60, env=go_env(go)
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise GoBuildError(f"{go} does not run: {e}") from e
        if out.returncode != 0 or not out.stdout.strip():
            raise GoBuildError(f"{go} env GOVERSION failed: {out.stderr.strip()}")
        _go_version[go] = out.stdout.strip()
    return _go_version[go]


def go_env(go: str) -> dict[str, str]:
    """The environment every build runs with: caches in cache_dir(), the machine's Go only."""
    root = cache_dir()
    # Drop the caller's GO* settings (a GOPATH, GOFLAGS=-mod=vendor, ...) except where modules come from.
    keep = {"GOPROXY", "GOSUMDB", "GONOSUMDB", "GOPRIVATE", "GONOPROXY", "GOINSECURE"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("GO") or k in keep}
    env.update(
        GOMODCACHE=str(root / "gomod"),
        GOCACHE=str(root / "gobuild"),
        GOPATH=str(root / "gopath"),  # nothing of ~/go is read or written
        # -trimpath: no cache paths in the binaries, so a build does not depend on where the cache is
        GOFLAGS="-modcacherw -buildvcs=false -trimpath",
        GOTOOLCHAIN="local",  # never download another toolchain: the machine's Go or nothing
        GOWORK="off",
        CGO_ENABLED="0",  # static binaries; none of these needs cgo (headscale's SQLite is pure Go)
        GOTELEMETRY="off",
    )
    return env


def _key(expected: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:16]


def _is_complete(spec: GoBuild, folder: Path) -> bool:
    return (folder / "STAMP.json").is_file() and all((folder / b).is_file() for b in spec.binaries)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "build.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if we are killed
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


_failures: dict[str, str] = {}  # cache key -> error, so one process tries a failing build only once


def ensure(spec: GoBuild, *, quiet: bool = True) -> Path:
    """The folder holding spec's binaries, building them first unless the cache holds them.

    Safe to call from many processes at once: builds are serialized by a file lock and each waiter
    looks again after taking it, so a build happens once.  Raises GoBuildError.
    """
    go = find_go()
    expected = {"name": spec.name, "go": go_version(go), **spec.inputs()}
    key = _key(expected)
    if key in _failures:
        raise GoBuildError(_failures[key])
    root = cache_dir()
    folder = root / "bin" / f"{spec.name}-{key}"
    if _is_complete(spec, folder):
        return folder
    with _locked(root):
        if _is_complete(spec, folder):  # another process built it while we waited
            return folder
        try:
            _build_locked(spec, go, root, folder, expected, quiet=quiet)
        except GoBuildError as e:
            _failures[key] = str(e)
            raise
    return folder


def go_install(name: str, packages: Sequence[str], *, ldflags: str = DEFAULT_LDFLAGS) -> Path:
    """`go install` of packages at pinned versions ("tailscale.com/cmd/derper@v1.102.5") from the
    module proxy; returns the folder with one binary per package (named by its last path element)."""
    binaries = tuple(p.split("@", 1)[0].rsplit("/", 1)[-1] for p in packages)
    return ensure(GoBuild(name, binaries, packages=tuple(packages), ldflags=ldflags))


def go_build(
    source: Path | str, *, target: str = ".", binary: str | None = None, ldflags: str = DEFAULT_LDFLAGS
) -> Path:
    """The path of the binary `go build` makes of a program folder (go.mod, go.sum committed);
    target is its main package (".") or a `tool` its go.mod names.  Keyed by the folder's bytes."""
    folder = Path(source).resolve()
    if not folder.is_dir():
        raise GoBuildError(f"no Go program folder {folder}")
    name = binary or folder.name
    return ensure(GoBuild(name, (name,), source=folder, target=target, ldflags=ldflags)) / name


def _build_locked(
    spec: GoBuild, go: str, root: Path, folder: Path, expected: dict[str, object], *, quiet: bool
) -> None:
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{folder.name}.log"
    (root / "bin").mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root / "bin"))
    try:
        env = go_env(go)
        flags = [f"-ldflags={spec.ldflags}", *([f"-tags={','.join(spec.tags)}"] if spec.tags else [])]
        if spec.source is None:
            env["GOBIN"] = str(staging)
            argv = [go, "install", *flags, *spec.packages]
            cwd = str(root)
        else:
            # -mod=readonly: the committed go.mod/go.sum are the truth; never rewrite the repo's files
            out = str(staging / spec.binaries[0])
            argv = [go, "build", "-mod=readonly", *flags, "-o", out, spec.target]
            cwd = str(spec.source)
        if shutil.which("nice"):
            argv = ["nice", "-n", "19", *argv]  # the machines have 2 cores, shared with the tests
        started = time.monotonic()
        with open(log_path, "w") as log:
            log.write(f"$ {' '.join(argv)}   (cwd {cwd})\n")
            log.flush()
            try:
                proc = subprocess.run(
                    argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT
                )
            except subprocess.TimeoutExpired as e:
                raise GoBuildError(
                    f"building {spec.name} timed out after {BUILD_TIMEOUT:.0f}s (log: {log_path})"
                ) from e
        elapsed = time.monotonic() - started
        if proc.returncode != 0:
            tail = " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-6:])
            raise GoBuildError(
                f"building {spec.name} failed (exit {proc.returncode}, log: {log_path}): {tail}"
            )
        missing = [b for b in spec.binaries if not (staging / b).is_file()]
        if missing:
            raise GoBuildError(f"building {spec.name} produced no {', '.join(missing)} (log: {log_path})")
        (staging / "STAMP.json").write_text(json.dumps({**expected, "build_seconds": round(elapsed, 1)}))
        # Rename the folder in whole: a reader sees no folder or a complete one, never half of one.
        if folder.exists():  # incomplete leftovers of a build killed mid-rename
            shutil.rmtree(folder)
        staging.rename(folder)
        if not quiet:
            print(f"gopeers: built {spec.name} in {elapsed:.0f}s -> {folder}", file=sys.stderr)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def bundle(name: str, *, quiet: bool = True) -> Path:
    """The folder of one of the known BUNDLES, built if needed."""
    spec = BUNDLES.get(name)
    if spec is None:
        raise GoBuildError(f"unknown Go bundle {name!r} (known: {', '.join(sorted(BUNDLES))})")
    return ensure(spec, quiet=quiet)


def tailscaled() -> Path:
    """tailscaled from tailscale.com v1.102.5."""
    return bundle("tailscale") / "tailscaled"


def tailscale_cli() -> Path:
    """The `tailscale` CLI from tailscale.com v1.102.5."""
    return bundle("tailscale") / "tailscale"


def oldest_tailscaled() -> Path:
    """tailscaled from tailscale.com OLDEST_TAILSCALE_VERSION (the oldest client served)."""
    return bundle("tailscale-oldest") / "tailscaled"


def oldest_tailscale_cli() -> Path:
    """The `tailscale` CLI from tailscale.com OLDEST_TAILSCALE_VERSION."""
    return bundle("tailscale-oldest") / "tailscale"


def derper() -> Path:
    """derper (Tailscale's DERP relay server) from tailscale.com v1.102.5."""
    return bundle("tailscale") / "derper"



@contextlib.contextmanager
def running_derper(binary: Path, config: Path, http_port: int, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """Tailscale's derper serving plain HTTP on 127.0.0.1:``http_port`` (its key in ``config``,
    derper's format) with ``extra`` flags, until the block ends."""
    process = subprocess.Popen(
        [str(binary), "-a", f"127.0.0.1:{http_port}", "-http-port", "-1", "-c", str(config), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "TS_NO_LOGS_NO_SUPPORT": "true"},
    )
    try:
        import socket

        for _ in range(200):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", http_port)) == 0:
                    break
            assert process.poll() is None, process.stderr.read() if process.stderr else b""
            time.sleep(0.05)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

def headscale_config(
    folder: Path,
    *,
    server_url: str,
    listen: str,
    ip: str,
    metrics: str,
    grpc: str,
    stun: str,
    base_domain: str,
    log_level: str = "info",
) -> dict[str, Any]:
    """A headscale config for tests and benchmarks (JSON is YAML): SQLite, keys and socket in
    ``folder``, its embedded DERP on ``ip`` (STUN at ``stun``), MagicDNS under ``base_domain``; no
    DERP map or update check is fetched from the internet."""
    return {
        "server_url": server_url,
        "listen_addr": listen,
        "metrics_listen_addr": metrics,
        "grpc_listen_addr": grpc,
        "grpc_allow_insecure": False,
        "noise": {"private_key_path": str(folder / "noise_private.key")},
        "prefixes": {"v4": "100.64.0.0/10", "v6": "fd7a:115c:a1e0::/48", "allocation": "sequential"},
        "derp": {
            "server": {
                "enabled": True,
                "region_id": 999,
                "region_code": "test",
                "region_name": "embedded DERP of the test",
                "verify_clients": True,
                "stun_listen_addr": stun,
                "private_key_path": str(folder / "derp_server_private.key"),
                "automatically_add_embedded_derp_region": True,
                "ipv4": ip,
            },
            "urls": [],
            "paths": [],
            "auto_update_enabled": False,
        },
        "disable_check_updates": True,
        "database": {"type": "sqlite", "sqlite": {"path": str(folder / "db.sqlite"), "write_ahead_log": True}},
        "log": {"level": log_level, "format": "text"},
        "policy": {"mode": "file", "path": ""},
        "dns": {
            "magic_dns": True,
            "base_domain": base_domain,
            "override_local_dns": False,
            "nameservers": {"global": [], "split": {}},
            "search_domains": [],
            "extra_records": [],
        },
        "unix_socket": str(folder / "headscale.sock"),
        "unix_socket_permission": "0770",
        "logtail": {"enabled": False},
        "taildrop": {"enabled": False},
    }


def headscale() -> Path:
    """headscale (HEADSCALE_VERSION), the open-source Tailscale control server."""
    return bundle("headscale") / "headscale"


def go_program(name: str) -> Path:
    """One of our Go programs, tests/interop/go/<name>/ (its main package), built with its go.sum."""
    folder = GO_SOURCES / name
    if not (folder / "go.mod").is_file():
        raise GoBuildError(f"no Go program {name!r} under {GO_SOURCES}")
    return go_build(folder)


def require(fn: Callable[[], T]) -> T:
    """fn()'s result for a test; a GoBuildError skips the test with the reason, or fails it under
    EMBEDMESH_REQUIRE_INTEROP=1 (CI), so a green CI run means the real binaries ran."""
    try:
        return fn()
    except GoBuildError as e:
        import pytest

        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{e} (and {REQUIRE_ENV}=1 forbids skipping)", pytrace=False)
        pytest.skip(str(e))


def _main(argv: list[str]) -> int:
    usage = "usage: gopeers.py build [BUNDLE...] | path BINARY | list | clean"
    if not argv:
        print(usage, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "build":
        status = 0
        for name in rest or list(BUNDLES):
            started = time.monotonic()
            try:
                folder = bundle(name, quiet=False)
            except GoBuildError as e:
                print(f"gopeers: {e}", file=sys.stderr)
                status = 1
                continue
            print(f"gopeers: {name} ready in {time.monotonic() - started:.1f}s: {folder}", file=sys.stderr)
        return status
    if command == "path" and len(rest) == 1:
        for spec in BUNDLES.values():
            if rest[0] in spec.binaries:
                try:
                    print(ensure(spec) / rest[0])
                except GoBuildError as e:
                    print(f"gopeers: {e}", file=sys.stderr)
                    return 1
                return 0
        print(f"gopeers: no binary {rest[0]!r}", file=sys.stderr)
        return 2
    if command == "list":
        for stamp_path in sorted((cache_dir() / "bin").glob("*/STAMP.json")):
            print(f"{stamp_path.parent.name}: {stamp_path.read_text()}")
        return 0
    if command == "clean":
        root = cache_dir()
        if root.is_dir():
            with _locked(root):
                for child in root.iterdir():
                    if child.name != "build.lock":
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
        print(f"gopeers: emptied {root}", file=sys.stderr)
        return 0
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
