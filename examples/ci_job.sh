#!/usr/bin/env bash
# A CI job that joins the tailnet for as long as it runs and reaches a service there by name.
#
# Give the job an auth key as a secret, made once by an admin:
#     embedmesh control authkey create --reusable --ephemeral --preapproved --tags tag:ci
# Ephemeral: each job's node is deleted as soon as it leaves, so `nodes list` does not fill up
# with finished jobs. Preapproved: nobody has to approve a job. The key stays in the environment
# (EMBEDMESH_AUTH_KEY, which `embedmesh up` reads): on the command line it would show in `ps`.
#
# Environment:
#   EMBEDMESH_AUTH_KEY     the auth key (required)
#   EMBEDMESH_CONTROL_URL  the coordination server (required)
#   EMBEDMESH_HOSTNAME     this job's name in the tailnet (default: ci)
#   EMBEDMESH_LISTEN_HOST  bind the node's UDP socket to this address only (default: all)
#   SERVICE_URL            what to fetch (default: http://web/, a tailnet node called web)
#   SOCKS_PORT             the local port of the SOCKS5 proxy (default: 1080)
set -euo pipefail

: "${EMBEDMESH_AUTH_KEY:?set EMBEDMESH_AUTH_KEY to an ephemeral auth key (a CI secret)}"
: "${EMBEDMESH_CONTROL_URL:?set EMBEDMESH_CONTROL_URL to the coordination server}"
service_url=${SERVICE_URL:-http://web/}
socks=127.0.0.1:${SOCKS_PORT:-1080}
state=$(mktemp -d)  # a fresh identity per job; it holds the node's local API socket too

# The node runs as a background job for the rest of the script. Its SOCKS5 proxy resolves names
# in the tailnet, so ordinary tools reach peers by MagicDNS name without root or a TUN device.
embedmesh up --control-url "$EMBEDMESH_CONTROL_URL" --hostname "${EMBEDMESH_HOSTNAME:-ci}" \
  --ephemeral --state-dir "$state" --socks5 "$socks" \
  ${EMBEDMESH_LISTEN_HOST:+--listen-host "$EMBEDMESH_LISTEN_HOST"} &
node=$!

# However the job ends (success, a failed step under `set -e`, a cancelled pipeline), stop the
# node with SIGTERM: a background job ignores SIGINT, and SIGTERM is what CI runners send.
# `up` leaves cleanly on SIGTERM: the ephemeral node logs out and is gone from the tailnet at once.
leave() {
  kill -TERM "$node" 2>/dev/null || true
  wait "$node" || true
  rm -rf "$state"
}
trap leave EXIT

# Wait until the node is in the tailnet and its proxy listens: `status --wait` returns 0 then,
# or exits 1 with one line saying what the node still waits for (or that it stopped).
embedmesh status --wait --timeout 60 --state-dir "$state" >/dev/null

# The job's real work: anything that speaks SOCKS5 (curl, git, psql via a forward, ...).
curl --fail --silent --show-error --max-time 30 --socks5-hostname "$socks" "$service_url"
