#!/usr/bin/env bash
# Starts nginx with the nchan module (compose/nchan/nginx.conf) on 127.0.0.1:$PORT for the gateway
# benchmark's comparison, installing the Debian packages once. Its prefix, pid file, logs and temp
# files live in $STATE_DIR, so the system nginx (if any) is not touched. Prints the variable to export:
#
#   export $(bash compose/start-nchan.sh)   # TIDINGS_BENCH_NCHAN_URL=http://127.0.0.1:18090
#
# Reuses an nginx this script already started on PORT. Stop it with compose/stop-nchan.sh.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PORT="${PORT:-18090}"
HOST=127.0.0.1
STATE_DIR="${NCHAN_STATE_DIR:-${TMPDIR:-/tmp}/tidings-nchan-$PORT}"
MODULE=/usr/lib/nginx/modules/ngx_nchan_module.so

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }
announce() { echo "TIDINGS_BENCH_NCHAN_URL=http://$HOST:$PORT"; }

if ! command -v nginx >/dev/null 2>&1 || [ ! -f "$MODULE" ]; then
    # Debian: nginx-light where it still exists, else nginx; the package's service is not started
    # where policy-rc.d forbids it (containers), and this script never uses it either way.
    pkg=nginx
    if apt-cache policy nginx-light 2>/dev/null | grep -q 'Candidate: [0-9]'; then pkg=nginx-light; fi
    echo "installing $pkg libnginx-mod-nchan ..." >&2
    sudo=()
    [ "$(id -u)" -ne 0 ] && sudo=(sudo)
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends "$pkg" libnginx-mod-nchan >&2
fi

pid="$(cat "$STATE_DIR/nginx.pid" 2>/dev/null || true)"
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && port_open "$PORT"; then
    echo "reusing nginx/nchan (pid $pid) on $HOST:$PORT" >&2
    announce
    exit 0
fi
if port_open "$PORT"; then
    echo "error: port $PORT is taken by a process this script did not start; pick another PORT" >&2
    exit 1
fi

rm -rf "$STATE_DIR"
mkdir -p "$STATE_DIR/tmp"
sed "s/127\.0\.0\.1:18090/$HOST:$PORT/" "$here/nchan/nginx.conf" >"$STATE_DIR/nginx.conf"
# -p: relative paths in the config (pid, logs, temp) are under STATE_DIR; -e: the log used before
# the config is read.
nginx -p "$STATE_DIR/" -e "$STATE_DIR/error.log" -c "$STATE_DIR/nginx.conf" -t >&2 2>"$STATE_DIR/test.log" ||
    { cat "$STATE_DIR/test.log" >&2; exit 1; }
nginx -p "$STATE_DIR/" -e "$STATE_DIR/error.log" -c "$STATE_DIR/nginx.conf"

for _ in $(seq 1 100); do
    port_open "$PORT" && [ -s "$STATE_DIR/nginx.pid" ] && break
    sleep 0.1
done
if ! port_open "$PORT"; then
    echo "error: nginx did not listen on $HOST:$PORT; log:" >&2
    tail -n 20 "$STATE_DIR/error.log" >&2 || true
    exit 1
fi
echo "nginx/nchan started (pid $(cat "$STATE_DIR/nginx.pid")) on $HOST:$PORT; logs in $STATE_DIR" >&2
announce
