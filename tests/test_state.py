from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from embedmesh.errors import ConfigError
from embedmesh.state import KEYS_FILE, load_or_create_keys


def test_keys_are_created_private_and_reloaded(tmp_path: Path) -> None:
    state = tmp_path / "state"
    keys, created = load_or_create_keys(state)
    assert created
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / KEYS_FILE).stat().st_mode) == 0o600
    again, created_again = load_or_create_keys(state)
    assert not created_again
    assert again == keys
    assert len({keys.machine_key, keys.node_key, keys.disco_key}) == 3
    assert keys.node_key.hex() not in repr(keys)


def test_too_open_files_are_tightened(tmp_path: Path) -> None:
    load_or_create_keys(tmp_path)
    os.chmod(tmp_path / KEYS_FILE, 0o644)
    os.chmod(tmp_path, 0o755)
    load_or_create_keys(tmp_path)
    assert stat.S_IMODE((tmp_path / KEYS_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700


def test_damaged_state_says_what_to_do(tmp_path: Path) -> None:
    load_or_create_keys(tmp_path)
    (tmp_path / KEYS_FILE).write_text(json.dumps({"machine_key": "!!"}))
    with pytest.raises(ConfigError, match="delete it"):
        load_or_create_keys(tmp_path)
