"""The one error hierarchy of embedmesh.

Parsers raise only :class:`ParseError` (or a subclass); the engines catch it at their boundary and
turn the offending packet into a dropped, counted one. Errors that reach users say what to do next.
"""

from __future__ import annotations


class EmbedmeshError(Exception):
    """Base class of every error embedmesh raises on purpose."""


class ParseError(EmbedmeshError, ValueError):
    """Bytes from the network (or a file) do not form a valid message."""


class ConfigError(EmbedmeshError, ValueError):
    """A configuration is invalid; the message names the line and the problem."""

    def __init__(self, message: str, line: int | None = None) -> None:
        self.line = line
        super().__init__(f"line {line}: {message}" if line is not None else message)


class NodeError(EmbedmeshError):
    """A node was used in a way its current state does not allow (not started, closed, ...)."""


class NameResolutionError(EmbedmeshError, LookupError):
    """A name has no address: it is in neither the tailnet nor DNS, or no resolver answered."""


class ListenError(EmbedmeshError, OSError):
    """A local port could not be opened to listen on (an ``OSError`` with its ``errno``); the
    message names the port and what to do."""

    def __init__(self, errno_: int, message: str, host: str, port: int) -> None:
        super().__init__(errno_, message)
        self.host = host
        self.port = port
        self.message = message

    def __str__(self) -> str:
        return self.message

    @classmethod
    def from_os_error(cls, exc: OSError, host: str, port: int) -> ListenError:
        """The error for ``exc``, raised when binding ``host:port``: :class:`AddressInUseError`
        for a port in use, a :class:`ListenError` that says why for anything else."""
        import errno

        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            return AddressInUseError(
                exc.errno,
                f"port {port} on {host} is already in use: choose another port, or stop the program "
                "that listens there",
                host,
                port,
            )
        if exc.errno == errno.EACCES:
            reason = f"no permission to listen on port {port} (ports below 1024 need root): choose a higher port"
        elif exc.errno == errno.EADDRNOTAVAIL:
            reason = f"{host} is not an address of this host: listen on 127.0.0.1 or one of its addresses"
        else:
            reason = exc.strerror or str(exc)
        return cls(exc.errno or 0, f"cannot listen on {where}: {reason}", host, port)


class AddressInUseError(ListenError):
    """The local port to listen on is taken by another program (``errno.EADDRINUSE``)."""


class StateDirInUseError(NodeError):
    """Another running node holds the state folder's lock; the message names its PID."""


class TagNotPermittedError(EmbedmeshError):
    """A node asked for tags that its auth key does not grant (only an admin grants tags, when
    creating the key with ``embedmesh control authkey create --tags ...``)."""


class UpTimeoutError(EmbedmeshError, TimeoutError):
    """``Node.up(timeout=...)`` ran out of time; the message and :attr:`waiting_for` say for what.

    :attr:`waiting_for` is one of ``"start"`` (the node was still starting: registration and the
    first network map), ``"control"`` (reconnecting to the coordination server), ``"approval"``
    (an admin has yet to approve the node), ``"reauthentication"`` (the node key expired) and
    ``"login"`` (a Tailscale-protocol server waits for an interactive login: open
    ``node.status().auth_url``).
    """

    def __init__(self, message: str, waiting_for: str) -> None:
        self.waiting_for = waiting_for
        super().__init__(message)
