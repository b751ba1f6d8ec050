"""``host:port`` strings, with Go's rules (net.SplitHostPort / JoinHostPort): IPv6 hosts in brackets.

Kept free of heavy imports so the command line can use it without loading the whole stack.
"""

from __future__ import annotations

__all__ = ["join_host_port", "split_host_port"]


def split_host_port(address: str) -> tuple[str, int]:
    """Split ``"host:port"``, ``"[v6]:port"`` or ``":port"`` (Go's net.SplitHostPort rules)."""
    if address.startswith("["):
        end = address.find("]")
        if end < 0 or address[end + 1 : end + 2] != ":":
            raise ValueError(f"bad address {address!r}: expected [IPv6]:port")
        host, port_text = address[1:end], address[end + 2 :]
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep:
            raise ValueError(f"bad address {address!r}: expected host:port or :port")
        if ":" in host:
            raise ValueError(f"bad address {address!r}: put an IPv6 address in brackets, [addr]:port")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad port in {address!r}") from None
    return host, port


def join_host_port(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 host (the inverse of :func:`split_host_port`)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
