#!/usr/bin/env bash
# make test-upgrade: ALTER EXTENSION pg_store UPDATE from 0.1.0 (built from its sources,
# commit fd2eb5c, kept as tests/fixtures/pg_store-0.1.0.tar.gz; built once into
# target/upgrade-0.1.0) to this version. A 0.1.0 cluster ingests a directory and
# has a job queued; the current build is installed over it; after ALTER EXTENSION
# UPDATE the queued job runs, the ledger still skips the files 0.1.0 ingested, and the
# upgraded database's schema (pg_dump --schema-only --binary-upgrade, which lists an
# extension's members, and \dx+) equals a fresh install's.
#
# And in databases whose owner (a role without superuser) planted operators and
# functions in public for pg_store's install-time SQL to capture (tests/planted.sh):
# one where 0.1.0 was created and is updated, one where this version is created, one
# where 0.2.0 (tests/fixtures/pg_store--0.2.0.sql) was created and is updated. After
# pg_store is used there by a superuser and another role, no object of pg_store
# depends on anything in public, and nothing planted ever ran.
#
# Installs 0.1.0's files into the system PostgreSQL for the duration, so no other
# cluster of this machine may run pg_store meanwhile (make test runs it alone); the
# current build is installed again at the end (make install-staged), whatever happens.
#
# PG_PREFIX=/some/dir runs it against a copy of PostgreSQL there instead (cp -a
# /usr/lib/postgresql/15 and /usr/share/postgresql/15 to $PG_PREFIX/usr/lib/postgresql/15
# and $PG_PREFIX/usr/share/postgresql/15: PostgreSQL finds its lib/ and share/ beside
# its bin/), installing 0.1.0 and the current build (STAGE, by default
# target/release/pg_store-pg15, as `cargo pgrx package` stages it) there and not into
# the system, so other clusters of the machine are left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_PREFIX=${PG_PREFIX:-}; STAGE=${STAGE:-target/release/pg_store-pg15}
BIN=$PG_PREFIX/usr/lib/postgresql/15/bin; PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
OLD=fd2eb5c; U=$PWD/target/upgrade-0.1.0; PORT=5462
NEW=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
EXT=$PG_PREFIX/usr/share/postgresql/15/extension
fail() { echo "FAILED: $*"; [ -f "${W:-}/log" ] && tail -20 "$W/log"; exit 1; }

# 0.1.0's sources, as `git archive --prefix=pg_store-0.1.0/ fd2eb5c` wrote them (kept in
# the repository, so a shallow clone tests the upgrade too).
SRC=tests/fixtures/pg_store-0.1.0.tar.gz
[ -f "$SRC" ] || fail "$SRC is missing"
if [ ! -f "$U/stage-0.1.0/.done" ]; then
  echo "building pg_store 0.1.0 from $SRC (commit $OLD; a few minutes, once)"
  rm -rf "$U/src"; mkdir -p "$U/src"; tar -xzf "$SRC" -C "$U/src" --strip-components=1
  printf '\n[workspace]\n' >> "$U/src/Cargo.toml" # its own workspace, not this checkout's
  # A quick build (opt-level 1, no LTO, many codegen units, no debuginfo): the old version
  # only has to run a small job, and `make test` builds it from scratch on every clean clone.
  (cd "$U/src" && CARGO_TARGET_DIR="$U/target" CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_LTO=false \
    CARGO_PROFILE_RELEASE_CODEGEN_UNITS=64 CARGO_PROFILE_RELEASE_DEBUG=false \
    cargo pgrx package --pg-config "$PG_CONFIG" >/dev/null)
  rm -rf "$U/stage-0.1.0"; cp -a "$U/target/release/pg_store-pg15" "$U/stage-0.1.0"; touch "$U/stage-0.1.0/.done"
fi

# make lint checks sql/; the install script pgrx wrote from it, with the CREATE FUNCTION
# statements it generated between bootstrap.sql and finalize.sql, must pass as well.
python3 tests/lint_sql.py "$STAGE/usr/share/postgresql/15/extension/pg_store--$NEW.sql" ||
  fail "the generated install script leaves operators or functions to search_path"

