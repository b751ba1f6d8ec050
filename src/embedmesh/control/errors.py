"""Errors of the control plane, all under :class:`embedmesh.errors.EmbedmeshError`.

Every error a node can receive from the coordination server has a stable wire ``code`` (sent in a
RegisterResponse's or MapResponse's ``EmbedmeshError`` field); the client turns it back into the
same class with :func:`error_from_code`, so the node's owner catches ``AuthKeyUsedError`` rather
than parsing text.
"""

from __future__ import annotations

from typing import ClassVar

from embedmesh import errors as _errors
from embedmesh.errors import EmbedmeshError, ParseError


class ControlError(EmbedmeshError):
    """Base class of the control plane's errors."""

    code: ClassVar[str] = "control_error"


class ControlProtocolError(ControlError, ParseError):
    """A control message or Noise frame is malformed, out of order or fails authentication.

    The session that produced it is unusable: both sides close it.
    """

    code = "protocol_error"


class NetmapDesyncError(ControlProtocolError):
    """A delta does not fit the map it is applied to (the client fetches a full map again)."""

    code = "netmap_desync"


class AuthKeyError(ControlError):
    """Base class of the errors about an auth key."""

    code = "auth_key_error"


class AuthKeyInvalidError(AuthKeyError):
    code = "auth_key_invalid"


class AuthKeyUsedError(AuthKeyError):
    code = "auth_key_used"


class AuthKeyExpiredError(AuthKeyError):
    code = "auth_key_expired"


class AuthKeyRevokedError(AuthKeyError):
    code = "auth_key_revoked"


class AuthKeyRequiredError(AuthKeyError):
    code = "auth_key_required"


class TagNotPermittedError(ControlError, _errors.TagNotPermittedError):
    """The node asked for tags its auth key does not grant; also an
    :class:`embedmesh.errors.TagNotPermittedError`, which is what applications catch."""

    code = "tags_not_permitted"


class RegistrationLimitError(ControlError):
    """The server takes no more keyless registrations for now (too many pending, or too fast).

    ``retry_after`` is the seconds until the source may try again, when that is known (the rate
    limit; Tailscale clients get it as a 429's Retry-After), else None.
    """

    code = "registration_limit"

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ApprovalRefusedError(ControlError):
    """An admin deleted the node while it was waiting for approval."""

    code = "approval_refused"


class NodeDeletedError(ControlError):
    """An admin deleted the node; it needs a new auth key to join again."""

    code = "node_deleted"


class ControlUnreachableError(ControlError):
    """The control server could not be reached (first registration only; later the client retries)."""

    code = "unreachable"


class ServerKeyChangedError(ControlError):
    """The control server presents a key other than the one pinned in the node's state directory."""

    code = "server_key_changed"


class ProtocolVersionError(ControlError):
    code = "protocol_version"


class SessionReplacedError(ControlError):
    """Another connection of the same node took over this stream."""

    code = "session_replaced"


class AdminError(ControlError):
    """An admin request failed; the message says why and what to do."""

    code = "admin_error"


class NotFoundError(AdminError):
    code = "not_found"


class ConflictError(AdminError):
    code = "conflict"


class BadRequestError(AdminError):
    code = "bad_request"


class UnauthorizedError(AdminError):
    code = "unauthorized"


class PayloadTooLargeError(AdminError):
    """An admin request's body is larger than the API accepts."""

    code = "payload_too_large"


class StoreError(ControlError):
    """The state directory cannot be used (newer schema, wrong permissions, corrupt files)."""

    code = "store_error"


class AdminTokenError(StoreError, _errors.ConfigError):
    """The ``admin-token`` file holds a token too weak to guard the admin API (shorter than 32
    characters, empty, or not visible ASCII): the server refuses to start. It is a
    :class:`embedmesh.errors.ConfigError`, what applications catch, and a :class:`StoreError`."""

    code = "admin_token_weak"


_BY_CODE: dict[str, type[ControlError]] = {
    cls.code: cls
    for cls in (
        ControlError,
        ControlProtocolError,
        NetmapDesyncError,
        AuthKeyError,
        AuthKeyInvalidError,
        AuthKeyUsedError,
        AuthKeyExpiredError,
        AuthKeyRevokedError,
        AuthKeyRequiredError,
        TagNotPermittedError,
        RegistrationLimitError,
        ApprovalRefusedError,
        NodeDeletedError,
        ControlUnreachableError,
        ServerKeyChangedError,
        ProtocolVersionError,
        SessionReplacedError,
        AdminError,
        NotFoundError,
        ConflictError,
        BadRequestError,
        UnauthorizedError,
        PayloadTooLargeError,
        StoreError,
    )
}


def error_from_code(code: str, message: str) -> ControlError:
    """The error class for a wire ``code`` (unknown codes give a plain :class:`ControlError`)."""
    return _BY_CODE.get(code, ControlError)(message)


__all__ = [
    "AdminError",
    "AdminTokenError",
    "ApprovalRefusedError",
    "AuthKeyError",
    "AuthKeyExpiredError",
    "AuthKeyInvalidError",
    "AuthKeyRequiredError",
    "AuthKeyRevokedError",
    "AuthKeyUsedError",
    "BadRequestError",
    "ConflictError",
    "ControlError",
    "ControlProtocolError",
    "ControlUnreachableError",
    "NetmapDesyncError",
    "NodeDeletedError",
    "NotFoundError",
    "PayloadTooLargeError",
    "ProtocolVersionError",
    "RegistrationLimitError",
    "ServerKeyChangedError",
    "SessionReplacedError",
    "StoreError",
    "TagNotPermittedError",
    "UnauthorizedError",
    "error_from_code",
]
