"""``import embedmesh`` gives exactly what docs/api.md documents, each with a docstring."""

from __future__ import annotations

import re
from pathlib import Path

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
