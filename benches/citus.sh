#!/usr/bin/env bash
# make bench-citus: pg_store against COPY into the same Citus distributed table, in one
# run, on a Citus 13 cluster this script starts (a coordinator and two workers on
# 127.0.0.1, each shared_buffers 512MB, max_wal_size 4GB; pg_store on the coordinator
# with store.memory_limit 256MB, store.cpu_limit 2). About 20 minutes here.
# Between contenders the table just loaded is vacuumed and analyzed and every node
# checkpointed, untimed (settle, below).
#
#   benches/citus.sh        RUNS (default 3): rounds; FILES x SIZE (default 8 x 128M);
#                           INSERT_WORKERS: store.insert_workers (default: the server's);
#                           BATCH_TARGET_MS: store.batch_target_ms (default: the server's)
#
# Data: store-gen --files FILES --size SIZE --dup 0.3 --seed 21. The COPY side gets the
# distinct lines sorted beforehand (LC_ALL=C sort -u, not timed): COPY alone against
# pg_store's whole job (scan, sort, dedup, insert). Tables: (line text PRIMARY KEY)
# distributed by line, 32 shards; and pg_store with a key column, (line text, key bytea
# PRIMARY KEY) distributed by key. Each round truncates the tables, then times COPY,
# pg_store, pg_store with a key column, one after the other. Medians at the end, with
# where pg_store's time went and the batch sizes it reached.
set -euo pipefail
shopt -s inherit_errexit   # a failure inside $(...) stops the run too (a COPY that ran out of disk did not)
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}; FILES=${FILES:-8}; SIZE=${SIZE:-128M}; BASE=${BENCH_PORT:-5452}
# The server's store.insert_workers unless told; at its default, a coordinator sharing its
# host with worker nodes shares the cores with them (here: one inserter).
INSERT_WORKERS=${INSERT_WORKERS:-}
BIN=/usr/lib/postgresql/15/bin
[ -f "$($BIN/pg_config --pkglibdir)/citus.so" ] || { echo "Citus is not installed (../shared/tools/install-citus.sh builds it)"; exit 1; }
W=$PWD/target/bench/citus; TMP=$W/tmp; DATA=$PWD/target/bench/citus-data-$FILES-$SIZE
mkdir -p "$W" "$TMP"; chmod 755 "$PWD/target" "$PWD/target/bench" "$W"; chown postgres "$W" "$TMP"
cargo build --release --quiet -p store-cli --bin store-gen
[ -f "$DATA/.done" ] || { rm -rf "$DATA"; target/release/store-gen "$DATA" --files "$FILES" --size "$SIZE" --dup 0.3 --seed 21 >/dev/null; touch "$DATA/.done"; }
chmod -R a+rX "$DATA"
DISTINCT=$W/distinct-$FILES-$SIZE.txt
[ -f "$DISTINCT" ] || LC_ALL=C sort -u -S 256M -T "$TMP" "$DATA"/part-* > "$DISTINCT"
chmod a+r "$DISTINCT"

NODES=(coord w1 w2)
port() { case $1 in coord) echo "$BASE";; w1) echo $((BASE + 1));; w2) echo $((BASE + 2));; esac; }
for n in "${NODES[@]}"; do
  d=$W/$n
  if [ ! -f "$d/PG_VERSION" ]; then
    mkdir -p "$d"; chown postgres "$d"
    runuser -u postgres -- "$BIN/initdb" -D "$d" -A trust -E UTF8 --locale=C.UTF-8 -U postgres >/dev/null
    cat >> "$d/postgresql.conf" <<CONF
port = $(port "$n")
unix_socket_directories = '$W'
listen_addresses = '127.0.0.1'
shared_buffers = 512MB
max_wal_size = 4GB
max_connections = 200
max_prepared_transactions = 100
shared_preload_libraries = 'citus,pg_store'
citus.node_conninfo = 'sslmode=disable'
store.memory_limit = '256MB'
store.cpu_limit = 2
store.temp_dir = '$TMP'
CONF
  fi
  runuser -u postgres -- "$BIN/pg_ctl" -D "$d" -m fast stop >/dev/null 2>&1 || true
  runuser -u postgres -- "$BIN/pg_ctl" -D "$d" -l "$W/$n.log" -w start >/dev/null