# Copy a staged tree into place, each file renamed over its old copy (as make install).
install_tree() {
  (cd "$1" && find . -type f ! -name .done | while read -r f; do
    dst=$PG_PREFIX/${f#./}; mkdir -p "$(dirname "$dst")"; cp "$f" "$dst.new.$$" && chmod 644 "$dst.new.$$" && mv -f "$dst.new.$$" "$dst"
  done)
}
# The build under test, into the system (make install-staged) or into PG_PREFIX.
install_current() {
  if [ -z "$PG_PREFIX" ]; then make --no-print-directory install-staged >/dev/null; else install_tree "$STAGE"; fi
}
W=$(mktemp -d /tmp/pg_store_upgrade_test.XXXXXX); chmod 755 "$W"; chown postgres "$W"
cleanup() {
  runuser -u postgres -- "$BIN/pg_ctl" -D "$W/data" -m immediate stop >/dev/null 2>&1 || true
  # 0.2.0's install script, from the fixture, leaves with the test (or the one that was
  # there before comes back).
  if [ -f "$W/pg_store--0.2.0.sql.before" ]; then mv -f "$W/pg_store--0.2.0.sql.before" "$EXT/pg_store--0.2.0.sql"
  elif [ -f "$W/pg_store--0.2.0.sql.ours" ]; then rm -f "$EXT/pg_store--0.2.0.sql"; fi
  install_current
  [ -n "${KEEP:-}" ] || rm -rf "$W"
}
trap cleanup EXIT
sql() { "$BIN/psql" -XAtq -v ON_ERROR_STOP=1 -h "$W" -p "$PORT" -U postgres -d "${DB:-postgres}" -c "$1"; }
# shellcheck source=tests/planted.sh
. tests/planted.sh
pgctl() { runuser -u postgres -- "$BIN/pg_ctl" -D "$W/data" -l "$W/log" -w "$@" >/dev/null; }
wait_ended() {
  for _ in $(seq 1 300); do
    s=$(sql "SELECT state FROM store.jobs WHERE id = $1")
    case $s in queued|running) sleep 0.2 ;; *) echo "$s"; return ;; esac
  done
  echo "$s"
}

install_tree "$U/stage-0.1.0"
runuser -u postgres -- "$BIN/initdb" -D "$W/data" -A trust -E UTF8 --locale=C.UTF-8 -U postgres >/dev/null
cat >> "$W/data/postgresql.conf" <<CONF
port = $PORT
unix_socket_directories = '$W'
listen_addresses = ''
shared_preload_libraries = 'pg_store'
store.workers = 1
CONF
pgctl start
mkdir -p "$W/a" "$W/b"
printf 'one\ntwo\nthree\n' > "$W/a/1.txt"; printf 'three\nfour\n' > "$W/a/2.txt"; printf 'five\none\n' > "$W/b/3.txt"
chmod -R a+rX "$W/a" "$W/b"
sql "CREATE EXTENSION pg_store"
[ "$(sql "SELECT extversion FROM pg_extension WHERE extname = 'pg_store'")" = 0.1.0 ] || fail "not 0.1.0"
# A database whose owner planted before 0.1.0 was created there, with finished jobs
# (into store.lines, and into a varchar(n) column, whose length the upgrade reads),
# their checkpoints and ledger rows, and a ledger row whose job is gone: the rows the
# upgrade's UPDATEs compute from.
planted_roles
planted_db planted_up postgres
DB=planted_up sql "CREATE EXTENSION pg_store"
DB=planted_up pinned "
  CREATE TABLE public.short (line varchar(10) UNIQUE);
  WITH j AS (INSERT INTO store.jobs (path, target, column_name, dedup, owner, state, finished_at)
             VALUES ('$W/gone', 'store.lines', 'line', 'exact', 10, 'done', now()),
                    ('$W/gone', 'public.short', 'line', 'exact', 10, 'done', now()) RETURNING id, target),
       c AS (INSERT INTO store.checkpoints (job) SELECT id FROM j)
  INSERT INTO store.ingested (target, path, size, mtime_ns, fingerprint, job)
  SELECT target, '$W/gone/1.txt', 1, 1, 'f', id FROM j UNION ALL
  SELECT 'store.lines', '$W/gone/2.txt', 1, 1, 'f', 1000000"
J1=$(sql "SELECT store_ingest('$W/a')")
[ "$(wait_ended "$J1")" = done ] || fail "0.1.0 job $J1 did not end done"
# A job queued under 0.1.0 that no worker takes before the upgrade: with store.workers = 0
# 0.1.0 refuses store_ingest, so the row is the one its store_ingest writes.
sed -i 's/^store.workers = 1$/store.workers = 0/' "$W/data/postgresql.conf"
pgctl restart
J2=$(sql "INSERT INTO store.jobs (path, target, column_name, dedup, filter, owner) VALUES ('$W/b', 'store.lines', 'line', 'exact', NULL, 'postgres'::regrole) RETURNING id")
echo "0.1.0: job $J1 ingested $W/a, job $J2 queued"
pgctl stop

