"""Fuzz target: the wg-quick configuration parser, ``embedmesh.config.parse_wireguard_config``.

The parser takes ``str``, so the bytes are decoded here, as UTF-8 with ``errors="surrogateescape"``:
every byte string maps to its own text, and bytes that are not UTF-8 become lone surrogates
(U+DC80..U+DCFF) instead of all collapsing into U+FFFD as ``errors="replace"`` would. That hands the
parser text no well-behaved file reader produces, which is the point: whatever it gets, it may only
raise ``ConfigError``.

Beyond "no other exception", each input checks:
- an error names a line that exists in the input, never quotes anything shaped like a key, and can be
  encoded as UTF-8 (so logging it cannot fail);
- an accepted configuration hides the private key from its repr and survives being written back out
  in canonical form and parsed again unchanged.
"""

from __future__ import annotations

import dataclasses
import re

from embedmesh.config import WireGuardConfig, encode_key, parse_wireguard_config
from embedmesh.errors import ConfigError

_KEY_SHAPED = re.compile(r"[A-Za-z0-9+/]{43}=")


def TestOneInput(data: bytes) -> None:
    text = data.decode("utf-8", errors="surrogateescape")
    try:
        config = parse_wireguard_config(text)
    except ConfigError as error:
        _check_error(text, error)
        return
    _check_config(config)


def _check_error(text: str, error: ConfigError) -> None:
    message = str(error)
    lines = text.count("\n") + 1
    if error.line is None or not 1 <= error.line <= lines:
        raise AssertionError(f"error names no line of the {lines}-line input: {message!r}") from error
    for key in _KEY_SHAPED.findall(text):
        if key in message:
            raise AssertionError(f"error message quotes a key: {message!r}") from error
    message.encode("utf-8")


def _check_config(config: WireGuardConfig) -> None:
    secret = encode_key(config.interface.private_key)
    shown = repr(config)
    if secret in shown or repr(config.interface.private_key) in shown:
        raise AssertionError("repr shows the private key")
    again = parse_wireguard_config(_render(config))
    expected = dataclasses.replace(config, ignored=())
    if again != expected:
        raise AssertionError(f"round trip changed the configuration:\n{config!r}\n{again!r}")


def _render(config: WireGuardConfig) -> str:
    interface = config.interface
    out = ["[Interface]", f"PrivateKey = {encode_key(interface.private_key)}"]
    if interface.listen_port is not None:
        out.append(f"ListenPort = {interface.listen_port}")
    if interface.addresses:
        out.append("Address = " + ", ".join(map(str, interface.addresses)))
    if interface.dns or interface.dns_search:
        out.append("DNS = " + ", ".join([*map(str, interface.dns), *interface.dns_search]))
    if interface.mtu is not None:
        out.append(f"MTU = {interface.mtu}")
    for peer in config.peers:
        out += ["", "[Peer]", f"PublicKey = {encode_key(peer.public_key)}"]
        if peer.preshared_key is not None:
            out.append(f"PresharedKey = {encode_key(peer.preshared_key)}")
        out.append("AllowedIPs = " + ", ".join(map(str, peer.allowed_ips)))
        if peer.endpoint is not None:
            host, port = peer.endpoint
            out.append(f"Endpoint = [{host}]:{port}" if ":" in host else f"Endpoint = {host}:{port}")
        if peer.persistent_keepalive is not None:
            out.append(f"PersistentKeepalive = {peer.persistent_keepalive}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    from harness import run

    run(TestOneInput)
