"""Fixtures for the interop suite: real peers (wireguard-go, later the kernel) in network namespaces.

Every test in this folder is marked ``interop`` (deselect with ``-m "not interop"``).  Tests get a
fresh :class:`netns.NetnsRig` from the ``rig`` fixture, which skips with the reason when the machine
cannot make namespaces, and always closes the rig: a test that leaves resources behind fails in
teardown.  ``wg_rig`` additionally needs wireguard-go and wg.  With ``EMBEDMESH_REQUIRE_INTEROP=1``
(set by .ci/run) a missing prerequisite is a failure instead of a skip.

Real Tailscale software (``gopeers.py`` builds it into a cache outside the repository):
``tailscale_bins`` (a ``tailnet.TailscaleBins`` of tailscaled, tailscale, derper paths),
``oldest_tailscale_bins`` (the same with tailscaled and tailscale of the oldest release served),
``headscale_bin`` and ``tsnetpeer_bin`` (paths) are session fixtures; ``tailnet`` is a fresh
``tailnet.TailnetRig`` (hosts behind a dead-end namespace) on the ``rig`` fixture.  The binaries a
session's tests need are built right after collection, outside any test's timeout, once for all
pytest workers (a file lock); a build that cannot happen (no Go, no module proxy) skips those tests
with the reason, or fails them under ``EMBEDMESH_REQUIRE_INTEROP=1``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # `from netns import ...` works in any import mode
    sys.path.insert(0, str(HERE))

import gopeers  # noqa: E402
from netns import NetnsRig, skip_unless_root, skip_unless_wireguard, sweep_stale  # noqa: E402
from tailnet import TailnetRig, TailscaleBins  # noqa: E402

# fixture -> the gopeers bundle it needs (built after collection, see pytest_collection_finish)
_GO_FIXTURES = {
    "tailscale_bins": "tailscale",
    "oldest_tailscale_bins": "tailscale-oldest",
    "headscale_bin": "headscale",
    "tsnetpeer_bin": "tsnetpeer",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.interop)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the Go binaries the selected tests use before the first test starts, so a cold build
    (minutes) is not charged to one test's timeout.  Failures are remembered by gopeers and reported
    by the fixtures (skip, or fail under EMBEDMESH_REQUIRE_INTEROP=1)."""
    wanted = sorted(
        {
            _GO_FIXTURES[f]
            for item in session.items
            for f in getattr(item, "fixturenames", ())
            if f in _GO_FIXTURES
        }
    )
    for name in wanted:
        try:
            gopeers.bundle(name, quiet=False)
        except gopeers.GoBuildError:
            pass  # the fixture reports it, with the reason, at each test that needs it


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def _swept() -> None:
    """Once per session: remove what SIGKILLed earlier runs left (only rigs whose process is gone)."""
    for what in sweep_stale():
        print(f"removed stale rig resource: {what}")


@pytest.fixture
def rig(request: pytest.FixtureRequest, _swept: None) -> Iterator[NetnsRig]:
    """A fresh NetnsRig, closed after the test whatever happened; its process logs are printed
    (shown by pytest) when the test failed."""
    skip_unless_root()
    r = NetnsRig()
    try:
        yield r
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(r.logs())
        r.close(raise_errors=not (rep is not None and rep.failed))


@pytest.fixture
def wg_rig(request: pytest.FixtureRequest) -> NetnsRig:
    """The rig fixture, for tests that start wireguard-go peers (skips first if they can't)."""
    skip_unless_wireguard()
    return request.getfixturevalue("rig")  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def tailscale_bins() -> TailscaleBins:
    """tailscaled, tailscale and derper of tailscale.com v1.102.5 (built on first use)."""
    return gopeers.require(
        lambda: TailscaleBins(gopeers.tailscaled(), gopeers.tailscale_cli(), gopeers.derper())
    )


@pytest.fixture(scope="session")
def oldest_tailscale_bins(tailscale_bins: TailscaleBins) -> TailscaleBins:
    """tailscaled and tailscale of gopeers.OLDEST_TAILSCALE_VERSION (the oldest client the control
    server serves), with the current derper (the tests' DERP server, not a client)."""
    return gopeers.require(
        lambda: TailscaleBins(
            gopeers.oldest_tailscaled(), gopeers.oldest_tailscale_cli(), tailscale_bins.derper
        )
    )


@pytest.fixture(scope="session")
def headscale_bin() -> Path:
    """The headscale binary (gopeers.HEADSCALE_VERSION)."""
    return gopeers.require(gopeers.headscale)


@pytest.fixture(scope="session")
def tsnetpeer_bin() -> Path:
    """Our tsnet program, tests/interop/go/tsnetpeer (see its main.go for the flags)."""
    return gopeers.require(lambda: gopeers.go_program("tsnetpeer"))


@pytest.fixture
def tailnet(rig: NetnsRig) -> TailnetRig:
    """A TailnetRig on a fresh rig: hosts behind a dead-end namespace, all removed after the test."""
    return TailnetRig(rig)
