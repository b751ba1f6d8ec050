"""Interactive logins waiting for an admin (Tailscale's AuthURL flow, before SSO).

A Tailscale client that registers without an auth key gets an AuthURL (``/register/<id>`` on the
control server) and asks again with ``Followup`` set to it, which waits until the login is done.
Until OpenID Connect arrives (a later issue), an admin completes it with ``embedmesh control auth
register <URL or id> --user NAME``. Anyone who reaches the server can start a login, so they are
bounded: they live in memory only (nothing reaches the store before an admin acts), at most
``max_pending`` at once (the oldest goes first), each for ``lifetime`` seconds; one machine has one.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass, field

import anyio

from embedmesh.control.errors import NotFoundError
from embedmesh.control.messages import RegisterRequest

DEFAULT_LIFETIME = 600.0
DEFAULT_MAX_PENDING = 1000


@dataclass(eq=False)
class Login:
    id: str
    machine_key: bytes
    request: RegisterRequest
    created: float
    source: str | None
    #: The node the admin's action created or re-authenticated (None while it waits).
    node_id: int | None = None
    done: anyio.Event = field(default_factory=anyio.Event)


class PendingLogins:
    """The logins that wait for an admin; ids are 128 random bits in hex."""

    def __init__(self, *, lifetime: float = DEFAULT_LIFETIME, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.lifetime = lifetime
        self.max_pending = max_pending
        self._by_id: OrderedDict[str, Login] = OrderedDict()
        self._by_machine: dict[bytes, str] = {}
        # Logins an admin completed, kept for their lifetime for the device's Followup only: the
        # admin may act before the device's Followup request reaches the server (the AuthURL is
        # shown before that request is sent), and that request must then get the registration,
        # not a fresh login.
        self._finished: OrderedDict[str, Login] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_id)

    def start(self, machine_key: bytes, request: RegisterRequest, now: float, source: str | None) -> Login:
        """The machine's login (a new one, or its pending one with the latest request)."""
        self.expire(now)
        existing = self._by_machine.get(machine_key)
        if existing is not None and existing in self._by_id:
            login = self._by_id[existing]
            login.request = request
            return login
        while len(self._by_id) >= self.max_pending:
            _, oldest = self._by_id.popitem(last=False)
            self._by_machine.pop(oldest.machine_key, None)
        # Hex: an id that began with "-" (1 in 64 of URL-safe base64 ones) read as an option to
        # `control auth register ID`.
        login = Login(secrets.token_hex(16), machine_key, request, now, source)
        self._by_id[login.id] = login
        self._by_machine[machine_key] = login.id
        return login

    def get(self, login_id: str, now: float) -> Login:
        self.expire(now)
        login = self._by_id.get(_id_of(login_id))
        if login is None:
            raise NotFoundError(
                f"no login waiting with id {_id_of(login_id)[:40]!r}: it may have expired (logins wait "
                f"{self.lifetime / 60:.0f} minutes); see `embedmesh control auth list`"
            )
        return login

    def follow(self, login_id: str, now: float) -> Login | None:
        """The login a device's Followup names: waiting, or completed by an admin (None if unknown)."""
        self.expire(now)
        key = _id_of(login_id)
        return self._by_id.get(key) or self._finished.get(key)

    def finish(self, login: Login, node_id: int) -> None:
        login.node_id = node_id
        self._by_id.pop(login.id, None)
        self._by_machine.pop(login.machine_key, None)
        self._finished[login.id] = login
        while len(self._finished) > self.max_pending:
            self._finished.popitem(last=False)
        login.done.set()

    def waiting(self, now: float) -> list[Login]:
        self.expire(now)
        return list(self._by_id.values())

    def expire(self, now: float) -> None:
        while self._by_id:
            login = next(iter(self._by_id.values()))
            if login.created + self.lifetime > now:
                break
            self._by_id.popitem(last=False)
            self._by_machine.pop(login.machine_key, None)
        while self._finished:
            login = next(iter(self._finished.values()))
            if login.created + self.lifetime > now:
                break
            self._finished.popitem(last=False)


def _id_of(text: str) -> str:
    """An id from an AuthURL (``.../register/<id>``) or the id itself."""
    return text.strip().rstrip("/").rsplit("/", 1)[-1]
