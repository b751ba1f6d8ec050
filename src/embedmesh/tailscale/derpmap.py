"""Tailscale's DERP map (``tailcfg.DERPMap``): the relay regions a tailnet's nodes use.

The control server sends it in the network map as JSON::

    {"Regions": {"900": {"RegionID": 900, "RegionCode": "home", "RegionName": "Home",
                         "Nodes": [{"Name": "900a", "RegionID": 900, "HostName": "derp.example.com",
                                    "IPv4": "203.0.113.1", "STUNPort": 3478, "DERPPort": 443}]}},
     "OmitDefaultRegions": true}

A node's ``STUNPort`` 0 means 3478 and -1 no STUN; ``DERPPort`` 0 means 443; ``IPv4``/``IPv6``
``"none"`` disable that family and an address pins it (no DNS); ``STUNOnly`` nodes relay nothing;
``InsecureForTests`` skips TLS verification. Null regions are dropped, as Go's client does.

How Tailscale's client reaches a DERP node (``derphttp.Client.urlString``): always
``https://HostName[:DERPPort]/derp``, unless the environment sets ``TS_DEBUG_USE_DERP_HTTP``, then
``http://`` with port 3340 (derper's plain-HTTP dev port) when the node names no ``DERPPort``. :meth:`DerpNode.derp_url` decides the same way, so one map
serves tailscaled and embedmesh nodes alike.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedmesh.errors import ConfigError
from embedmesh.tailscale.errors import TailscaleProtocolError
from embedmesh.tailscale.gojson import GoObject, fold

#: Tailscale's environment knob for plain-HTTP DERP (tests and labs).
DERP_HTTP_ENV = "TS_DEBUG_USE_DERP_HTTP"
DEFAULT_STUN_PORT = 3478


class DerpMapError(TailscaleProtocolError):
    """A DERP map that does not have Tailscale's shape."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "t", "yes", "y", "on")


def use_plain_http() -> bool:
    """Whether DERP connections use plain HTTP (``TS_DEBUG_USE_DERP_HTTP``, as Tailscale's client)."""
    return _truthy(os.environ.get(DERP_HTTP_ENV))


@dataclass(frozen=True, slots=True)
class DerpNode:
    """One DERP (and/or STUN) server of a region."""

    name: str
    region_id: int
    host_name: str
    cert_name: str = ""
    ipv4: str = ""
    ipv6: str = ""
    stun_port: int = 0
    stun_only: bool = False
    derp_port: int = 0
    insecure_for_tests: bool = False
    stun_test_ip: str = ""
    can_port80: bool = False

    def derp_url(self, *, plain_http: bool | None = None) -> str:
        """The URL Tailscale's client would dial for this node (see the module docstring)."""
        http = use_plain_http() if plain_http is None else plain_http
        scheme, default = ("http", 80) if http else ("https", 443)
        host = self.host_name or self.dial_host()
        if ":" in host:
            host = f"[{host}]"
        # Go's derphttp dials 443 for TLS and 3340 for plain HTTP unless DERPPort says otherwise.
        port = self.derp_port or (3340 if http else 443)
        if port != default:
            host = f"{host}:{port}"
        return f"{scheme}://{host}/derp"

    @property
    def pinned_cert_sha256(self) -> str | None:
        """The hex SHA-256 of the certificate to expect when ``CertName`` is
        ``"sha256-raw:<hex>"`` (a self-signed DERP certificate, pinned as Tailscale's client does)."""
        prefix = "sha256-raw:"
        if self.cert_name.startswith(prefix):
            return self.cert_name[len(prefix) :].lower()
        return None

    def dial_host(self) -> str:
        """The address to connect to: the pinned IPv4 (or IPv6) when given, else the host name.
        (TLS still names :attr:`host_name`.)"""
        if self.ipv4 and self.ipv4 != "none":
            return self.ipv4
        if self.ipv6 and self.ipv6 != "none":
            return self.ipv6
        return self.host_name

    def stun_targets(self) -> list[tuple[str, int]]:
        """Where STUN probes to this node go: (host or address, port); none when STUN is off."""
        if self.stun_port < 0:
            return []
        port = self.stun_port or DEFAULT_STUN_PORT
        if self.stun_test_ip:
            return [(self.stun_test_ip, port)]
        targets = [(a, port) for a in (self.ipv4, self.ipv6) if a and a != "none"]
        if not targets and self.host_name and "none" not in (self.ipv4, self.ipv6):
            targets.append((self.host_name, port))
        return targets

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Name": self.name, "RegionID": self.region_id, "HostName": self.host_name}
        for key, value in (
            ("CertName", self.cert_name),
            ("IPv4", self.ipv4),
            ("IPv6", self.ipv6),
            ("STUNPort", self.stun_port),
            ("STUNOnly", self.stun_only),
            ("DERPPort", self.derp_port),
            ("InsecureForTests", self.insecure_for_tests),
            ("STUNTestIP", self.stun_test_ip),
            ("CanPort80", self.can_port80),
        ):
            if value:
                out[key] = value
        return out


