"""gopeers, the Go build helper: builds once across processes, caches by content, skips or fails
visibly when it cannot build."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gopeers
import pytest

HERE = Path(__file__).resolve().parent


def _hello(folder: Path, token: str) -> Path:
    folder.mkdir()
    (folder / "go.mod").write_text("module embedmesh.test/hello\n\ngo 1.26\n")
    (folder / "go.sum").write_text("")
    (folder / "main.go").write_text(
        f'package main\n\nimport "fmt"\n\nfunc main() {{ fmt.Println("{token}") }}\n'
    )
    return folder


def _build_in_subprocess(source: Path) -> subprocess.Popen[str]:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import gopeers; from pathlib import Path; "
        "spec = gopeers.GoBuild('hello', ('hello',), source=Path(sys.argv[2])); "
        "print(gopeers.ensure(spec, quiet=False))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, str(HERE), str(source)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_program_is_built_once_by_concurrent_callers_then_served_from_the_cache(tmp_path: Path) -> None:
    gopeers.require(lambda: gopeers.go_version(gopeers.find_go()))
    token = secrets.token_hex(8)  # a program no cache has seen: this run really builds
    source = _hello(tmp_path / "hello", token)
    made: list[Path] = []
    try:
        procs = [_build_in_subprocess(source) for _ in range(2)]
        results = [p.communicate(timeout=600) for p in procs]
        assert all(p.returncode == 0 for p in procs), results
        folders = {Path(out.strip()) for out, _ in results}
        made.extend(folders)
        assert len(folders) == 1, folders  # both got the same folder ...
        builds = sum(err.count("gopeers: built hello") for _, err in results)
        assert builds == 1, results  # ... and only one of them built it (the other waited on the lock)
        (folder,) = folders
        assert gopeers.cache_dir() in folder.parents
        assert subprocess.run([folder / "hello"], capture_output=True, text=True).stdout == f"{token}\n"

        started = time.monotonic()
        binary = gopeers.go_build(source, binary="hello")
        assert binary == folder / "hello"
        assert time.monotonic() - started < 1.0  # a stat, no go command

        # Any change of the folder's bytes (sources, go.mod, go.sum) is a new build in a new folder.
        (source / "main.go").write_text((source / "main.go").read_text().replace(token, token[::-1]))
        rebuilt = gopeers.go_build(source, binary="hello")
        made.append(rebuilt.parent)
        assert rebuilt.parent != folder
        assert subprocess.run([rebuilt], capture_output=True, text=True).stdout == f"{token[::-1]}\n"
    finally:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)
            (gopeers.cache_dir() / "logs" / f"{path.name}.log").unlink(missing_ok=True)


def test_without_go_a_test_skips_with_the_reason_and_fails_under_require_interop(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(gopeers.GO_ENV, str(tmp_path / "no-go-here"))
    monkeypatch.delenv(gopeers.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="is not an executable go binary"):
        gopeers.require(gopeers.tailscaled)
    monkeypatch.setenv(gopeers.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="forbids skipping"):
        gopeers.require(gopeers.headscale)


def test_a_failing_build_reports_the_log_tail(tmp_path: Path) -> None:
    gopeers.require(lambda: gopeers.go_version(gopeers.find_go()))
    source = _hello(tmp_path / "broken", "x")
    (source / "main.go").write_text("package main\n\nfunc main() { undefinedThing() }\n")
    name = f"broken{secrets.token_hex(4)}"
    try:
        with pytest.raises(gopeers.GoBuildError, match="undefined: undefinedThing"):
            gopeers.go_build(source, binary=name)
        started = time.monotonic()
        with pytest.raises(gopeers.GoBuildError, match="undefined: undefinedThing"):
            gopeers.go_build(source, binary=name)  # remembered: not built again in this process
        assert time.monotonic() - started < 1.0
    finally:
        for log in (gopeers.cache_dir() / "logs").glob(f"{name}-*.log"):
            log.unlink()


def test_pinned_versions_only() -> None:
    with pytest.raises(ValueError, match="@version"):
        gopeers.GoBuild("x", ("x",), packages=("tailscale.com/cmd/tailscale",))
