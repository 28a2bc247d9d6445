#!/usr/bin/env bash
# make bench: pg_store against the shell pipeline and COPY + INSERT ... ON CONFLICT, in
# one run, on one local PostgreSQL 15 cluster with the same settings for everyone.
#
#   benches/pg.sh [DATA_DIR]   (default: 1 GiB from store-gen --files 8 --size 128M --dup 0.3 --seed 7)
#   RUNS (default 3): runs of pg_store and A, median printed; B_RUNS (default 1): B takes
#   minutes a run. One unmeasured warm-up load first, so that no contender pays for the
#   cluster's first WAL segments and file growth. About 13 minutes in all here.
#
# Contenders, scenario "empty" (target starts empty):
#   pg_store  SELECT store_ingest(DIR), waited for (memory: the worker's VmHWM)
#   A         LC_ALL=C sort -u -S 256M --parallel=2 | psql \copy (memory: sort's peak RSS)
#   B         COPY into an unlogged staging table, INSERT ... ON CONFLICT DO NOTHING
# Scenario "incremental": the target already holds the distinct lines of the first half of
# the files; pg_store and B load all of them (A cannot: COPY fails on conflicts).
# Every target has the same unique key, store.line_key(line); index_MiB is its size after
# the last run. Exits non-zero if the contenders' tables differ (count and an
# order-independent hash of the lines).
set -euo pipefail
shopt -s inherit_errexit   # a failure inside $(...) stops the run too (a COPY that ran out of disk did not)
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}; B_RUNS=${B_RUNS:-1}; PORT=${BENCH_PORT:-5441}; BIN=/usr/lib/postgresql/15/bin
W=$PWD/target/bench/pg; CL=$W/cluster; TMP=$W/tmp
mkdir -p "$W" "$TMP/pg_store"; chmod 755 "$W" "$TMP" "$PWD/target/bench" "$PWD/target" 2>/dev/null || true
chown postgres "$TMP/pg_store"   # the server writes pg_store's runs there
cargo build --release --quiet -p store-cli --bin store-dedup --bin store-gen
DATA=${1:-}
if [ -z "$DATA" ]; then
  DATA=$PWD/target/bench/engine-128M
  [ -f "$DATA/.done" ] || { rm -rf "$DATA"; target/release/store-gen "$DATA" --files 8 --size 128M --dup 0.3 --seed 7 >/dev/null; touch "$DATA/.done"; }
fi
DATA=$(readlink -f "$DATA"); chmod -R a+rX "$DATA"
FILES=$(find "$DATA" -type f ! -name '.*' | sort)
HALF=$W/half; rm -rf "$HALF"; mkdir -p "$HALF"
for f in $(echo "$FILES" | head -n $(( $(echo "$FILES" | wc -l) / 2 ))); do ln -s "$f" "$HALF/"; done

# The cluster: defaults except shared_buffers and max_wal_size, and pg_store's budget.
if [ ! -f "$CL/PG_VERSION" ]; then
  mkdir -p "$CL"; chown postgres "$W" "$CL"
  runuser -u postgres -- "$BIN/initdb" -D "$CL" -A trust -E UTF8 --locale=C.UTF-8 -U postgres >/dev/null
  cat >> "$CL/postgresql.conf" <<CONF
port = $PORT
unix_socket_directories = '$W'
listen_addresses = ''
shared_buffers = 1GB
max_wal_size = 4GB
shared_preload_libraries = 'pg_store'
store.memory_limit = '256MB'
store.cpu_limit = 2
store.temp_dir = '$TMP/pg_store'
CONF
fi
runuser -u postgres -- "$BIN/pg_ctl" -D "$CL" status >/dev/null 2>&1 || runuser -u postgres -- "$BIN/pg_ctl" -D "$CL" -l "$W/log" -w start >/dev/null
# Stopped at the end, whatever happens: a server left running with pg_store loaded would
# die when a later `make test-pg` copies its debug library in place.
trap 'runuser -u postgres -- "$BIN/pg_ctl" -D "$CL" -m fast stop >/dev/null 2>&1 || true' EXIT
PSQL=("$BIN/psql" -XAtq -v ON_ERROR_STOP=1 -h "$W" -p "$PORT" -U postgres -d postgres)
sql() { "${PSQL[@]}" -c "$1"; }
sql "CREATE EXTENSION IF NOT EXISTS pg_store"
now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
fresh_table() { sql "DROP TABLE IF EXISTS $1; CREATE TABLE $1 (line text NOT NULL); CREATE UNIQUE INDEX ON $1 (store.line_key(line))"; }
fingerprint() { sql "SELECT count(*) || ':' || coalesce(sum(hashtextextended(line, 7)), 0) FROM $1"; }
du_peak() { # sample the size of a directory every 0.2 s until the file $2 exists; print the peak in MiB
  local peak=0 s; while [ ! -e "$2" ]; do s=$(du -sm "$1" 2>/dev/null | cut -f1) || s=0; [ "${s:-0}" -gt "$peak" ] && peak=$s; sleep 0.2; done; echo "$peak"
}
preload_half() { # $1: table; the distinct lines of the first half of the files
  target/release/store-dedup --memory-limit 256M --threads 2 --temp-dir "$TMP" "$HALF" 2>/dev/null |
    "${PSQL[@]}" -c "\copy $1 FROM STDIN (FORMAT csv, DELIMITER E'\x1f', QUOTE E'\x01')"
  sql "VACUUM ANALYZE $1"
}

