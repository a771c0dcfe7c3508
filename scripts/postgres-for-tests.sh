#!/usr/bin/env bash
# Installs (Debian package) and starts a local PostgreSQL for the cloud's tests, creates a role that may
# create databases, and prints the URL to export as TAPSHARE_TEST_POSTGRES_URL. Needs root.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
cd /                      # the postgres user may not enter the checkout's folder (e.g. under /root)
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  apt-get install -y -qq postgresql >/dev/null
fi
ver=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)
if ! pg_lsclusters -h | grep -q "^$ver main"; then
  pg_createcluster "$ver" main >&2
fi
pg_ctlcluster "$ver" main start >&2 2>/dev/null || true
for _ in $(seq 1 30); do
  su postgres -c "psql -qAtc 'select 1'" >/dev/null 2>&1 && break
  sleep 1
done
su postgres -c "psql -qAtc \"select 1 from pg_roles where rolname='tapshare_test'\"" | grep -q 1 ||
  su postgres -c "psql -qc \"create role tapshare_test login createdb password 'tapshare_test'\"" >/dev/null
# room for a fleet on one server: three cloud instances' pools (30 each), their listeners, the tests' and the
# benchmark's own connections (the default 100 runs out under bench_cloud --instances 3)
if (( $(su postgres -c "psql -qAtc 'show max_connections'") < 300 )); then
  su postgres -c "psql -qc 'alter system set max_connections = 300'" >/dev/null
  pg_ctlcluster "$ver" main restart >&2
  for _ in $(seq 1 30); do
    su postgres -c "psql -qAtc 'select 1'" >/dev/null 2>&1 && break
    sleep 1
  done
fi
# a test's database is dropped WITH (FORCE): the role may end the connections a test server left behind
su postgres -c "psql -qc 'grant pg_signal_backend to tapshare_test'" >/dev/null
port=$(pg_lsclusters -h | awk -v v="$ver" '$1 == v && $2 == "main" {print $3}')
echo "postgresql+psycopg://tapshare_test:tapshare_test@127.0.0.1:${port}/postgres"
