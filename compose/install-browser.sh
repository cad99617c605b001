#!/usr/bin/env bash
# Installs what the browser test (tidings/tests/browser_eventsource.rs) needs: Debian's
# chromium (headless) and the pinned playwright-core from tidings/tests/browser/package-lock.json.
# Idempotent and quick once both are there:  bash compose/install-browser.sh
# playwright-core downloads no browser of its own; the test points it at /usr/bin/chromium.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
project="$here/../tidings/tests/browser"

if [ ! -x /usr/bin/chromium ]; then
    echo "chromium is not installed; installing it from Debian." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2 || true
    apt-get install -y -q chromium >&2
fi

# `npm ci` only when node_modules does not hold exactly what the lockfile pins.
if ! cmp -s "$project/package-lock.json" "$project/node_modules/.package-lock.json.installed" 2>/dev/null; then
    echo "Installing the browser test's node packages (npm ci in $project)." >&2
    (cd "$project" && npm ci --ignore-scripts --no-audit --no-fund >&2)
    cp "$project/package-lock.json" "$project/node_modules/.package-lock.json.installed"
fi
