"""Gateways between the host's own network and the mesh, for programs that are not Python:
a SOCKS5 proxy into the mesh, local port forwards to peers, and mesh ports served by local services."""
