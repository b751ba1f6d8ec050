"""Tailscale's wire protocols as sans-IO cores.

* :mod:`~embedmesh.tailscale.keys`: machine, node, disco and challenge keys, their text forms and
  0600 key files;
* :mod:`~embedmesh.tailscale.controlbase`: the ts2021 Noise IK transport (handshake, records, the
  early payload);
* :mod:`~embedmesh.tailscale.mapframe`: the framing and zstd compression of the ``/machine/map``
  stream;
* :mod:`~embedmesh.tailscale.disco`: disco packets and the one-socket demultiplexer.

Nothing here opens a socket, reads a clock or draws randomness it was not handed (the key-file
helpers in :mod:`~embedmesh.tailscale.keys` are the one place that touches the file system).
"""
