"""WireGuard's protocol constants (whitepaper §6.1, §6.4) in seconds and messages."""

from __future__ import annotations

REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
#: Each handshake retransmission waits REKEY_TIMEOUT plus up to this much jitter (§6.4), so that two
#: peers retrying at once drift apart.
REKEY_TIMEOUT_JITTER = 1.0 / 3.0
KEEPALIVE_TIMEOUT = 10.0
#: Retransmissions of one handshake before giving up: REKEY_ATTEMPT_TIME / REKEY_TIMEOUT.
MAX_HANDSHAKE_ATTEMPTS = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)
#: The responder-side flood guard: at most one initiation per peer in this interval (wireguard-go).
INITIATION_MIN_INTERVAL = 1.0 / 50.0
#: A hurried initiation (a new path to the peer) waits until the last one is this old: well past
#: the peer's flood guard with jitter, and long enough that the last one's answer came if it
#: could (a new initiation discards the state that answer needs).
HURRY_MIN_INTERVAL = 0.25
#: Packets waiting for a handshake, per peer; the oldest give way (wireguard-go keeps 1,024).
MAX_STAGED_PACKETS = 1024
