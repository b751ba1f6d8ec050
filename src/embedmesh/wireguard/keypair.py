"""A transport keypair: one direction's cipher each way, a send counter and a replay window."""

from __future__ import annotations

from typing import TYPE_CHECKING

from embedmesh.wireguard.crypto import ChaCha20Poly1305
from embedmesh.wireguard.replay import ReplayWindow

if TYPE_CHECKING:
    from embedmesh.wireguard.peer import Peer


class Keypair:
    """Keys from one completed handshake, valid for REJECT_AFTER_TIME from :attr:`created`.

    The AEAD objects are built once here: constructing one per packet would cost as much as the
    encryption itself.
    """

    __slots__ = (
        "created",
        "is_initiator",
        "local_index",
        "peer",
        "receiver",
        "remote_index",
        "replay",
        "send_counter",
        "sender",
    )

    def __init__(
        self,
        peer: Peer,
        send_key: bytes,
        receive_key: bytes,
        *,
        is_initiator: bool,
        local_index: int,
        remote_index: int,
        created: float,
    ) -> None:
        self.peer = peer
        self.sender = ChaCha20Poly1305(send_key)
        self.receiver = ChaCha20Poly1305(receive_key)
        self.send_counter = 0
        self.replay = ReplayWindow()
        self.is_initiator = is_initiator
        self.local_index = local_index
        self.remote_index = remote_index
        self.created = created

    def __repr__(self) -> str:
        role = "initiator" if self.is_initiator else "responder"
        return f"<Keypair {role} local={self.local_index:#010x} sent={self.send_counter}>"
