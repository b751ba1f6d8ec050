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


def test_a_completed_login_answers_the_devices_followup_until_it_expires() -> None:
    logins = PendingLogins(lifetime=600.0)
    request = RegisterRequest(os.urandom(32), os.urandom(32), "laptop", auth_key=None)
    login = logins.start(b"m" * 32, request, 0.0, None)
    logins.finish(login, 7)
    # The admin acted before the device's Followup arrived: the Followup still finds the login...
    followed = logins.follow(f"http://control/register/{login.id}", 1.0)
    assert followed is login and followed.node_id == 7 and followed.done.is_set()
    # ...but it is no longer waiting for an admin, and expires with its lifetime.
    assert logins.waiting(1.0) == [] and len(logins) == 0
    assert logins.follow(login.id, 601.0) is None
