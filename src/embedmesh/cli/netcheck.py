"""`embedmesh netcheck`: the network's view of this host, as `tailscale netcheck` shows it."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from embedmesh.errors import ConfigError

if TYPE_CHECKING:
    from embedmesh.netcheck import NetcheckReport
    from embedmesh.tailscale.derpmap import DerpMap


def go_duration(seconds: float) -> str:
    """A latency the way Go prints a ``time.Duration`` rounded to 0.1 ms ("12.3ms", "850µs", "1.2s")."""
    ns = round(seconds * 1e4) * 100_000
    if ns == 0:
        return "0s"
    if ns < 1_000_000:
        return f"{ns // 1000}µs"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.1f}".rstrip("0").rstrip(".") + "ms"
    minutes, rest = divmod(ns, 60_000_000_000)
    text = f"{rest / 1e9:.4f}".rstrip("0").rstrip(".") + "s"
    return f"{minutes}m{text}" if minutes else text


def render(report: NetcheckReport, derp_map: DerpMap) -> str:
    """The text `tailscale netcheck` prints for a report."""

    def endpoint(address: tuple[str, int]) -> str:
        host, port = address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    lines = ["", "Report:"]
    lines.append(f"\t* Time: {datetime.datetime.now(datetime.UTC).isoformat(timespec='microseconds')}")
    lines.append(f"\t* UDP: {str(report.udp).lower()}")
    lines.append(
        f"\t* IPv4: yes, {endpoint(report.global_v4)}" if report.global_v4 else "\t* IPv4: (no addr found)"
    )
    if report.global_v6:
        lines.append(f"\t* IPv6: yes, {endpoint(report.global_v6)}")
    elif report.ipv6:
        lines.append("\t* IPv6: (no addr found)")
    elif report.os_has_ipv6:
        lines.append("\t* IPv6: no, but OS has support")
    else:
        lines.append("\t* IPv6: no, unavailable in OS")
    varies = report.mapping_varies_by_dest_ip
    lines.append(f"\t* MappingVariesByDestIP: {'' if varies is None else str(varies).lower()}")
    regions = derp_map.regions
    if not report.region_latency:
        lines.append("\t* Nearest DERP: unknown (no response to latency probes)")
        return "\n".join(lines)
    preferred = regions.get(report.preferred_derp)
    if report.preferred_derp == 0:
        lines.append("\t* Nearest DERP: [none]")
    elif preferred is None:
        lines.append(f"\t* Nearest DERP: {report.preferred_derp} (region not found in map)")
    else:
        lines.append(f"\t* Nearest DERP: {preferred.region_name or preferred.region_code}")
    lines.append("\t* DERP latency:")

    def order(region_id: int) -> tuple[int, float, int]:
        latency = report.region_latency.get(region_id)
        return (0, latency, region_id) if latency is not None else (1, 0.0, region_id)

    for region_id in sorted(regions, key=order):
        region = regions[region_id]
        latency = report.region_latency.get(region_id)
        shown = go_duration(latency) if latency is not None else ""
        lines.append(f"\t\t- {region.region_code:>3}: {shown:<7} ({region.region_name})")
    return "\n".join(lines)


@click.command()
@click.option(
    "--derp-map",
    "derp_map_path",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="The DERP map to measure (JSON, Tailscale's DERPMap format, as `embedmesh control serve --derp-map` takes).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the report as JSON (the shape of `tailscale netcheck --format=json`).",
)
@click.option("--bind-address", default=None, help="The local address to send from (default: any).")
@click.option(
    "--bind-port",
    type=click.IntRange(0, 65535),
    default=0,
    help="The local UDP port to send from (default: any free one).",
)
@click.option(
    "--all-regions",
    is_flag=True,
    help="Wait for every region's latency instead of ending once three regions answered (like `tailscale netcheck --verbose`).",
)
def netcheck(
    derp_map_path: Path, as_json: bool, bind_address: str | None, bind_port: int, all_regions: bool
) -> None:
    """Report the network: UDP, the public address, NAT type and the DERP regions' latencies."""
    import anyio

    from embedmesh.netcheck import ENOUGH_REGIONS
    from embedmesh.runtime.netcheck import run_netcheck
    from embedmesh.tailscale.derpmap import load_derp_map

    derp_map = load_derp_map(derp_map_path)
    if not derp_map.regions:
        raise ConfigError(f"{derp_map_path} has no DERP regions: netcheck has nothing to measure")
    try:
        report = anyio.run(
            lambda: run_netcheck(
                derp_map,
                bind_host=bind_address,
                port=bind_port,
                enough_regions=len(derp_map.regions) if all_regions else ENOUGH_REGIONS,
            )
        )
    except OSError as exc:
        raise click.ClickException(f"netcheck: {exc}") from None
    if as_json:
        click.echo(json.dumps(report.to_json(), indent="\t"))
        return
    click.echo(render(report, derp_map))
