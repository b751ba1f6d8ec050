"""Public surface of embedmesh."""
