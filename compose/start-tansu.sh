#!/usr/bin/env bash
# Starts a tansu broker (in-memory storage) in the background on 127.0.0.1:$PORT and prints the
# line to export for the integration tests. Reuses a broker already listening on the port.
#
#   export "$(compose/start-tansu.sh)"     # progress goes to stderr, the variable to stdout
#   PORT=19092 compose/start-tansu.sh
#
# Log and pidfile: $TANSU_STATE_DIR (default ${TMPDIR:-/tmp}/tidings-tansu)/tansu-$PORT.{log,pid}.
# Stop it with compose/stop-tansu.sh (same PORT).
set -euo pipefail

PORT="${PORT:-9092}"
HOST=127.0.0.1
WAIT_SECS="${WAIT_SECS:-60}"
STATE_DIR="${TANSU_STATE_DIR:-${TMPDIR:-/tmp}/tidings-tansu}"
PIDFILE="$STATE_DIR/tansu-$PORT.pid"
LOG="$STATE_DIR/tansu-$PORT.log"
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"

port_open() {
    # bash's /dev/tcp: succeeds once something accepts connections on the port.
    (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null
}

alive() {
    [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null
}

announce() {
    echo "TIDINGS_TEST_BROKERS=$HOST:$PORT"
}

mkdir -p "$STATE_DIR"

if port_open; then
    pid="$(cat "$PIDFILE" 2>/dev/null || true)"
    if alive "$pid"; then
        echo "reusing tansu (pid $pid) already running on $HOST:$PORT; log: $LOG" >&2
    else
        echo "reusing the broker already listening on $HOST:$PORT (not started by this script)" >&2
    fi
    announce
    exit 0
fi

TANSU="$(command -v tansu 2>/dev/null || true)"
if [ -z "$TANSU" ] && [ -x "$CARGO_BIN/tansu" ]; then
    TANSU="$CARGO_BIN/tansu"
fi
if [ -z "$TANSU" ]; then
    echo "error: tansu not found on PATH or in $CARGO_BIN; run compose/install-tansu.sh" >&2
    exit 1
fi

# A stale pidfile from a broker that has since died.
rm -f "$PIDFILE"

# setsid detaches the broker from this shell's session so it outlives the caller's terminal.
launcher=()
if command -v setsid >/dev/null 2>&1; then
    launcher=(setsid)
fi
"${launcher[@]}" nohup "$TANSU" broker \
    --cluster-id tidings \
    --listener-url "tcp://$HOST:$PORT" \
    --advertised-listener-url "tcp://$HOST:$PORT" \
    --storage-engine memory://tansu/ \
    >"$LOG" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$PIDFILE"

deadline=$((SECONDS + WAIT_SECS))
until port_open; do
    if ! alive "$pid"; then
        echo "error: tansu exited before accepting connections on $HOST:$PORT; last log lines ($LOG):" >&2
        tail -n 40 "$LOG" >&2 || true
        rm -f "$PIDFILE"
        exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "error: tansu (pid $pid) did not accept connections on $HOST:$PORT within ${WAIT_SECS}s; last log lines ($LOG):" >&2
        tail -n 40 "$LOG" >&2 || true
        kill "$pid" 2>/dev/null || true
        rm -f "$PIDFILE"
        exit 1
    fi
    sleep 0.2
done

echo "tansu started (pid $pid) on $HOST:$PORT; log: $LOG" >&2
announce
