#!/usr/bin/env bash
# Stops the Apache Kafka node compose/start-kafka.sh started on $PORT (SIGTERM, SIGKILL after 20 s)
# and deletes its storage. Brokers the script did not start are left alone.
set -euo pipefail
PORT="${PORT:-9092}"
STATE_DIR="${KAFKA_STATE_DIR:-${TMPDIR:-/tmp}/tidings-kafka-$PORT}"
PIDFILE="$STATE_DIR/kafka.pid"

pid="$(cat "$PIDFILE" 2>/dev/null || true)"
if [ -z "$pid" ]; then
    echo "no pidfile at $PIDFILE: no Apache Kafka started by start-kafka.sh on port $PORT" >&2
    exit 0
fi
if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
        echo "Apache Kafka (pid $pid) ignored SIGTERM for 20 s; killing it." >&2
        kill -9 "$pid" 2>/dev/null || true
    fi
    echo "stopped Apache Kafka (pid $pid) on port $PORT" >&2
fi
rm -rf "$STATE_DIR"