@dataclass(frozen=True, slots=True)
class DerpRegion:
    """A DERP region: servers in one place that relay for each other (a mesh)."""

    region_id: int
    region_code: str = ""
    region_name: str = ""
    nodes: tuple[DerpNode, ...] = ()
    avoid: bool = False
    no_measure_no_home: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "RegionID": self.region_id,
            "RegionCode": self.region_code,
            "RegionName": self.region_name,
            "Nodes": [n.to_json() for n in self.nodes],
        }
        if self.avoid:
            out["Avoid"] = True
        if self.no_measure_no_home:
            out["NoMeasureNoHome"] = True
        return out


@dataclass(frozen=True, slots=True)
class DerpMap:
    """Every region of a tailnet's DERP map, by region id."""

    regions: Mapping[int, DerpRegion] = field(default_factory=dict)
    omit_default_regions: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Regions": {str(r): region.to_json() for r, region in sorted(self.regions.items())}}
        if self.omit_default_regions:
            out["OmitDefaultRegions"] = True
        return out


def _mapping(value: object) -> Mapping[str, Any] | None:
    """A JSON object keyed as Go's ``encoding/json`` matches fields (folded case, the last
    duplicate winning): a GoObject (a network map) already is; a plain dict (a file) is folded."""
    if isinstance(value, GoObject):
        return dict(value.items())
    if isinstance(value, Mapping):
        return {fold(k) if isinstance(k, str) else k: v for k, v in value.items()}
    return None


def _get(obj: Mapping[str, Any], key: str, kind: type, default: Any, what: str) -> Any:
    """Field ``key`` of a :func:`_mapping`, of type ``kind`` (``default`` when absent or null)."""
    value = obj.get(fold(key))
    if value is None:
        return default
    if kind is Mapping:
        mapping = _mapping(value)
        if mapping is None:
            raise DerpMapError(f"{what}: {key} must be an object")
        return mapping
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DerpMapError(f"{what}: {key} must be a number")
        if not -(2**31) <= value < 2**32:
            raise DerpMapError(f"{what}: {key} is out of range")
        return value
    if not isinstance(value, kind):
        raise DerpMapError(f"{what}: {key} must be a {kind.__name__}")
    return value


def _node(obj: object, region_id: int, index: int) -> DerpNode:
    what = f"DERP region {region_id} node {index}"
    obj = _mapping(obj)
    if obj is None:
        raise DerpMapError(f"{what} is not an object")
    port = _get(obj, "DERPPort", int, 0, what)
    stun = _get(obj, "STUNPort", int, 0, what)
    if not 0 <= port <= 65535 or not -1 <= stun <= 65535:
        raise DerpMapError(f"{what}: port out of range")
    return DerpNode(
        name=_get(obj, "Name", str, "", what),
        region_id=_get(obj, "RegionID", int, region_id, what),
        host_name=_get(obj, "HostName", str, "", what),
        cert_name=_get(obj, "CertName", str, "", what),
        ipv4=_get(obj, "IPv4", str, "", what),
        ipv6=_get(obj, "IPv6", str, "", what),
        stun_port=stun,
        stun_only=_get(obj, "STUNOnly", bool, False, what),
        derp_port=port,
        insecure_for_tests=_get(obj, "InsecureForTests", bool, False, what),
        stun_test_ip=_get(obj, "STUNTestIP", str, "", what),
        can_port80=_get(obj, "CanPort80", bool, False, what),
    )


def parse_derp_map(obj: object) -> DerpMap:
    """A DERP map from its decoded JSON (dicts, or the GoObjects of a network map); raises
    :class:`DerpMapError` for anything else."""
    obj = _mapping(obj)
    if obj is None:
        raise DerpMapError("a DERP map is a JSON object")
    raw_regions = _get(obj, "Regions", Mapping, {}, "DERP map")
    regions: dict[int, DerpRegion] = {}
    for key, raw in raw_regions.items():
        if raw is None:
            continue  # Go's client drops null regions
        try:
            region_id = int(key)
        except (TypeError, ValueError):
            raise DerpMapError(f"DERP region key {str(key)[:20]!r} is not a number") from None
        if not 0 < region_id < 2**31:
            raise DerpMapError(f"DERP region id {region_id} is out of range")
        what = f"DERP region {region_id}"
        raw = _mapping(raw)
        if raw is None:
            raise DerpMapError(f"{what} is not an object")
        nodes = _get(raw, "Nodes", list, [], what)
        regions[region_id] = DerpRegion(
            region_id=region_id,
            region_code=_get(raw, "RegionCode", str, "", what),
            region_name=_get(raw, "RegionName", str, "", what),
            nodes=tuple(_node(n, region_id, i) for i, n in enumerate(nodes)),
            avoid=_get(raw, "Avoid", bool, False, what),
            no_measure_no_home=_get(raw, "NoMeasureNoHome", bool, False, what),
        )
    return DerpMap(regions, _get(obj, "OmitDefaultRegions", bool, False, "DERP map"))


def load_derp_map(path: str | os.PathLike[str]) -> DerpMap:
    """A DERP map from a JSON file; raises ConfigError saying what is wrong."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the DERP map {path}: {exc}") from None
    try:
        return parse_derp_map(document)
    except DerpMapError as exc:
        raise ConfigError(f"{path} is not a DERP map: {exc}") from None


__all__ = [
    "DERP_HTTP_ENV",
    "DerpMap",
    "DerpMapError",
    "DerpNode",
    "DerpRegion",
    "load_derp_map",
    "parse_derp_map",
    "use_plain_http",
]
