#!/bin/bash
# pg_store's insert workers on a many-core machine, with what they wait on: for each
# store.insert_workers setting, the job's wall time, its scan-and-sort and insert phases,
# WAL written, and a sample (every 100 ms) of the wait events of pg_store's processes.
# Against sort -u | COPY split over N parallel COPYs of the same lines.
#
# Runs on a lent machine from the kit ../shared/tools/device/pack.sh builds (PostgreSQL 15,
# the installed pg_store, store-gen), unpacked in /tmp/devkit:
#   tar xzf target/devkit.tgz -C /tmp && bash benches/device.sh
# RUNS="1 4 16 p1 p16" by default (a number: pg_store with that many insert workers; pN: N
# parallel COPYs: p1 against p16 is PostgreSQL's own scaling of concurrent COPY into one
# table); FILES, SIZE: store-gen's. Figures go to $OUT/results.txt.
set -u
K=/tmp/devkit; R=${OUT:-/tmp/out}/results.txt; mkdir -p "$(dirname "$R")"
T=$(mktemp -d)   # the runs' own files: stop flags, wait-event samples, split parts
log() { echo "$*" | tee -a "$R"; }
el() { local d=$(( ($(date +%s%N) - $1) / 10000000 )); printf "%d.%02d" $((d / 100)) $((d % 100)); }
CORES=$(nproc)
log "== $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(grep PRETTY /etc/os-release | cut -d= -f2)"
if [ ! -x /usr/lib/postgresql/15/bin/postgres ]; then
  mkdir -p /usr/lib/postgresql /usr/share/postgresql
  cp -a $K/usr/lib/postgresql/15 /usr/lib/postgresql/ && cp -a $K/usr/share/postgresql/15 /usr/share/postgresql/
