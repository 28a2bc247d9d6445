#!/usr/bin/env bash
# make bench-scale: pg_store at scale, against the alternatives, in one run on one local
# PostgreSQL 15 cluster (shared_buffers 1GB, max_wal_size 4GB, otherwise defaults;
# store.memory_limit 256MB, store.cpu_limit 2). About 40 minutes and 60 GB of disk here.
#
#   benches/scale.sh              SIZE_G (default 10): GiB of the big load
#
# Data: store-gen --files SIZE_G --size 1G --dup 0.3 --seed 11 (the big load) and
# store-gen --files 8 --size 128M --dup 0.3 --seed 12 (1 GiB of new files).
# Before each 1 GiB step into the big table, that table is vacuumed and analyzed, untimed,
# as a DBA would after a big load: otherwise the autovacuum its inserts trigger runs
# during the step, and its writes (it sets every page all-visible) count as the step's.
# Steps, each timed alone (one table at a time, to fit the disk):
#   1. A: LC_ALL=C sort -u -S 256M --parallel=2 | psql \copy    big load into table a
#   2. B: the DBA way for new files: COPY into an unlogged staging table, then
#         INSERT INTO a ... ON CONFLICT DO NOTHING               1 GiB into table a
#   3. pg_store: big load into table p (empty)                 (must equal a after step 1)
#   4. pg_store: 1 GiB of new files into table p               (must equal a after step 2)
#   5. pg_store: the same 1 GiB into an empty table
#   6. pg_store: big load into a fresh table, kill -9 of the worker at 90 % of inserting
# For each: wall time, rows/s, private memory peak, temporary disk peak, WAL written and
# full-page images (pg_stat_wal), pages written, table + index size. Ratios and the goals
# at the end.
# Pages written: pg_stat_bgwriter's checkpoint + background writer + backend writes over
# the step, up to a CHECKPOINT at its end (the pages it left dirty are its writes too),
# less the pages the step added to the database: PostgreSQL 15 counts each relation
# extension as a backend write (ForwardSyncRequest, from mdextend), so a new page would
# otherwise count twice.
# The floor of the steady state (step 4): the pages the step changed, each of which must
# be written at least once, read from the page LSNs of the table and its index
# (pageinspect): a page whose LSN is past the step's start was changed by it. Printed
# with the leaf pages among them (the leaves the new keys touched, or that splits made).
# The two sides differ in scope: pages written are the server's (they also count the
# free-space and visibility maps, pg_store's bookkeeping, catalogs, pages written for
# hint bits alone, whose LSN does not move), pages changed only the target's table and
# index; so written / changed is an upper bound of how often each changed page was
# written.
set -euo pipefail
shopt -s inherit_errexit   # a failure inside $(...) stops the run too (a COPY that ran out of disk did not)
cd "$(dirname "$0")/.."
SIZE_G=${SIZE_G:-10}; PORT=${BENCH_PORT:-5442}; BIN=/usr/lib/postgresql/15/bin
W=$PWD/target/bench/scale; CL=$W/cluster; TMP=$W/tmp
mkdir -p "$W" "$TMP/pg_store" "$TMP/sort"; chmod 755 "$PWD/target" "$PWD/target/bench" "$W" "$TMP"
chown postgres "$TMP/pg_store"
cargo build --release --quiet -p store-cli --bin store-dedup --bin store-gen
BIG=$PWD/target/bench/scale-${SIZE_G}g NEW=$PWD/target/bench/scale-new-1g
[ -f "$BIG/.done" ] || { rm -rf "$BIG"; target/release/store-gen "$BIG" --files "$SIZE_G" --size 1G --dup 0.3 --seed 11 >/dev/null; touch "$BIG/.done"; }
[ -f "$NEW/.done" ] || { rm -rf "$NEW"; target/release/store-gen "$NEW" --files 8 --size 128M --dup 0.3 --seed 12 >/dev/null; touch "$NEW/.done"; }
chmod -R a+rX "$BIG" "$NEW"
BIG_FILES=$(find "$BIG" -type f ! -name '.*' | sort); NEW_FILES=$(find "$NEW" -type f ! -name '.*' | sort)

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
runuser -u postgres -- "$BIN/pg_ctl" -D "$CL" -m fast stop >/dev/null 2>&1 || true
runuser -u postgres -- "$BIN/pg_ctl" -D "$CL" -l "$W/log" -w start >/dev/null
# Stopped at the end, whatever happens: a server left running with pg_store loaded would
# die when a later `make test-pg` copies its debug library in place.
trap 'runuser -u postgres -- "$BIN/pg_ctl" -D "$CL" -m fast stop >/dev/null 2>&1 || true' EXIT
PSQL=("$BIN/psql" -XAtq -v ON_ERROR_STOP=1 -h "$W" -p "$PORT" -U postgres -d postgres)
sql() { "${PSQL[@]}" -c "$1"; }
sql "DROP EXTENSION IF EXISTS pg_store CASCADE; CREATE EXTENSION pg_store; CREATE EXTENSION IF NOT EXISTS pageinspect"
# Every autovacuum is logged with the pages it read and dirtied: whether one ran during a
# step, and what it wrote, is part of that step's figures.
sql "ALTER SYSTEM SET log_autovacuum_min_duration = 0"; sql "SELECT pg_reload_conf()" >/dev/null
[ -n "${INSERT_WORKERS:-}" ] && { sql "ALTER SYSTEM SET store.insert_workers = $INSERT_WORKERS"; sql "SELECT pg_reload_conf()" >/dev/null; sleep 2; }
now() { date +%s.%N; }
fresh_table() { sql "DROP TABLE IF EXISTS $1; CREATE TABLE $1 (line text NOT NULL); CREATE UNIQUE INDEX ${1}_key ON $1 (store.line_key(line))"; }
fingerprint() { sql "SELECT count(*) || ':' || coalesce(sum(hashtextextended(line, 7)), 0) FROM $1"; }
wal() { # WAL bytes, full-page images, buffer writes, database size in pages, WAL position
  sql "SELECT wal_bytes || ' ' || wal_fpi || ' ' || (SELECT buffers_checkpoint + buffers_clean + buffers_backend FROM pg_stat_bgwriter) \
       || ' ' || pg_database_size(current_database()) / 8192 || ' ' || pg_current_wal_lsn() FROM pg_stat_wal"
}
changed() { # table since_lsn: "leaf_pages index_pages heap_pages" whose LSN is past since_lsn
  sql "WITH i AS (SELECT s.type = 'l' AS leaf, (page_header(get_raw_page('${1}_key', b::int))).lsn >= '$2' AS c
                  FROM generate_series(1, pg_relation_size('${1}_key') / 8192 - 1) b, LATERAL bt_page_stats('${1}_key', b::int) s),
            h AS (SELECT (page_header(get_raw_page('$1', b::int))).lsn >= '$2' AS c FROM generate_series(0, pg_relation_size('$1') / 8192 - 1) b)
       SELECT (SELECT count(*) FILTER (WHERE c AND leaf) || ' ' || count(*) FILTER (WHERE c) FROM i) || ' ' || (SELECT count(*) FILTER (WHERE c) FROM h)"
}
autovacuums() { sql "SELECT coalesce(sum(autovacuum_count), 0) FROM pg_stat_user_tables WHERE relname = '$1'"; }
size_of() { sql "SELECT pg_relation_size('$1') / 1048576 || ' ' || pg_indexes_size('$1') / 1048576"; }
du_peak() { # size of directory $1 every 0.5 s until file $2 exists; peak in MiB
  # du fails when files vanish under it (sort's and pg_store's runs come and go): a
  # failed sample counts as none, it must not end the loop (set -e, pipefail).
  local peak=0 s; while [ ! -e "$2" ]; do s=$(du -sm "$1" 2>/dev/null | cut -f1) || s=0; [ "${s:-0}" -gt "$peak" ] && peak=$s; sleep 0.5; done; echo "$peak"
}
declare -A R   # key -> "wall rss_mib temp_mib wal_mib fpi rows heap_mib index_mib pages_written autovacuums"
declare -A LSN # key -> the WAL position at the step's start
measure() { # key table command...
  local key=$1 t=$2; shift 2
  sql "CHECKPOINT"
  local w0 av0; w0=$(wal); av0=$(autovacuums "$t"); rm -f "$TMP/done"
  du_peak "$TMP" "$TMP/done" > "$TMP/du" &
  local t0 t1 out; t0=$(now); out=$("$@"); t1=$(now); touch "$TMP/done"; wait
  sql "CHECKPOINT"; sleep 1; local w1; w1=$(wal)
  read -r b0 f0 p0 d0 l0 <<<"$w0"; read -r b1 f1 p1 d1 _ <<<"$w1"; LSN[$key]=$l0
  local walm=$(( (b1 - b0) / 1048576 )) fpi=$((f1 - f0)) pages=$((p1 - p0 - (d1 - d0)))
  # Crash recovery (the kill -9 step) resets the cumulative statistics: no figures then.
  local av; av=$(( $(autovacuums "$t") - av0 ))
  [ "$b1" -ge "$b0" ] || { walm=-; fpi=-; pages=-; av=-; }
  R[$key]="$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}') ${out:--} $(cat "$TMP/du") $walm $fpi $(sql "SELECT count(*) FROM $t") $(size_of "$t") $pages $av"
  echo "  $key: ${R[$key]}" >&2
}
pg_store() { # table dir [kill_at_fraction distinct_lines]; prints the private memory peak in MiB
  local job state pid
  job=$(sql "SELECT store_ingest('$2', '$1')")
  if [ -n "${3:-}" ]; then
    # Wait until that fraction of the job's distinct lines ($4, known from the load before)
    # is committed, then kill -9 the worker.
    until [ "$(sql "SELECT coalesce(sum(inserted), 0) >= $3 * $4 FROM store.checkpoints WHERE job = $job")" = t ]; do sleep 0.5; done
    pid=$(sql "SELECT worker_pid FROM store.jobs WHERE id = $job"); kill -9 "$pid"
    echo "  killed the worker (pid $pid) with $(sql "SELECT sum(inserted) FROM store.checkpoints WHERE job = $job") of $4 lines in" >&2
    sleep 2
  fi
  until state=$(sql "SELECT state FROM store.jobs WHERE id = $job" 2>/dev/null); [ "$state" = done ] || [ "$state" = failed ] || [ "$state" = cancelled ]; do sleep 0.5; done
  [ "$state" = done ] || { sql "SELECT error FROM store.jobs WHERE id = $job" >&2; exit 1; }
  sql "SELECT (memory_peak / 1048576)::int || ' ' || attempts FROM store.status WHERE id = $job" | cut -d' ' -f1
}
copy_a() { # table files...; prints sort's peak RSS in MiB
  local t=$1; shift
  /usr/bin/time -f "%M" -o "$TMP/rss" env LC_ALL=C sort -u -S 256M --parallel=2 -T "$TMP/sort" "$@" |
    "${PSQL[@]}" -c "\copy $t FROM STDIN (FORMAT csv, DELIMITER E'\x1f', QUOTE E'\x01')"
  echo $(( $(cat "$TMP/rss") / 1024 ))
}
staging_b() { # table files...
  local t=$1; shift
  sql "DROP TABLE IF EXISTS staging; CREATE UNLOGGED TABLE staging (line text)"
  cat "$@" | "${PSQL[@]}" -c "\copy staging FROM STDIN (FORMAT csv, DELIMITER E'\x1f', QUOTE E'\x01')"
  sql "INSERT INTO $t SELECT line FROM staging ON CONFLICT DO NOTHING"
  echo -   # staging is dropped after the step's figures are read: its pages count as added
}