echo "installing pg_store $NEW over 0.1.0"
install_current
sed -i 's/^store.workers = 0$/store.workers = 1/' "$W/data/postgresql.conf"
pgctl start
# The library is this version's, the SQL objects still 0.1.0's: workers leave the
# database alone, and the functions refuse (0.1.0 declared some SECURITY DEFINER: run by
# the new code they would see their owner as the caller).
for _ in $(seq 1 50); do grep -q "pg_store 0.1.0 is created in database postgres" "$W/log" && break; sleep 0.1; done
grep -q "pg_store 0.1.0 is created in database postgres, the library is $NEW" "$W/log" || fail "no worker looked at the database"
sleep 1
[ "$(sql "SELECT state FROM store.jobs WHERE id = $J2")" = queued ] || fail "job $J2 ran before the upgrade"
err=$(sql "SELECT store_cancel($J2)" 2>&1) && fail "store_cancel ran before the upgrade: $err"
echo "$err" | grep -q "pg_store 0.1.0 is created in this database, but the library is $NEW" || fail "store_cancel before the upgrade: $err"
sql "ALTER EXTENSION pg_store UPDATE"
[ "$(sql "SELECT extversion FROM pg_extension WHERE extname = 'pg_store'")" = "$NEW" ] || fail "not $NEW after the update"
[ "$(wait_ended "$J2")" = done ] || fail "job $J2, queued under 0.1.0, did not end done after the update: $(sql "SELECT error FROM store.jobs WHERE id = $J2")"
[ "$(sql "SELECT string_agg(line, ',' ORDER BY line) FROM store.lines")" = "five,four,one,three,two" ] || fail "store.lines: $(sql "SELECT string_agg(line, ',' ORDER BY line) FROM store.lines")"
J3=$(sql "SELECT store_ingest('$W/a')")
[ "$(wait_ended "$J3")" = done ] || fail "job $J3 did not end done"
[ "$(sql "SELECT files_skipped || ' ' || inserted FROM store.status WHERE id = $J3")" = "2 0" ] ||
  fail "the ledger of 0.1.0 no longer skips its files: $(sql "SELECT files_skipped || ' ' || inserted FROM store.status WHERE id = $J3")"
echo "$NEW: job $J2 ran after ALTER EXTENSION UPDATE; job $J3 skipped the 2 files 0.1.0 ingested"

# The planted databases: 0.1.0 updated, this version created, 0.2.0 created and updated.
DB=planted_up sql "ALTER EXTENSION pg_store UPDATE"
planted_db planted_fresh postgres
DB=planted_fresh sql "CREATE EXTENSION pg_store"
planted_db planted_020 postgres
if [ "$NEW" != 0.2.0 ]; then
  # 0.2.0's install script as released (no library of 0.2.0 is needed: this version's
  # has the C functions it declares). 0.2.0 did capture: the check must see it.
  if [ -f "$EXT/pg_store--0.2.0.sql" ]; then cp -p "$EXT/pg_store--0.2.0.sql" "$W/pg_store--0.2.0.sql.before"; else touch "$W/pg_store--0.2.0.sql.ours"; fi
  cp tests/fixtures/pg_store--0.2.0.sql "$EXT/pg_store--0.2.0.sql"
  DB=planted_020 sql "CREATE EXTENSION pg_store VERSION '0.2.0'"
  c=$(planted_captured planted_020)
  [ -n "$c" ] || fail "0.2.0 captured nothing the owner planted: the check would not see a capture"
  echo "planted_020: 0.2.0 captured: $(echo "$c" | paste -sd';')"
  DB=planted_020 sql "ALTER EXTENSION pg_store UPDATE"
else
  DB=planted_020 sql "CREATE EXTENSION pg_store"
fi
planted_ok=1
for db in planted_up planted_fresh planted_020; do
  planted_exercise "$db"
  planted_check "$db" || planted_ok=
done
[ -n "$planted_ok" ] || fail "pg_store captured, or ran, what a database owner planted in public"

# The upgraded database's schema against a fresh install's. Left out of the comparison:
# what binary-upgrade mode says about OIDs, transaction ids and sequence positions,
# and pg_dump's per-run \restrict keys.
sql "CREATE DATABASE fresh"
DB=fresh sql "CREATE EXTENSION pg_store"
schema() {
  "$BIN/pg_dump" --schema-only --binary-upgrade -h "$W" -p "$PORT" -U postgres -d "$1" |
    grep -v -e binary_upgrade -e '^--' -e '^$' -e '^SET ' -e '^SELECT pg_catalog.set_config' \
      -e "^WHERE oid = '[0-9]*';$" -e '^SELECT pg_catalog.setval' -e '^\\restrict ' -e '^\\unrestrict '
  "$BIN/psql" -XAtq -h "$W" -p "$PORT" -U postgres -d "$1" -c '\dx+ pg_store'
}
schema postgres > "$W/upgraded.sql"; schema fresh > "$W/fresh.sql"
[ "$(wc -l < "$W/fresh.sql")" -gt 200 ] || fail "the schema dump of a fresh install is too short to compare ($(wc -l < "$W/fresh.sql") lines)"
diff -u "$W/fresh.sql" "$W/upgraded.sql" > "$W/schema.diff" || { cat "$W/schema.diff"; fail "the upgraded schema differs from a fresh $NEW install"; }
echo "schema after the upgrade = a fresh $NEW install ($(wc -l < "$W/fresh.sql") lines of pg_dump --schema-only --binary-upgrade and \\dx+)"
if [ "$NEW" != 0.2.0 ]; then
  # 0.2.0 as released, updated, equals a fresh install as well (both planted alike).
  schema planted_fresh > "$W/planted_fresh.sql"; schema planted_020 > "$W/planted_020.sql"
  diff -u "$W/planted_fresh.sql" "$W/planted_020.sql" > "$W/schema.diff" || { cat "$W/schema.diff"; fail "0.2.0 updated differs from a fresh $NEW install"; }
  echo "schema of 0.2.0 after the update = a fresh $NEW install's"
fi
echo "upgrade test passed"
