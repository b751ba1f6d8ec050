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
