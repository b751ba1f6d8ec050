"""The coordination server's own DERP region, on by default (as headscale's embedded DERP).

A STUN server runs beside it (UDP, the map's ``STUNPort``), so nodes learn their public
addresses from the same host. A tailnet needs at least one relay for nodes that cannot reach each other directly, and a
self-hosted tailnet should not depend on anyone else's. So ``embedmesh control serve`` runs a DERP
server in the same process and publishes it in every DERP map as region :data:`REGION_ID`
(code ``embedmesh``), beside the regions of ``--derp-map``.

TLS: Tailscale's clients speak HTTPS to DERP. With the control server's own certificate
(``--tls-cert``/``--tls-key``) the relay serves that. Without one it makes a self-signed
certificate for its host name or address (kept in the state directory, mode 0600) and pins it in
the map as ``CertName: "sha256-raw:<hex>"``, which Tailscale's clients (and embedmesh's) check
instead of a CA chain: the relay is authenticated by the map the Noise-protected control channel
delivered. The same port also answers plain HTTP, for clients run with ``TS_DEBUG_USE_DERP_HTTP``.

Admission ("verify clients", on by default): the control server hands the relay a hook that lets
in only the node keys of its own approved, unexpired nodes (:func:`embedmesh.control.derpadmit.admits`),
so the relay carries this tailnet's traffic and nobody else's.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from embedmesh.control.store import create_private_file
from embedmesh.errors import ConfigError
from embedmesh.tailscale.derpadmit import Admit
from embedmesh.tailscale.derpserver import DerpServer, load_or_create_server_key, tls_context
from embedmesh.tailscale.stunserver import StunServer

#: The region id and code of the embedded relay (headscale uses 999 for its own, too).
REGION_ID = 999
REGION_CODE = "embedmesh"
REGION_NAME = "embedmesh (embedded)"
#: A self-signed certificate is renewed when it has less than this left.
RENEW_BEFORE = datetime.timedelta(days=30)
CERT_LIFETIME = datetime.timedelta(days=365)

KEY_FILE = "derp.key"
CERT_FILE = "derp-cert.pem"
CERT_KEY_FILE = "derp-cert.key"


def map_host(listen_host: str, public_host: str | None) -> str:
    """The host name or address the map gives clients: ``public_host``, else the listen address
    unless it is a wildcard, else this machine's name."""
    if public_host:
        return public_host
    if listen_host in ("", "0.0.0.0", "::"):
        return socket.getfqdn()
    return listen_host


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def self_signed_certificate(state_dir: Path, host: str, now: datetime.datetime | None = None) -> tuple[Path, Path]:
    """The relay's self-signed certificate for ``host`` in ``state_dir``: reused while it names
    ``host`` and is not near its end, made anew otherwise. Returns (certificate, key) paths."""
    now = now or datetime.datetime.now(datetime.UTC)
    cert_path, key_path = state_dir / CERT_FILE, state_dir / CERT_KEY_FILE
    if cert_path.exists() and key_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            if _san(host) in names and cert.not_valid_after_utc - now > RENEW_BEFORE:
                return cert_path, key_path
        except (ValueError, x509.ExtensionNotFound):
            pass  # damaged or foreign: make a new one
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(os.urandom(16), "big") >> 1)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CERT_LIFETIME)
        .add_extension(x509.SubjectAlternativeName([_san(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    for path in (cert_path, key_path):
        path.unlink(missing_ok=True)
    create_private_file(
        key_path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    create_private_file(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def certificate_sha256(cert_path: Path) -> str:
    """The hex SHA-256 of a PEM certificate's DER bytes (what ``sha256-raw:`` pins)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@dataclass
class EmbeddedDerp:
    """The embedded relay: its server and what the DERP map says of it."""

    server: DerpServer
    host: str
    #: The pinned certificate's hash; None when the relay serves a CA-verifiable certificate.
    cert_sha256: str | None
    port: int = 0
    #: The STUN port the map advertises (-1: none) and its server.
    stun_port: int = -1
    stun_server: StunServer | None = None

    @classmethod
    def create(
        cls,
        state_dir: Path,
        host: str,
        *,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        admit: Admit | None = None,
    ) -> EmbeddedDerp:
        """A relay keyed from ``state_dir`` (``derp.key``, derper's format), serving ``tls_cert``
        or a pinned self-signed certificate for ``host``; ``admit`` decides which clients it
        serves (None: all)."""
        private = load_or_create_server_key(state_dir / KEY_FILE)
        pinned: str | None = None
        if tls_cert is None or tls_key is None:
            tls_cert, tls_key = self_signed_certificate(state_dir, host)
            pinned = certificate_sha256(tls_cert)
        try:
            context: ssl.SSLContext = tls_context(tls_cert, tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"the embedded DERP server cannot use {tls_cert}: {exc}") from exc
        return cls(DerpServer(private, ssl_context=context, plain_http_too=True, admit=admit), host, pinned)

    def region_json(self) -> dict[str, Any]:
        """This relay as a DERPMap region (Tailscale's JSON)."""
        node: dict[str, Any] = {
            "Name": f"{REGION_ID}a",
            "RegionID": REGION_ID,
            "HostName": self.host,
            "DERPPort": self.port,
            "STUNPort": self.stun_port,
        }
        try:
            address = ipaddress.ip_address(self.host)
        except ValueError:
            pass
        else:
            # A literal address needs no DNS; pin the family so clients do not look it up.
            node["IPv4" if address.version == 4 else "IPv6"] = str(address)
        if self.cert_sha256 is not None:
            node["CertName"] = f"sha256-raw:{self.cert_sha256}"
        return {"RegionID": REGION_ID, "RegionCode": REGION_CODE, "RegionName": REGION_NAME, "Nodes": [node]}


__all__ = ["REGION_CODE", "REGION_ID", "EmbeddedDerp", "certificate_sha256", "map_host", "self_signed_certificate"]
