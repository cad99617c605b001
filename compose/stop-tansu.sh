#!/usr/bin/env bash
# Stops the tansu broker that compose/start-tansu.sh started on $PORT, using its pidfile.
# Brokers it did not start are left alone.
set -euo pipefail

PORT="${PORT:-9092}"
STATE_DIR="${TANSU_STATE_DIR:-${TMPDIR:-/tmp}/tidings-tansu}"
PIDFILE="$STATE_DIR/tansu-$PORT.pid"

pid="$(cat "$PIDFILE" 2>/dev/null || true)"
if [ -z "$pid" ]; then
    echo "no pidfile at $PIDFILE: no tansu started by start-tansu.sh on port $PORT" >&2
    exit 0
fi
if ! kill -0 "$pid" 2>/dev/null; then
    echo "tansu (pid $pid) is not running; removing stale $PIDFILE" >&2
    rm -f "$PIDFILE"
    exit 0
fi

kill -TERM "$pid"
for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
done
if kill -0 "$pid" 2>/dev/null; then
    echo "tansu (pid $pid) ignored SIGTERM for 10s; sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
fi
rm -f "$PIDFILE"
echo "stopped tansu (pid $pid) on port $PORT" >&2
