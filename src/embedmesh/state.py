"""A node's persistent state: its private keys, in a folder only its user can read.

``state_dir/keys.json`` holds the machine key (proves this machine to the coordination server),
the node key (its WireGuard identity) and the disco key (for path discovery), base64-encoded.
The folder is created 0700 and the file 0600, written atomically; a state file that others can
read is tightened and reported, since a leaked key lets anyone impersonate the node.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from embedmesh.errors import ConfigError
from embedmesh.wireguard.crypto import generate_private_key

logger = logging.getLogger("embedmesh.state")

KEYS_FILE = "keys.json"
_KEY_NAMES = ("machine_key", "node_key", "disco_key")


@dataclass(slots=True)
class NodeKeys:
    """The three private keys of a node (raw 32 bytes each). Never logged or shown in a repr."""

    machine_key: bytes = field(repr=False)
    node_key: bytes = field(repr=False)
    disco_key: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> NodeKeys:
        return cls(*(generate_private_key(os.urandom(32)) for _ in _KEY_NAMES))


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` 0700 (or tighten it) so files inside stay private."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning("state folder %s was accessible to others (mode %o); setting it to 0700", path, mode)
        path.chmod(0o700)


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600."""
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def load_or_create_keys(state_dir: str | os.PathLike[str]) -> tuple[NodeKeys, bool]:
    """Load the node's keys from ``state_dir``, creating them on first use.

    Returns the keys and whether they were created just now.
    """
    folder = Path(state_dir)
    ensure_private_dir(folder)
    path = folder / KEYS_FILE
    if not path.exists():
        keys = NodeKeys.generate()
        document = {name: base64.b64encode(getattr(keys, name)).decode() for name in _KEY_NAMES}
        write_private_file(path, json.dumps(document, indent=2).encode())
        return keys, True
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning("%s was readable by others (mode %o); setting it to 0600", path, mode)
        path.chmod(0o600)
    try:
        document = json.loads(path.read_text())
        raw = [base64.b64decode(document[name], validate=True) for name in _KEY_NAMES]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{path} is damaged ({exc.__class__.__name__}); restore it from a backup, or delete it "
            "to start over as a new node (the old one must then be deleted on the coordination server)"
        ) from None
    if any(len(key) != 32 for key in raw):
        raise ConfigError(f"{path} holds a key that is not 32 bytes; restore or delete the file")
    return NodeKeys(*raw), False


#: ``auth_key="file:PATH"`` (and ``--auth-key file:PATH``, as tailscale accepts) reads the key from
#: a file, so it appears neither in the process's command line (``/proc/PID/cmdline`` is readable
#: by every user) nor in its environment.
AUTH_KEY_FILE_PREFIX = "file:"


def resolve_auth_key(value: str) -> str:
    """The auth key ``value`` stands for: itself, or the contents of PATH for ``"file:PATH"``.

    Surrounding whitespace (a trailing newline) is dropped. A file that other users can read or
    write is used but reported with a warning, since whoever reads the key can join the tailnet.
    Raises :class:`~embedmesh.errors.ConfigError` for a file that cannot be read or is empty.
    """
    if not value.startswith(AUTH_KEY_FILE_PREFIX):
        return value
    path = Path(value[len(AUTH_KEY_FILE_PREFIX) :]).expanduser()
    try:
        mode = path.stat().st_mode
        key = path.read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"auth key file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read the auth key file {path}: {reason}") from None
    if not key:
        raise ConfigError(
            f"the auth key file {path} is empty: put the key from `embedmesh control authkey create` in it"
        )
    if stat.S_ISREG(mode) and mode & 0o077:
        logger.warning(
            "auth key file %s is accessible by other users (mode %s): chmod 600 %s",
            path,
            oct(mode & 0o777),
            path,
        )
    return key