echo "# $(date -u +%F) $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM; big: $BIG ($(du -sh "$BIG" | cut -f1)), new: $NEW ($(du -sh "$NEW" | cut -f1)); insert workers: $(sql "SHOW store.insert_workers")"
# Warm-up: the first load of a new cluster pays for creating its WAL segments.
fresh_table warm; pg_store warm "$NEW" >/dev/null; sql "DROP TABLE warm"
fresh_table a
measure big_a a copy_a a $BIG_FILES
FP_BIG=$(fingerprint a)
sql "VACUUM (ANALYZE) a"
measure new_b a staging_b a $NEW_FILES
CHANGED_B=$(changed a "${LSN[new_b]}"); read -r B_LEAVES B_INDEX B_HEAP <<<"$CHANGED_B"
sql "DROP TABLE staging"
FP_BOTH=$(fingerprint a)
sql "DROP TABLE a"
fresh_table p
measure big_pg p pg_store p "$BIG"
[ "$(fingerprint p)" = "$FP_BIG" ] || { echo "TABLES DIFFER after the big load"; exit 1; }
sql "VACUUM (ANALYZE) p"
measure new_pg p pg_store p "$NEW"
CHANGED_P=$(changed p "${LSN[new_pg]}"); read -r P_LEAVES P_INDEX P_HEAP <<<"$CHANGED_P"
[ "$(fingerprint p)" = "$FP_BOTH" ] || { echo "TABLES DIFFER after the new files"; exit 1; }
sql "DROP TABLE p"
fresh_table e
measure new_empty e pg_store e "$NEW"
sql "DROP TABLE e"
fresh_table k
measure big_kill k pg_store k "$BIG" 0.9 "$(echo "${R[big_pg]}" | cut -d" " -f6)"
[ "$(fingerprint k)" = "$FP_BIG" ] || { echo "TABLE DIFFERS after the kill -9"; exit 1; }
sql "DROP TABLE k"

