#!/usr/bin/env bash
# Installs PostgreSQL from Debian if it is missing, lets local test clients in without a password
# on 127.0.0.1 (trust, for this development/CI machine only), starts the cluster and waits for it.
# Prints the admin URL the tests use:  export $(bash compose/start-postgres.sh)
#   TIDINGS_TEST_PG=postgres://postgres@127.0.0.1:5432/postgres
set -euo pipefail

if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
    echo "PostgreSQL is not installed; installing it from Debian." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2 || true
    apt-get install -y -q postgresql >&2
fi
version="$(ls /etc/postgresql | sort -V | tail -n 1)"
hba="/etc/postgresql/$version/main/pg_hba.conf"

# Trust loopback TCP (tests connect as postgres@127.0.0.1 with no password). Idempotent: the marker
# line is written once, ahead of Debian's scram-sha-256 rules so it wins.
if ! grep -q "tidings-test-trust" "$hba"; then
    echo "Letting 127.0.0.1 connect without a password (trust) in $hba." >&2
    tmp="$(mktemp)"
    {
        echo "# tidings-test-trust: loopback clients of the test suite (compose/start-postgres.sh)"
        echo "host    all             all             127.0.0.1/32            trust"
        echo "host    all             all             ::1/128                 trust"
        cat "$hba"
    } >"$tmp"
    cat "$tmp" >"$hba"
    rm -f "$tmp"
    if pg_isready -q -h 127.0.0.1 -p 5432; then
        pg_ctlcluster --skip-systemctl-redirect "$version" main reload >&2
    fi
fi

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    echo "Starting PostgreSQL $version." >&2
    pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2
    for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.5; done
fi
pg_isready -h 127.0.0.1 -p 5432 >&2
echo "TIDINGS_TEST_PG=postgres://postgres@127.0.0.1:5432/postgres"
