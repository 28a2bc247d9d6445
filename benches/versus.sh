#!/usr/bin/env bash
# Before and after: an older pg_store build against the installed one, on the same data with
# benches/pg.sh's settings, one cluster each, runs alternating (old, new, old, new, ...) so
# that the machine's drift hits both alike. Prints one line per run: build, wall seconds,
# state, rows.
#
#   OLD=/opt/old-pg benches/versus.sh [DATA_DIR]   (RUNS, default 3)
#
# OLD is a relocated copy of PostgreSQL 15 holding the older build: cp -a --parents
# /usr/lib/postgresql/15 /usr/share/postgresql/15 $OLD, then copy the older commit's
# `cargo pgrx package` output (pg_store.so, control and SQL files) over it. PostgreSQL finds
# its library and extension directories relative to its binaries.
set -euo pipefail
shopt -s inherit_errexit   # a failure inside $(...) stops the run too (a COPY that ran out of disk did not)
cd "$(dirname "$0")/.."
: "${OLD:?set OLD to the prefix holding the older build (see the header)}"
DATA=$(readlink -f "${1:-target/bench/engine-128M}"); RUNS=${RUNS:-3}
[ -d "$DATA" ] || { echo "no data at $DATA: run make bench once, or pass a directory" >&2; exit 2; }
W=$PWD/target/bench/versus; rm -rf $W; mkdir -p $W; chown postgres $W
chmod 755 $W "$PWD/target/bench" "$PWD/target" 2>/dev/null || true
declare -A BINS=([old]=$OLD/usr/lib/postgresql/15/bin [new]=/usr/lib/postgresql/15/bin)
declare -A PORTS=([old]=5461 [new]=5462)
for v in old new; do
  CL=$W/$v; mkdir -p $CL $W/tmp-$v; chown postgres $CL $W/tmp-$v
  runuser -u postgres -- ${BINS[$v]}/initdb -D $CL -A trust -E UTF8 --locale=C.UTF-8 -U postgres >/dev/null
  cat >> $CL/postgresql.conf <<CONF
port = ${PORTS[$v]}
unix_socket_directories = '$W'
listen_addresses = ''
shared_buffers = 1GB
max_wal_size = 4GB
shared_preload_libraries = 'pg_store'
store.memory_limit = '256MB'
store.cpu_limit = 2
store.temp_dir = '$W/tmp-$v'
CONF
done
stop() { for v in old new; do runuser -u postgres -- ${BINS[$v]}/pg_ctl -D $W/$v -m fast stop >/dev/null 2>&1 || true; done; }
trap stop EXIT
for v in old new; do runuser -u postgres -- ${BINS[$v]}/pg_ctl -D $W/$v -l $W/$v.log -w start >/dev/null; done
sql() { ${BINS[$1]}/psql -XAtq -v ON_ERROR_STOP=1 -h $W -p ${PORTS[$1]} -U postgres -d postgres -c "$2"; }
for v in old new; do sql $v "CREATE EXTENSION pg_store"; echo "$v: pg_store $(sql $v "SELECT extversion FROM pg_extension WHERE extname = 'pg_store'")"; done
run() { # v table
  sql $1 "SET client_min_messages = warning; DROP TABLE IF EXISTS $2; CREATE TABLE $2 (line text NOT NULL); CREATE UNIQUE INDEX ON $2 (store.line_key(line)); CHECKPOINT"
  local t0=$(date +%s.%N) job state
  job=$(sql $1 "SELECT store_ingest('$DATA', '$2')")
  until state=$(sql $1 "SELECT state FROM store.jobs WHERE id = $job"); [ "$state" != queued ] && [ "$state" != running ]; do sleep 0.2; done
  local t1=$(date +%s.%N)
  echo "$1 $(awk -v a=$t0 -v b=$t1 'BEGIN{printf "%.2f", b-a}') $state $(sql $1 "SELECT count(*) FROM $2")"
  sql $1 "DROP TABLE $2"
}
run old t_warm >/dev/null; run new t_warm >/dev/null
for r in $(seq "$RUNS"); do run old t; run new t; done | tee $W/runs
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
o=$(awk '$1 == "old" {print $2}' $W/runs | median); n=$(awk '$1 == "new" {print $2}' $W/runs | median)
echo "median of $RUNS: old $o s, new $n s, new/old $(awk -v a="$n" -v b="$o" 'BEGIN{printf "%.2f", a/b}')"