BIG_BYTES=$(du -sb "$BIG" | cut -f1); NEW_BYTES=$(du -sb "$NEW" | cut -f1)
BIG_REC=$(cat $BIG_FILES | wc -l); NEW_REC=$(cat $NEW_FILES | wc -l)
printf '\n%-10s %-28s %8s %11s %8s %9s %9s %10s %10s %12s %13s %7s\n' step what wall_s records/s RSS_MiB temp_MiB WAL_MiB FPI pages_wr rows heap+idx_MiB autovac
row() { # key label records
  read -r w rss temp walm fpi rows heap idx pages av <<<"${R[$1]}"
  printf '%-10s %-28s %8.1f %11.0f %8s %9s %9s %10s %10s %12s %7s+%-5s %7s\n' "$1" "$2" "$w" "$(awk -v a="$3" -v b="$w" 'BEGIN{print a/b}')" "$rss" "$temp" "$walm" "$fpi" "$pages" "$rows" "$heap" "$idx" "$av"
}
row big_a "A: sort -u | COPY, ${SIZE_G} GiB" "$BIG_REC"
row big_pg "pg_store, ${SIZE_G} GiB" "$BIG_REC"
row new_b "B: COPY staging + ON CONFLICT" "$NEW_REC"
row new_pg "pg_store, 1 GiB into big" "$NEW_REC"
row new_empty "pg_store, 1 GiB into empty" "$NEW_REC"
row big_kill "pg_store, kill -9 at 90 %" "$BIG_REC"
w() { echo "${R[$1]}" | cut -d' ' -f1; }
f() { echo "${R[$1]}" | cut -d' ' -f"$2"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; }
goal() { # what value goal; a value that is not a number was not measured
  if ! [[ $2 =~ ^[0-9]+(\.[0-9]+)?$ ]]; then echo "NOT MEASURED $1: '$2' (goal <= $3)"
  elif awk -v v="$2" -v g="$3" 'BEGIN{exit !(v <= g)}'; then echo "MET   $1: $2 (goal <= $3)"
  else echo "NOT MET $1: $2 (goal <= $3)"; fi
}
echo
goal "big load, pg_store / sort -u | COPY" "$(ratio "$(w big_pg)" "$(w big_a)")" 0.65
goal "index after the big load, pg_store / sort -u | COPY" "$(ratio "$(f big_pg 8)" "$(f big_a 8)")" 1.05
goal "cost per GiB at ${SIZE_G} GiB / at 1 GiB (empty)" "$(ratio "$(awk -v a="$(w big_pg)" -v g="$SIZE_G" 'BEGIN{print a/g}')" "$(awk -v a="$(w new_empty)" -v b="$NEW_BYTES" 'BEGIN{print a/(b/1073741824)}')")" 1.1
goal "private memory, MiB" "$(f big_pg 2)" 320
goal "temporary disk / input" "$(ratio "$(f big_pg 3)" "$(( BIG_BYTES / 1048576 ))")" 1.1
goal "1 GiB into big, pg_store / DBA pipeline" "$(ratio "$(w new_pg)" "$(w new_b)")" 0.2
goal "1 GiB into big / into empty" "$(ratio "$(w new_pg)" "$(w new_empty)")" 2.0
goal "kill -9 at 90 %: total / uninterrupted" "$(ratio "$(w big_kill)" "$(w big_pg)")" 1.1
per_row() { awk -v a="$1" -v r="$2" 'BEGIN{printf "%.3f", a/r}'; }
NEW_ROWS=$(( $(f new_pg 6) - $(f big_pg 6) ))
goal "1 GiB into big: pages written / pages changed (the floor)" "$(ratio "$(f new_pg 9)" $((P_INDEX + P_HEAP)))" 1.1
echo
echo "Steady state, per new row ($NEW_ROWS new rows):"
printf '  %-10s %9s %9s %9s %9s %9s %7s %9s\n' "" leaves idx_chg heap_chg changed written wr/chg WAL_B
floor_row() { # label leaves index heap written wal_mib
  printf '  %-10s %9s %9s %9s %9s %9s %7s %9.0f\n' "$1" "$(per_row "$2" $NEW_ROWS)" "$(per_row "$3" $NEW_ROWS)" "$(per_row "$4" $NEW_ROWS)" \
    "$(per_row $(($3 + $4)) $NEW_ROWS)" "$(per_row "$5" $NEW_ROWS)" "$(ratio "$5" $(($3 + $4)))" "$(awk -v a="$6" -v r=$NEW_ROWS 'BEGIN{print a*1048576/r}')"
}
floor_row pg_store "$P_LEAVES" "$P_INDEX" "$P_HEAP" "$(f new_pg 9)" "$(f new_pg 4)"
floor_row B "$B_LEAVES" "$B_INDEX" "$B_HEAP" "$(f new_b 9)" "$(f new_b 4)"
echo "  (leaves: leaf pages changed; idx_chg, heap_chg: index and table pages changed; changed: their sum, the"
echo "   floor; written: pages written; WAL_B: WAL bytes. Full-page images per new row: pg_store $(per_row "$(f new_pg 5)" $NEW_ROWS), B $(per_row "$(f new_b 5)" $NEW_ROWS))"
echo "pages written per row into an empty table: $(per_row "$(f new_empty 9)" "$(f new_empty 6)")"
