"""Pre-auth keys: ``emk-<id>-<secret>``, stored as the id and the SHA-256 of the secret.

The id is public (admins list and revoke keys by it); the secret is shown once, when the key is
created. Verification looks the record up by id and compares digests in constant time, and only a
key whose secret matches learns whether it is used, expired or revoked.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from embedmesh.control.errors import (
    AuthKeyExpiredError,
    AuthKeyInvalidError,
    AuthKeyRevokedError,
    AuthKeyUsedError,
)

PREFIX = "emk"
ID_BYTES = 6
SECRET_BYTES = 24
_KEY_RE = re.compile(r"emk-([0-9a-f]{12})-([0-9a-f]{48})")


@dataclass(frozen=True, slots=True)
class AuthKeyRecord:
    """One auth key as the store keeps it (no secret, only its digest)."""

    id: str
    secret_sha256: bytes
    reusable: bool
    ephemeral: bool
    preapproved: bool
    tags: tuple[str, ...]
    created: float
    expires: float | None
    revoked: float | None
    uses: int
    last_used: float | None
    #: The user that nodes joining with the key (without tags) belong to; None: the default user.
    user: str | None = None

    def __repr__(self) -> str:
        return (
            f"AuthKeyRecord(id={self.id!r}, reusable={self.reusable}, ephemeral={self.ephemeral}, "
            f"preapproved={self.preapproved}, tags={self.tags!r}, uses={self.uses})"
        )

    def state(self, now: float) -> str:
        """``valid``, ``used``, ``expired`` or ``revoked``: what ``authkey list`` shows."""
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and now >= self.expires:
            return "expired"
        if not self.reusable and self.uses > 0:
            return "used"
        return "valid"


def new_auth_key(id_bytes: bytes, secret_bytes: bytes) -> tuple[str, str]:
    """(id, full key text) from random bytes the caller draws."""
    if len(id_bytes) != ID_BYTES or len(secret_bytes) != SECRET_BYTES:
        raise ValueError(f"an auth key needs {ID_BYTES} + {SECRET_BYTES} random bytes")
    key_id = id_bytes.hex()
    return key_id, f"{PREFIX}-{key_id}-{secret_bytes.hex()}"


def parse_auth_key(text: str) -> tuple[str, bytes]:
    """(id, SHA-256 of the secret); raises :class:`AuthKeyInvalidError` on anything else."""
    match = _KEY_RE.fullmatch(text.strip())
    if match is None:
        raise AuthKeyInvalidError(
            "the auth key is not of the form emk-<id>-<secret>: copy the whole last line that "
            "`embedmesh control authkey create` printed"
        )
    return match.group(1), hashlib.sha256(match.group(2).encode()).digest()


def secret_digest(key_text: str) -> bytes:
    return parse_auth_key(key_text)[1]


def check_auth_key(record: AuthKeyRecord | None, digest: bytes, now: float) -> AuthKeyRecord:
    """Raise the error that explains why the key cannot register a node, or return the record."""
    # Compare against a dummy digest when the id is unknown, so both paths cost the same.
    expected = record.secret_sha256 if record is not None else bytes(32)
    if not hmac.compare_digest(expected, digest) or record is None:
        raise AuthKeyInvalidError(
            "auth key not recognised by this control server: check it was created on this server "
            "(`embedmesh control authkey list`)"
        )
    if record.revoked is not None:
        raise AuthKeyRevokedError(
            f"auth key {record.id} was revoked: create a new one with `embedmesh control authkey create`"
        )
    if record.expires is not None and now >= record.expires:
        raise AuthKeyExpiredError(
            f"auth key {record.id} has expired: create a new one with `embedmesh control authkey create`"
        )
    if not record.reusable and record.uses > 0:
        raise AuthKeyUsedError(
            f"auth key {record.id} is a one-off key and was already used: create a new one, "
            "or pass --reusable to create a key for many nodes"
        )
    return record
