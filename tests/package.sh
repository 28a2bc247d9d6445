#!/usr/bin/env bash
# The Debian package, named and versioned as Debian's PostgreSQL extension packages are.
#   tests/package.sh build   package what `cargo pgrx package` staged (make package):
#                            target/debian/postgresql-15-pg-store_<version>-1_<arch>.deb
#   tests/package.sh         build it, then test it (make test-package): apt installs it
#                            into PostgreSQL 15, a cluster preloads it, CREATE EXTENSION
#                            and an ingest work, and apt removes every file it installed.
#                            The build under test is installed again afterwards (make
#                            install-staged): the package replaced the files of `make install`.
set -euo pipefail
cd "$(dirname "$0")/.."

build() {
  PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
  STAGE=target/release/pg_store-pg15
  VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
  ARCH=$(dpkg --print-architecture)
  PGV=$("$PG_CONFIG" --version | sed 's/^PostgreSQL \([0-9]*\).*/\1/')
  NAME=postgresql-$PGV-pg-store
  test -f "$STAGE$("$PG_CONFIG" --pkglibdir)/pg_store.so" || { echo "nothing staged in $STAGE: run cargo pgrx package"; exit 1; }
  ROOT=target/debian/$NAME
  rm -rf "$ROOT"; mkdir -p "$ROOT/DEBIAN"
  cp -a "$STAGE/usr" "$ROOT/"
  find "$ROOT/usr" -type d -exec chmod 755 {} +; find "$ROOT/usr" -type f -exec chmod 644 {} +
  # As Debian's packages do: debugging information stays out (dynamic symbols stay).
  strip --strip-debug "$ROOT$("$PG_CONFIG" --pkglibdir)/pg_store.so"
  mkdir -p "$ROOT/usr/share/doc/$NAME"
  cp README.md "$ROOT/usr/share/doc/$NAME/"
  cat > "$ROOT/DEBIAN/control" <<CONTROL
Package: $NAME
Version: $VERSION-1
Architecture: $ARCH
Maintainer: pg_store developers <pg_store@localhost>
Depends: postgresql-$PGV, libc6
Section: database
Priority: optional
Installed-Size: $(du -sk "$ROOT/usr" | cut -f1)
Description: exactly-once, deduplicating bulk ingest of line files for PostgreSQL $PGV
 pg_store reads huge line files on the database host, sorts and deduplicates them
 within a memory budget, and inserts the distinct lines into a table exactly once,
 resuming after a crash from its checkpoints. Add pg_store to
 shared_preload_libraries, restart, and CREATE EXTENSION pg_store.
CONTROL
  OUT=target/debian/${NAME}_${VERSION}-1_${ARCH}.deb
  dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$OUT" >/dev/null
  echo "$OUT"
}

if [ "${1:-}" = build ]; then build; exit; fi

BIN=/usr/lib/postgresql/15/bin
DEB=$(build)
NAME=$(dpkg-deb -f "$DEB" Package)
W=$(mktemp -d /tmp/pg_store_package.XXXXXX); chmod 755 "$W"; chown postgres "$W"
cleanup() {
  runuser -u postgres -- "$BIN/pg_ctl" -D "$W/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$W"
  make --no-print-directory install-staged >/dev/null
}
trap cleanup EXIT
fail() { echo "FAILED: $*"; exit 1; }

echo "package: $DEB ($(du -h "$DEB" | cut -f1))"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "./$DEB" >/dev/null
dpkg-query -W -f='${Status} ${Version}\n' "$NAME" | grep -q "install ok installed" || fail "$NAME is not installed"
FILES=$(dpkg -L "$NAME" | while read -r f; do [ -f "$f" ] && echo "$f"; done)
echo "$FILES" | grep -q '/pg_store.so$' || fail "no pg_store.so in the package"
echo "$FILES" | grep -q '/pg_store.control$' || fail "no control file in the package"
echo "$FILES" | grep -q '/pg_store--0.1.0--[0-9.]*.sql$' || fail "no upgrade script from 0.1.0 in the package"

runuser -u postgres -- "$BIN/initdb" -D "$W/data" -A trust -E UTF8 --locale=C.UTF-8 -U postgres >/dev/null
cat >> "$W/data/postgresql.conf" <<CONF
port = 5461
unix_socket_directories = '$W'
listen_addresses = ''
shared_preload_libraries = 'pg_store'
CONF
runuser -u postgres -- "$BIN/pg_ctl" -D "$W/data" -l "$W/log" -w start >/dev/null
sql() { "$BIN/psql" -XAtq -v ON_ERROR_STOP=1 -h "$W" -p 5461 -U postgres -d postgres -c "$1"; }
mkdir -p "$W/in"; printf 'b\na\nb\nc\n' > "$W/in/one.txt"; printf 'c\nd\n' > "$W/in/two.txt"; chmod -R a+rX "$W/in"
sql "CREATE EXTENSION pg_store"
JOB=$(sql "SELECT store_ingest('$W/in')")
for _ in $(seq 1 150); do
  state=$(sql "SELECT state FROM store.jobs WHERE id = $JOB")
  case $state in queued|running) sleep 0.2 ;; *) break ;; esac
done
[ "$state" = done ] || fail "job $JOB ended $state: $(sql "SELECT error FROM store.jobs WHERE id = $JOB")"
[ "$(sql "SELECT string_agg(line, ',' ORDER BY line) FROM store.lines")" = "a,b,c,d" ] || fail "store.lines is not a,b,c,d"
echo "installed package: CREATE EXTENSION and an ingest of 2 files (6 records, 4 distinct) work"
runuser -u postgres -- "$BIN/pg_ctl" -D "$W/data" -m fast -w stop >/dev/null

DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq "$NAME" >/dev/null
dpkg-query -W -f='${Status}\n' "$NAME" 2>/dev/null | grep -q "install ok installed" && fail "$NAME is still installed"
for f in $FILES; do [ ! -e "$f" ] || fail "$f is left after apt-get remove"; done
echo "removed: none of its $(echo "$FILES" | wc -l) files is left"
echo "package test passed"