done
trap 'for n in "${NODES[@]}"; do runuser -u postgres -- "$BIN/pg_ctl" -D "$W/$n" -m fast stop >/dev/null 2>&1 || true; done' EXIT
sql() { "$BIN/psql" -XAtq -v ON_ERROR_STOP=1 -h "$W" -p "$(port "${NODE:-coord}")" -U postgres -d postgres -c "$1"; }
for n in "${NODES[@]}"; do NODE=$n sql "CREATE EXTENSION IF NOT EXISTS citus" >/dev/null; done
if [ "$(sql "SELECT count(*) FROM pg_dist_node")" = 0 ]; then
  sql "SELECT citus_set_coordinator_host('127.0.0.1', $(port coord))" >/dev/null
  sql "SELECT citus_add_node('127.0.0.1', $(port w1))" >/dev/null
  sql "SELECT citus_add_node('127.0.0.1', $(port w2))" >/dev/null
fi
sql "DROP EXTENSION IF EXISTS pg_store CASCADE" 2>/dev/null; sql "CREATE EXTENSION pg_store"
# INSERT_WORKERS=n: store.insert_workers for pg_store's jobs (empty: the server's).
if [ -n "${INSERT_WORKERS:-}" ]; then sql "ALTER SYSTEM SET store.insert_workers = $INSERT_WORKERS"; else sql "ALTER SYSTEM RESET store.insert_workers"; fi
# BATCH_TARGET_MS=n: store.batch_target_ms (default: the server's).
if [ -n "${BATCH_TARGET_MS:-}" ]; then sql "ALTER SYSTEM SET store.batch_target_ms = $BATCH_TARGET_MS"; else sql "ALTER SYSTEM RESET store.batch_target_ms"; fi
sql "SELECT pg_reload_conf()" >/dev/null; sleep 1
sql "DROP TABLE IF EXISTS c, p, k"
sql "CREATE TABLE c (line text PRIMARY KEY); SELECT create_distributed_table('c', 'line')" >/dev/null
sql "CREATE TABLE p (line text PRIMARY KEY); SELECT create_distributed_table('p', 'line')" >/dev/null
sql "CREATE TABLE k (line text NOT NULL, key bytea PRIMARY KEY); SELECT create_distributed_table('k', 'key')" >/dev/null

now() { date +%s.%N; }
# Between contenders, untimed: vacuum and analyze the table just loaded ($1, if any), as
# autovacuum would soon after, and checkpoint every node, so that no contender's timing
# holds the one before's aftermath. A CHECKPOINT on the coordinator alone (as this script
# did until 2026-12-05) leaves the worker nodes' dirty pages and their autovacuum to the
# next contender: pg_store then took 33.0-36.3 s against 29.9-30.1 s after a CHECKPOINT on
# every node, in alternating runs by hand. pg_store's own autovacuums during its load (it
# commits batch by batch, COPY once) stay in its time.
settle() {
  [ -z "${1:-}" ] || sql "VACUUM (ANALYZE) $1"
  for n in "${NODES[@]}"; do NODE=$n sql "CHECKPOINT"; done
}
fingerprint() { sql "SELECT count(*) || ':' || coalesce(sum(hashtextextended(line, 7)), 0) FROM $1"; }
copy_c() {
  "$BIN/psql" -XAtq -v ON_ERROR_STOP=1 -h "$W" -p "$(port coord)" -U postgres -d postgres \
    -c "\copy c FROM '$DISTINCT' (FORMAT csv, DELIMITER E'\x1f', QUOTE E'\x01')"
}
# pg_store into table $1 (extra store_ingest arguments $2); prints
# "sort_s insert_s batches avg_rows_per_batch last_batch_rows memory_MiB ranges".
pg_store() {
  local job state
  job=$(sql "SELECT store_ingest('$DATA', '$1'$2)")
  until state=$(sql "SELECT state FROM store.jobs WHERE id = $job"); [ "$state" = done ] || [ "$state" = failed ] || [ "$state" = cancelled ]; do sleep 0.2; done
  [ "$state" = done ] || { sql "SELECT error FROM store.jobs WHERE id = $job" >&2; exit 1; }
  sql "SELECT round(extract(epoch FROM j.insert_started_at - j.started_at), 1) || ' ' ||
              round(extract(epoch FROM j.finished_at - j.insert_started_at), 1) || ' ' ||
              (SELECT sum(batches) FROM store.checkpoints WHERE job = j.id) || ' ' ||
              (SELECT (sum(inserted + already_present) / greatest(sum(batches), 1))::bigint FROM store.checkpoints WHERE job = j.id) || ' ' ||
              (SELECT max(batch_size) FROM store.checkpoints WHERE job = j.id) || ' ' ||
              (s.memory_peak / 1048576)::int || ' ' || j.ranges
       FROM store.jobs j JOIN store.status s USING (id) WHERE j.id = $job"
}
declare -a TC TP TK; DETAIL_P=() DETAIL_K=()
ROWS=$(wc -l < "$DISTINCT")
echo "# $(date -u +%F) $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM, Citus $(sql "SELECT extversion FROM pg_extension WHERE extname = 'citus'"), 1 coordinator + 2 workers on this machine"
echo "# data: $DATA ($(du -sh "$DATA" | cut -f1), $(cat "$DATA"/part-* | wc -l) records, $ROWS distinct); insert workers: $(sql "SHOW store.insert_workers"), batch target: $(sql "SHOW store.batch_target_ms") ms"
for r in $(seq "$RUNS"); do
  sql "TRUNCATE c, p, k; DELETE FROM store.ingested" >/dev/null; settle
  t0=$(now); copy_c; t1=$(now); TC+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')")
  settle c
  t0=$(now); d=$(pg_store p ""); t1=$(now); TP+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')"); DETAIL_P+=("$d")
  sql "DELETE FROM store.ingested" >/dev/null; settle p
  t0=$(now); d=$(pg_store k ", key_column => 'key'"); t1=$(now); TK+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')"); DETAIL_K+=("$d")
  fc=$(fingerprint c); fp=$(fingerprint p); fk=$(fingerprint k)
  [ "$fc" = "$fp" ] && [ "$fc" = "$fk" ] || { echo "TABLES DIFFER: COPY $fc, pg_store $fp, key column $fk"; exit 1; }
  [ "${fc%%:*}" = "$ROWS" ] || { echo "COPY loaded ${fc%%:*} rows of $ROWS"; exit 1; }
  echo "  round $r: COPY ${TC[-1]} s, pg_store ${TP[-1]} s (sort, insert, batches, rows/batch, last batch, MiB, ranges: ${DETAIL_P[-1]}), key column ${TK[-1]} s (${DETAIL_K[-1]}); tables equal"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