fi
export LD_LIBRARY_PATH=$K/syslib
B=/usr/lib/postgresql/15/bin
id postgres >/dev/null 2>&1 || useradd -r -m postgres
D=/tmp/pgdata; rm -rf $D; mkdir -p $D /tmp/pgrun; chown postgres $D /tmp/pgrun
as_pg() { runuser -u postgres -- env LD_LIBRARY_PATH="$LD_LIBRARY_PATH" "$@"; }
as_pg $B/initdb -D $D -A trust -E UTF8 --locale=C >/tmp/initdb.log 2>&1 || { log "initdb failed"; exit 1; }
cat >> $D/postgresql.conf <<CONF
port = 5440
listen_addresses = ''
unix_socket_directories = '/tmp/pgrun'
shared_preload_libraries = 'pg_store'
shared_buffers = 8GB
max_wal_size = 8GB
max_worker_processes = 40
store.memory_limit = '1GB'
store.cpu_limit = $CORES
store.workers = 2
jit = off
CONF
as_pg $B/pg_ctl -D $D -l /tmp/pg.log -w start >/dev/null || { log "start failed"; tail -5 /tmp/pg.log | tee -a "$R"; exit 1; }
q() { $B/psql -X -q -At -h /tmp/pgrun -p 5440 -U postgres -d postgres -v ON_ERROR_STOP=1 "$@"; }
q -c "CREATE EXTENSION pg_store"
G=/tmp/gen; rm -rf $G; FILES=${FILES:-16}; SIZE=${SIZE:-128M}
t0=$(date +%s%N); $K/store-gen $G --files "$FILES" --size "$SIZE" --dup 0.3 --seed 7 >/dev/null; chmod -R a+rX $G
log "data: $(du -sh $G | cut -f1) in $FILES files, generated in $(el "$t0") s"
fresh() { q -c "DROP TABLE IF EXISTS t; CREATE TABLE t (line text NOT NULL); CREATE UNIQUE INDEX ON t (store.line_key(line)); CHECKPOINT"; }
wal() { q -c "SELECT wal_bytes FROM pg_stat_wal"; }
# Wait events of the loading processes (pg_store's, or the COPYs' client backends), sampled
# until the file $1 exists; tallied into $2.
sample() {
  while [ ! -f "$1" ]; do
    q -c "SELECT backend_type || ' ' || coalesce(wait_event_type || ':' || wait_event, 'CPU') FROM pg_stat_activity
          WHERE backend_type IN ('pg_store worker', 'pg_store inserter')
             OR (backend_type = 'client backend' AND query ILIKE 'COPY%' AND pid <> pg_backend_pid())" >> "$2" 2>/dev/null
    sleep 0.1
  done
}
run_pg() {
  # store.compact_index off: with it on, a load into an empty table takes one insert range
  # whatever store.insert_workers says, and this measures how the ranges scale.
  fresh; q -c "ALTER SYSTEM SET store.insert_workers = $1" -c "ALTER SYSTEM SET store.compact_index = off" -c "SELECT pg_reload_conf()" >/dev/null; sleep 1
  local w0 t0 j s w stop=$T/stop.$1 waits=$T/waits.$1; rm -f $stop $waits
  w0=$(wal); sample $stop $waits & t0=$(date +%s%N)
  j=$(q -c "SELECT store_ingest('$G', 't')")
  for _ in $(seq 6000); do s=$(q -c "SELECT state FROM store.status WHERE id = $j"); case $s in done|failed|partial|cancelled) break ;; esac; sleep 0.1; done
  w=$(el "$t0"); touch $stop; wait
  log "pg_store insert_workers=$1: ${w} s, $s, rows $(q -c "SELECT count(*) FROM t"), index $(q -c "SELECT pg_size_pretty(pg_relation_size('t_line_key_idx'))"), WAL $(( ($(wal) - w0) >> 20 )) MiB"
  log "  $(q -c "SELECT 'scan+sort ' || round(extract(epoch FROM insert_started_at - started_at), 1) || ' s, insert ' || round(extract(epoch FROM finished_at - insert_started_at), 1) || ' s, ranges ' || ranges || ', batch ' || batch_size FROM store.jobs WHERE id = $j")"
  log "  wait events (share of samples): $(sort $waits | uniq -c | sort -rn | head -8 | awk -v n="$(wc -l < $waits)" '{c=$1; $1=""; printf "%s %.0f%%;", $0, 100*c/n}')"
}
run_par() {
  fresh; rm -rf $T/parts; mkdir $T/parts; local t0 t1 w stop=$T/stop.p$1 waits=$T/waits.p$1 pids=(); t0=$(date +%s%N)
  LC_ALL=C sort -u -S 1G --parallel="$CORES" -T /tmp $G/* | split -n r/"$1" - $T/parts/p
  rm -f $stop $waits; sample $stop $waits & local sp=$!; t1=$(date +%s%N)
  for f in $T/parts/p*; do q -c "\copy t FROM '$f' (FORMAT csv, DELIMITER E'\x1f', QUOTE E'\x01')" & pids+=($!); done
  wait "${pids[@]}"; w=$(el "$t0"); local wcopy; wcopy=$(el "$t1"); touch $stop; wait $sp
  log "sort -u | $1 parallel COPYs: ${w} s (the COPYs ${wcopy} s), rows $(q -c "SELECT count(*) FROM t"), index $(q -c "SELECT pg_size_pretty(pg_relation_size('t_line_key_idx'))")"
  log "  wait events (share of samples): $(sort $waits | uniq -c | sort -rn | head -8 | awk -v n="$(wc -l < $waits)" '{c=$1; $1=""; printf "%s %.0f%%;", $0, 100*c/n}')"
}
log "== runs (the first one also creates the WAL segments later ones recycle)"
for r in ${RUNS:-1 4 16 p1 p16}; do case $r in p*) run_par "${r#p}" ;; *) run_pg "$r" ;; esac; done
as_pg $B/pg_ctl -D $D -m fast stop >/dev/null
log "== end"