run_pg_store() { # $1 table; prints "wall rss_mib temp_mib"
  local pids t0 t1 job state
  pids=$(sql "SELECT string_agg(pid::text, ' ') FROM pg_stat_activity WHERE backend_type = 'pg_store worker'")
  for p in $pids; do echo 5 > /proc/$p/clear_refs; done   # reset VmHWM
  rm -f "$TMP/done"; du_peak "$TMP/pg_store" "$TMP/done" > "$TMP/du" &
  t0=$(now); job=$(sql "SELECT store_ingest('$DATA', '$1')")
  until state=$(sql "SELECT state FROM store.jobs WHERE id = $job"); [ "$state" != queued ] && [ "$state" != running ]; do sleep 0.2; done
  t1=$(now); touch "$TMP/done"; wait
  [ "$state" = done ] || { sql "SELECT error FROM store.jobs WHERE id = $job" >&2; exit 1; }
  # VmHWM counts the shared_buffers pages the worker touched too; memory_peak does not.
  awk '/VmHWM/{printf " %d", $2/1024}' "/proc/$(sql "SELECT worker_pid FROM store.jobs WHERE id = $job")/status" >> "$TMP/hwm"
  echo "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}') $(sql "SELECT memory_peak / 1048576 FROM store.jobs WHERE id = $job") $(cat "$TMP/du")"
}

run_a() { # $1 table
  local t0 t1
  rm -f "$TMP/done"; du_peak "$TMP/sort" "$TMP/done" > "$TMP/du" & mkdir -p "$TMP/sort"
  t0=$(now)
  /usr/bin/time -f "%M" -o "$TMP/rss" env LC_ALL=C sort -u -S 256M --parallel=2 -T "$TMP/sort" $FILES |
    "${PSQL[@]}" -c "\copy $1 FROM STDIN (FORMAT csv, DELIMITER E'\x1f', QUOTE E'\x01')"
  t1=$(now); touch "$TMP/done"; wait
  echo "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}') $(( $(cat "$TMP/rss") / 1024 )) $(cat "$TMP/du")"
}

run_b() { # $1 table; memory: the backend's VmHWM is not reachable after COPY, so none
  local t0 t1
  sql "DROP TABLE IF EXISTS staging; CREATE UNLOGGED TABLE staging (line text)"
  t0=$(now)
  cat $FILES | "${PSQL[@]}" -c "\copy staging FROM STDIN (FORMAT csv, DELIMITER E'\x1f', QUOTE E'\x01')"
  sql "INSERT INTO $1 SELECT line FROM staging ON CONFLICT DO NOTHING"
  t1=$(now)
  echo "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}') - $(( $(sql "SELECT pg_total_relation_size('staging')") / 1048576 ))"
  sql "DROP TABLE staging"
}

declare -A R
: > "$TMP/hwm"
measure() { # key function table [preload]
  local key=$1 fn=$2 t=$3 pre=${4:-} out walls=() rss temp runs=$RUNS
  [ "$fn" = run_b ] && runs=$B_RUNS
  for _ in $(seq "$runs"); do
    fresh_table "$t"; [ -n "$pre" ] && preload_half "$t"
    sql "CHECKPOINT"
    out=$($fn "$t"); read -r w rss temp <<<"$out"; walls+=("$w")
  done
  R[$key]="$(printf '%s\n' "${walls[@]}" | median) $rss $temp $(sql "SELECT pg_indexes_size('$t') / 1048576") $(fingerprint "$t")"
}

echo "# $(date -u +%F) $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM, $(df -h "$W" | awk 'NR==2{print $2" disk"}'); data $DATA ($(du -sh "$DATA" | cut -f1)); runs: $RUNS (B: $B_RUNS)"
fresh_table t_warm; run_pg_store t_warm >/dev/null; sql "DROP TABLE t_warm"; : > "$TMP/hwm"
measure empty_pg run_pg_store t_pg
measure empty_a run_a t_a
measure empty_b run_b t_b
measure incr_pg run_pg_store t_pg half
measure incr_b run_b t_b half
RECORDS=$(cat $FILES | wc -l)
printf '%-12s %-9s %9s %12s %10s %10s %9s %10s  %s\n' scenario contender wall_s records/s peak_RSS temp_MiB index_MiB vs_pg_store table
status=0
for s in empty incr; do
  read -r pw _ _ _ pf <<<"${R[${s}_pg]}"
  for c in pg a b; do
    [ -n "${R[${s}_$c]:-}" ] || continue
    read -r w rss temp idx f <<<"${R[${s}_$c]}"
    name=$(case $c in pg) echo pg_store;; a) echo "A sort|COPY";; b) echo "B COPY+INSERT";; esac)
    printf '%-12s %-13s %7.1f %12.0f %8s MiB %8s %9s  %8s  %s\n' "$s" "$name" "$w" "$(awk -v a="$RECORDS" -v b="$w" 'BEGIN{print a/b}')" "$rss" "$temp" "$idx" \
      "$(awk -v a="$pw" -v b="$w" 'BEGIN{printf "%.2f", a/b}')" "$f"
    [ "$f" = "$pf" ] || { echo "TABLES DIFFER: $s $c"; status=1; }
  done
done
echo "pg_store peak_RSS is the worker's private memory (RssAnon+RssFile, sampled each second); its VmHWM, which also counts shared_buffers pages it touched, read (MiB):$(cat "$TMP/hwm")"
echo "A's peak_RSS is sort's; B's temp_MiB is the staging table's size."
exit $status