mc=$(median "${TC[@]}"); mp=$(median "${TP[@]}"); mk=$(median "${TK[@]}")
col() { local i=$1; shift; printf '%s\n' "$@" | awk -v i="$i" '{print $i}'; }
printf '\n%-44s %8s %10s %10s\n' "median of $RUNS rounds, $ROWS distinct lines" wall_s rows/s vs_COPY
printf '%-44s %8.1f %10.0f %10s\n' "COPY of the distinct lines into (line PK)" "$mc" "$(awk -v r="$ROWS" -v t="$mc" 'BEGIN{print r/t}')" 1.00
printf '%-44s %8.1f %10.0f %10.2f\n' "pg_store, whole job, into (line PK)" "$mp" "$(awk -v r="$ROWS" -v t="$mp" 'BEGIN{print r/t}')" "$(awk -v a="$mc" -v b="$mp" 'BEGIN{print a/b}')"
printf '%-44s %8.1f %10.0f %10.2f\n' "pg_store, whole job, key column (key PK)" "$mk" "$(awk -v r="$ROWS" -v t="$mk" 'BEGIN{print r/t}')" "$(awk -v a="$mc" -v b="$mk" 'BEGIN{print a/b}')"
echo
echo "pg_store into (line PK), medians: scan+sort $(median $(col 1 "${DETAIL_P[@]}")) s, insert $(median $(col 2 "${DETAIL_P[@]}")) s," \
  "$(median $(col 3 "${DETAIL_P[@]}")) batches of $(median $(col 4 "${DETAIL_P[@]}")) rows on average (largest last batch $(median $(col 5 "${DETAIL_P[@]}"))), memory $(median $(col 6 "${DETAIL_P[@]}")) MiB, insert ranges $(median $(col 7 "${DETAIL_P[@]}"))"
echo "pg_store key column, medians: scan+sort $(median $(col 1 "${DETAIL_K[@]}")) s, insert $(median $(col 2 "${DETAIL_K[@]}")) s," \
  "$(median $(col 3 "${DETAIL_K[@]}")) batches of $(median $(col 4 "${DETAIL_K[@]}")) rows on average, memory $(median $(col 6 "${DETAIL_K[@]}")) MiB"
awk -v a="$mc" -v b="$mp" 'BEGIN{r=a/b; printf "%s pg_store / COPY speed: %.2f (goal >= 0.8)\n", (r >= 0.8 ? "MET    " : "NOT MET"), r}'
