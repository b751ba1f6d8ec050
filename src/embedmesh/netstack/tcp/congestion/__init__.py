"""Pluggable congestion controllers: pick one by name with :func:`make_controller`."""

from __future__ import annotations

from embedmesh.netstack.tcp.congestion.base import CongestionController
from embedmesh.netstack.tcp.congestion.cubic import Cubic
from embedmesh.netstack.tcp.congestion.newreno import NewReno

CONTROLLERS: dict[str, type[CongestionController]] = {"newreno": NewReno, "reno": NewReno, "cubic": Cubic}


def make_controller(name: str, mss: int) -> CongestionController:
    try:
        return CONTROLLERS[name](mss)
    except KeyError:
        raise ValueError(
            f"unknown congestion controller {name!r}; choose one of {sorted(CONTROLLERS)}"
        ) from None


__all__ = ["CONTROLLERS", "CongestionController", "Cubic", "NewReno", "make_controller"]
