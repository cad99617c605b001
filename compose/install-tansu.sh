#!/usr/bin/env bash
# Installs tansu, a Kafka-compatible broker in a single binary, used for local runs and the
# integration tests. Idempotent: does nothing when a working `tansu` is already installed.
#
#   compose/install-tansu.sh            # install if missing (a fresh build takes ~8-25 min)
#   TANSU_VERSION=0.6.0 compose/install-tansu.sh
set -euo pipefail

TANSU_VERSION="${TANSU_VERSION:-0.6.0}"
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"

# Prints the path of a tansu binary that runs, or nothing.
working_tansu() {
    local candidate
    for candidate in "$(command -v tansu 2>/dev/null || true)" "$CARGO_BIN/tansu"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" --version >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    return 0
}

existing="$(working_tansu)"
if [ -n "$existing" ]; then
    echo "tansu already installed: $existing ($("$existing" --version))"
    exit 0
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo is not on PATH; install Rust from https://rustup.rs first" >&2
    exit 1
fi

# dynostore and postgres are tansu's storage engines besides memory://.
echo "installing tansu $TANSU_VERSION with cargo (this compiles from source and takes a while)..."
cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,postgres

installed="$(working_tansu)"
if [ -z "$installed" ]; then
    echo "error: cargo install finished but no working tansu found on PATH or in $CARGO_BIN" >&2
    exit 1
fi
echo "installed: $installed ($("$installed" --version))"
