"""Control URLs: what a node or the admin CLI accepts, with errors that say what to write."""

from __future__ import annotations

from urllib.parse import urlsplit

from embedmesh.errors import ConfigError


def split_url(url: str) -> tuple[str, str, int, bool]:
    """(scheme, host, port, tls) of an http(s) control URL.

    Raises :class:`~embedmesh.errors.ConfigError` (a ``ValueError``) that says what to write
    instead, e.g. ``http://127.0.0.1:8080`` for ``127.0.0.1:8080``.
    """
    if "://" not in url:
        # urlsplit reads "127.0.0.1:8080" as a path and "localhost:8080" as scheme "localhost".
        raise ConfigError(
            f"control URL {url!r} has no scheme: write 'http://{url.lstrip('/')}' "
            "(or https:// for a server behind TLS)"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(
            f"control URL {url!r}: the scheme must be http or https, e.g. http://127.0.0.1:8080"
        )
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"control URL {url!r}: the port must be a number from 1 to 65535") from None
    if not parts.hostname:
        raise ConfigError(f"control URL {url!r} names no host: write e.g. http://127.0.0.1:8080")
    tls = parts.scheme == "https"
    return parts.scheme, parts.hostname, port or (443 if tls else 80), tls
