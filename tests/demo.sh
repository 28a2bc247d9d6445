#!/usr/bin/env bash
# make demo: a local PostgreSQL 15 cluster with pg_store preloaded, a generated drop
# directory, one ingest watched to the end, and store.status.
#   tests/demo.sh DIR         start (or reuse) the cluster in DIR and ingest DIR/drop
#   tests/demo.sh DIR stop    stop it
set -euo pipefail
DIR=${1:-/tmp/pg_store_demo}; PORT=${DEMO_PORT:-5440}; BIN=/usr/lib/postgresql/15/bin
cd "$(dirname "$0")/.."
PSQL=("$BIN/psql" -X -h "$DIR" -p "$PORT" -U postgres -d postgres)

if [ "${2:-}" = stop ]; then
  runuser -u postgres -- "$BIN/pg_ctl" -D "$DIR/data" -m fast stop; exit
fi

mkdir -p "$DIR"; chmod 755 "$DIR"; chown postgres "$DIR"
if [ ! -f "$DIR/data/PG_VERSION" ]; then
  runuser -u postgres -- "$BIN/initdb" -D "$DIR/data" -A trust -E UTF8 --locale=C.UTF-8 -U postgres >/dev/null
  cat >> "$DIR/data/postgresql.conf" <<CONF
port = $PORT
unix_socket_directories = '$DIR'
listen_addresses = ''
shared_preload_libraries = 'pg_store,pg_cron'
cron.database_name = 'postgres'
cron.host = '$DIR'
store.memory_limit = '256MB'
CONF
fi
if ! runuser -u postgres -- "$BIN/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; then
  runuser -u postgres -- "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/log" -w start >/dev/null
fi

if [ ! -d "$DIR/drop" ]; then
  cargo build --release --quiet -p store-cli --bin store-gen
  target/release/store-gen "$DIR/drop" --files 4 --size 16M --nasty --seed 42 >/dev/null
  chmod -R a+rX "$DIR/drop"
fi

echo "== cluster: ${PSQL[*]}"
echo "== drop directory: $DIR/drop ($(du -sh "$DIR/drop" | cut -f1))"
"${PSQL[@]}" -q -c "CREATE EXTENSION IF NOT EXISTS pg_store"
"${PSQL[@]}" -v ON_ERROR_STOP=1 <<SQL
SELECT store_ingest('$DIR/drop') AS job \gset
\echo == store_wait(:job)
SELECT id, state, files_done, records, rejected, duplicates, inserted, already_present, rows_per_second FROM store_wait(:job);
\echo == store.status
\x on
SELECT * FROM store.status ORDER BY id DESC LIMIT 1;
\x off
\echo == a few rejects
SELECT file, line, reason, left(encode(raw, 'escape'), 40) AS raw FROM store.rejects WHERE job = :job ORDER BY file, line LIMIT 5;
SQL
echo "== done. Connect with: ${PSQL[*]}   Stop with: make demo-stop"
