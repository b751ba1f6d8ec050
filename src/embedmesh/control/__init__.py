"""The control plane: the coordination server, its protocol and the node's client.

See docs/control.md.
"""
