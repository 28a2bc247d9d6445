#!/usr/bin/env bash
# Build Citus 13.2.2 (the last release line for PostgreSQL 15) from its source tarball and
# install it into the system PostgreSQL 15, for make test-citus and make bench-citus.
# Does nothing when Citus 13.2 is installed already.
#
#   CITUS_SRC=/path/to/citus-13.2.2.tar.gz tests/install-citus.sh   # a tarball you have
#   tests/install-citus.sh                                         # downloads the pinned release
#
# Exits 2 (with what to do) when there is neither a tarball nor a download.
set -euo pipefail
VERSION=13.2.2
URL=https://github.com/citusdata/citus/archive/refs/tags/v$VERSION.tar.gz
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
LIBDIR=$($PG_CONFIG --pkglibdir); SHAREDIR=$($PG_CONFIG --sharedir)
if [ -f "$LIBDIR/citus.so" ] && grep -qs "default_version = '13.2" "$SHAREDIR/extension/citus.control"; then
  exit 0
fi
BUILD=$(mktemp -d); trap 'rm -rf "$BUILD"' EXIT
SRC=${CITUS_SRC:-}
if [ -z "$SRC" ]; then
  if ! curl -fsSL --max-time 120 -o "$BUILD/citus.tar.gz" "$URL" 2>/dev/null; then
    echo "Citus is not installed, and $URL could not be downloaded."
    echo "Install Citus 13.2 for PostgreSQL 15 (citusdata's packages), or name its source tarball: CITUS_SRC=/path/to/citus-$VERSION.tar.gz make test-citus"
    exit 2
  fi
  SRC=$BUILD/citus.tar.gz
fi
[ -f "$SRC" ] || { echo "CITUS_SRC=$SRC: no such file"; exit 2; }
echo "building Citus $VERSION from $SRC (about 2 minutes)"
missing=$(for p in postgresql-server-dev-15 libcurl4-openssl-dev liblz4-dev libzstd-dev libkrb5-dev libselinux1-dev libxslt1-dev libpam0g-dev libssl-dev gcc make; do
  dpkg-query -W -f='${Status}' $p 2>/dev/null | grep -q 'ok installed' || echo $p; done)
if [ -n "$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null; fi
mkdir "$BUILD/src"; tar -xzf "$SRC" -C "$BUILD/src" --strip-components=1; cd "$BUILD/src"
# PostgreSQL 15.20 exports have_createdb_privilege(), which Citus 13.2.2 also defines (as a
# static inline, for PostgreSQL before 16): use the server's.
python3 - <<'PY'
p = 'src/include/pg_version_compat.h'
s = open(p).read()
at = s.find('static inline bool\nhave_createdb_privilege(void)')
if at >= 0:
    end = s.index('\n}\n', at) + 3
    open(p, 'w').write(s[:at] + '#include "commands/dbcommands.h"\n' + s[end:])
PY
./configure PG_CONFIG="$PG_CONFIG" >/dev/null
make -j"$(nproc)" >/dev/null 2>build.err || { tail -20 build.err; exit 1; }
make install >/dev/null
echo "Citus $VERSION installed into $LIBDIR"
