"""Pending interactive logins (control/logins.py): ids the admin CLI can always take."""

from __future__ import annotations

import os

from embedmesh.control.logins import PendingLogins
from embedmesh.control.messages import RegisterRequest


def test_login_ids_never_look_like_command_line_options() -> None:
    logins = PendingLogins(max_pending=1000)
    request = RegisterRequest(os.urandom(32), os.urandom(32), "laptop", auth_key=None)
    ids = [logins.start(os.urandom(32), request, 0.0, None).id for _ in range(500)]
    # `embedmesh control auth register ID` must parse every id as the argument, not an option.
    assert not [i for i in ids if i.startswith("-")]
    assert len(set(ids)) == len(ids) and all(len(i) == 32 for i in ids)
