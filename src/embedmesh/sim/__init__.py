"""Simulation: virtual time, simulated underlay networks and nodes, for deterministic tests."""
