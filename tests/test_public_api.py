"""``import embedmesh`` gives exactly what docs/api.md documents, each with a docstring."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import embedmesh

API_MD = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def documented_exports() -> set[str]:
    """The names in the first column of the table under "## What `import embedmesh` gives"."""
    text = API_MD.read_text(encoding="utf-8")
    section = text.split("## What `import embedmesh` gives", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        cell = line.split("|")[1].strip() if line.startswith("|") else ""
        names.update(re.findall(r"`embedmesh\.(\w+)`", cell))
    return names


def test_all_matches_the_api_reference() -> None:
    documented = documented_exports()
    assert documented, "docs/api.md lost its table of exports"
    assert sorted(embedmesh.__all__) == sorted(documented)
    # Anything the reference calls ``embedmesh.Something`` elsewhere must be importable as that too.
    mentioned = set(re.findall(r"`embedmesh\.([A-Z]\w*)`", API_MD.read_text(encoding="utf-8")))
    assert mentioned <= set(embedmesh.__all__)
    for name in embedmesh.__all__:
        assert hasattr(embedmesh, name), name


def test_no_internals_at_the_top_level() -> None:
    """Public names of the package are its exports and its submodules, nothing imported by the way."""
    import types

    public = {n for n in vars(embedmesh) if not n.startswith("_")}
    modules = {n for n in public if isinstance(getattr(embedmesh, n), types.ModuleType)}
    assert public - modules == set(embedmesh.__all__)


def test_every_export_has_its_own_docstring() -> None:
    for name in embedmesh.__all__:
        obj = getattr(embedmesh, name)
        doc = vars(obj).get("__doc__") if isinstance(obj, type) else obj.__doc__
        # A dataclass without a docstring gets its signature as one: that does not count.
        assert doc and doc.strip() and not doc.startswith(f"{name}("), f"{name} has no docstring"


def _leaf_commands(group: Any, prefix: str) -> set[str]:
    import click

    found: set[str] = set()
    for name, command in group.commands.items():
        path = f"{prefix} {name}"
        found |= _leaf_commands(command, path) if isinstance(command, click.Group) else {path}
    return found


def test_control_md_lists_every_control_command() -> None:
    """docs/control.md's command summary is the CLI's: a new command (``control dns``) cannot
    go undocumented, nor a removed one stay."""
    from embedmesh.cli.control import control

    text = (API_MD.parent / "control.md").read_text(encoding="utf-8")
    block = text.split("## Running a server", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    documented: set[str] = set()
    for line in block.splitlines():
        words = line.split()
        if words[:2] != ["embedmesh", "control"]:
            continue
        group = words[2]
        if len(words) > 3 and not words[3].startswith(("-", "[")) and words[3].islower():
            documented |= {f"control {group} {sub}" for sub in words[3].split("|")}
        else:
            documented.add(f"control {group}")
    assert documented == _leaf_commands(control, "control")
    # MagicDNS answers have been served for a while: not on the "Not yet" list any more.
    not_yet = text.split("## Not yet", 1)[1]
    assert "MagicDNS" not in not_yet
