"""Runs every fuzz target briefly: its whole seed corpus, then deterministic mutations of it.

A target fails the suite if it raises anything at all: the targets themselves decide which errors are
expected (only embedmesh's ParseError from a parser) and re-raise everything else.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

FUZZ_DIR = Path(__file__).resolve().parent.parent / "fuzz"
TARGETS = sorted(p for p in FUZZ_DIR.glob("fuzz_*.py"))
MUTATIONS_PER_TARGET = 3000


def _load(path: Path):  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(FUZZ_DIR))
    try:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(FUZZ_DIR))


def _mutate(rng: random.Random, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(5)
        if op == 0 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif op == 1 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 2 and data:
            del data[rng.randrange(len(data)) :]
        elif op == 3:
            pos = rng.randrange(len(data) + 1)
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 4 and len(data) > 2:
            i, j = sorted(rng.sample(range(len(data)), 2))
            data[i:j] = data[i:j][::-1]
    return bytes(data)


@pytest.mark.fuzz
@pytest.mark.parametrize("path", TARGETS, ids=[p.stem for p in TARGETS])
def test_fuzz_target_on_corpus(path: Path) -> None:
    module = _load(path)
    name = path.stem.removeprefix("fuzz_")
    corpus_dir = FUZZ_DIR / "corpus" / name
    seeds = [f.read_bytes() for f in sorted(corpus_dir.glob("*"))] if corpus_dir.is_dir() else []
    assert seeds, f"fuzz target {path.name} has no seed corpus in {corpus_dir}"
    for seed in seeds:
        module.TestOneInput(seed)
    rng = random.Random(name)
    for _ in range(MUTATIONS_PER_TARGET):
        module.TestOneInput(_mutate(rng, rng.choice(seeds)))
