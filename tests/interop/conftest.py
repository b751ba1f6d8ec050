"""Fixtures for the interop suite: real peers (wireguard-go, later the kernel) in network namespaces.

Every test in this folder is marked ``interop`` (deselect with ``-m "not interop"``).  Tests get a
fresh :class:`netns.NetnsRig` from the ``rig`` fixture, which skips with the reason when the machine
cannot make namespaces, and always closes the rig: a test that leaves resources behind fails in
teardown.  ``wg_rig`` additionally needs wireguard-go and wg.  With ``EMBEDMESH_REQUIRE_INTEROP=1``
(set by .ci/run) a missing prerequisite is a failure instead of a skip.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # `from netns import ...` works in any import mode
    sys.path.insert(0, str(HERE))

from netns import NetnsRig, skip_unless_root, skip_unless_wireguard, sweep_stale  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.interop)


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
