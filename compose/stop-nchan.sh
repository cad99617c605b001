#!/usr/bin/env bash
# Stops the nginx/nchan compose/start-nchan.sh started on $PORT and deletes its state directory.
# Any other nginx is left alone.
set -euo pipefail
PORT="${PORT:-18090}"
STATE_DIR="${NCHAN_STATE_DIR:-${TMPDIR:-/tmp}/tidings-nchan-$PORT}"

pid="$(cat "$STATE_DIR/nginx.pid" 2>/dev/null || true)"
if [ -z "$pid" ]; then
    echo "no pid file at $STATE_DIR/nginx.pid: no nginx started by start-nchan.sh on port $PORT" >&2
    exit 0
fi
if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" # fast shutdown: subscribers are dropped
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    echo "stopped nginx/nchan (pid $pid) on port $PORT" >&2
fi
rm -rf "$STATE_DIR"
