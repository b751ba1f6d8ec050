"""Shared driver for the atheris fuzz targets in this folder.

Every target is a module ``fuzz/fuzz_<name>.py`` with a ``TestOneInput(data: bytes)`` function and a
seed corpus in ``fuzz/corpus/<name>/``. Run one by itself::

    python fuzz/fuzz_wireguard_messages.py -runs=100000 fuzz/corpus/wireguard_messages

The test suite (``tests/test_fuzz_targets.py``) imports every target and runs it on its corpus plus a
few thousand mutated inputs, without atheris, so CI exercises each target on every run.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

CORPUS_ROOT = Path(__file__).resolve().parent / "corpus"


def run(test_one_input: Callable[[bytes], None]) -> None:
    """Hand the target to atheris with the command line's libFuzzer flags."""
    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
