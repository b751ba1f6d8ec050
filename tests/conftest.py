"""Top-level pytest configuration: deliberately empty.

Markers live in pyproject.toml; the interop suite's fixtures live in tests/interop/conftest.py.
See docs/testing.md.
"""
