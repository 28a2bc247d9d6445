# Sourced by tests/upgrade.sh (it uses its BIN, W, PORT, sql and fail): a database's
# owner plants operators and functions in public (tests/planted.sql) before a superuser
# creates or updates pg_store there, and the checks that none of pg_store's objects
# captured one and that none ever ran.
#
# The owner is the role planter (LOGIN, no superuser): it owns each planted database,
# so in PostgreSQL 15 it owns schema public there. reader is an ordinary role with the
# privileges of pg_read_server_files, which uses pg_store as any user may.

# Common types, besides those pg_store's objects use (planted_types adds those).
PLANTED_COMMON='int2,int4,int8,numeric,float4,float8,oid,regclass,regtype,regrole,regnamespace,regproc,regprocedure,name,text,varchar,bpchar,"char",bool,timestamptz,timestamp,date,interval,bytea,json,jsonb,text[],int8[],oid[]'

# Queries of the test itself: with search_path pinned, so that they cannot run a planted
# operator and blame pg_store for it.
pinned() { PGOPTIONS='-c search_path=pg_catalog,pg_temp' sql "$@"; }
# A role's queries, with the default search_path, as users run them.
# (store_wait's progress NOTICEs are left out.)
as_role() {
  local role=$1; shift
  PGOPTIONS="${PGOPTIONS:-} -c client_min_messages=warning" \
    "$BIN/psql" -XAtq -v ON_ERROR_STOP=1 -h "$W" -p "$PORT" -U "$role" -d "${DB:-postgres}" "$@"
}

planted_roles() {
  sql "CREATE ROLE planter LOGIN; CREATE ROLE reader LOGIN IN ROLE pg_read_server_files"
}

# The types of every column of schema store, of every argument and result of pg_store's
# functions, in database $1 (where pg_store is created); with the common ones.
planted_types() {
  local used
  used=$(DB=$1 pinned "
    SELECT string_agg(DISTINCT format_type(ty.oid, NULL), ',')
      FROM (SELECT a.atttypid AS t FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
             WHERE c.relnamespace = 'store'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
            UNION
            SELECT unnest(string_to_array(p.proargtypes::text, ' ')::oid[] || p.prorettype)
              FROM pg_proc p JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid
             WHERE d.deptype = 'e' AND d.refclassid = 'pg_extension'::regclass
               AND d.refobjid = (SELECT e.oid FROM pg_extension e WHERE e.extname = 'pg_store')) s
      JOIN pg_type ty ON ty.oid = s.t
     WHERE ty.typtype NOT IN ('p', 'c')")
  echo "$PLANTED_COMMON${used:+,$used}"
}

# Create database $1, owned by planter, and plant there (types from database $2).
planted_db() {
  local db=$1 types names n
  types=$(planted_types "$2")
  # The function names the SQL of sql/ calls; tests/planted.sql keeps those of pg_catalog.
  names=$(grep -ohiE '\b[a-z_][a-z0-9_]*[[:space:]]*\(' sql/*.sql | tr -d '( \t' | tr 'A-Z' 'a-z' | sort -u | paste -sd,)
  sql "CREATE DATABASE $db OWNER planter"
  n=$(DB=$db as_role planter -v types="$types" -v names="$names" -f tests/planted.sql)
  # The plants are live: a reader's bigint / numeric, as 0.2.0's store.status divides,
  # runs the owner's operator, and leaves a trace. Then the trace starts over.
  DB=$db as_role reader -c "SELECT (1::bigint + 2::bigint) / 3::numeric" >/dev/null
  [ "$(DB=$db pinned "SELECT count(*) FROM public.planted_trace WHERE what = 'operator bigint / numeric'")" = 1 ] ||
    fail "$db: a planted operator did not run where it should have: the test would see nothing"
  DB=$db as_role planter -c "TRUNCATE public.planted_trace; SELECT pg_catalog.setval('public.planted_hits', 1, false)" >/dev/null
  echo "$db: the owner planted $n operators and functions in public"
}

# The objects of pg_store (members of the extension, and those that depend on them
# automatically or internally: a view's rule, a column's default, a constraint, an
# index, a policy, a trigger, a row type) that depend on an object of schema public
# other than pg_store's own functions there; one line each.
planted_captured() {
  DB=$1 pinned "
    WITH RECURSIVE members AS (
        SELECT d.classid, d.objid FROM pg_depend d
         WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
           AND d.refobjid = (SELECT e.oid FROM pg_extension e WHERE e.extname = 'pg_store')
    ), objects AS (
        SELECT m.classid, m.objid FROM members m
        UNION
        SELECT d.classid, d.objid FROM pg_depend d JOIN objects o ON d.refclassid = o.classid AND d.refobjid = o.objid
         WHERE d.deptype IN ('a', 'i')
    )
    SELECT DISTINCT pg_describe_object(d.classid, d.objid, d.objsubid) || ' depends on ' ||
           pg_describe_object(d.refclassid, d.refobjid, d.refobjsubid)
      FROM pg_depend d JOIN objects o ON d.classid = o.classid AND d.objid = o.objid
     CROSS JOIN LATERAL pg_identify_object(d.refclassid, d.refobjid, 0) r
     WHERE r.schema = 'public'
       AND NOT EXISTS (SELECT FROM members m WHERE m.classid = d.refclassid AND m.objid = d.refobjid)
     ORDER BY 1"
}

# Use pg_store in database $1 as a superuser and as reader: ingests (with a reject),
# store_wait on them, every view and table, store_cancel and store_purge, the ledger
# skipping, and a dropped target (the event trigger).
planted_exercise() {
  local db=$1 j s
  mkdir -p "$W/p"; printf 'alpha\nbeta\n\377\376\nalpha\n' > "$W/p/1.txt"; printf 'gamma\nbeta\n' > "$W/p/2.txt"; chmod -R a+rX "$W/p"
  DB=$db sql "CREATE SCHEMA reader AUTHORIZATION reader"
  DB=$db as_role reader -c "CREATE TABLE reader.t (line text UNIQUE)"
  for role in postgres reader; do
    if [ $role = postgres ]; then target=store.lines; else target=reader.t; fi
    for attempt in first again; do
      j=$(DB=$db as_role $role -c "SELECT store_ingest('$W/p', '$target')")
      s=$(DB=$db as_role $role -c "SELECT state || ' ' || files_skipped::text || ' ' || rejected::text FROM store_wait($j, '2 min')")
      case "$attempt $s" in
        "first done 0 1"|"again done 2 0") ;;
        *) fail "$db: job $j of $role ($attempt): $s" ;;
      esac
    done
    DB=$db as_role $role -c "SELECT * FROM store.status" -c "SELECT * FROM store.ranges" -c "SELECT * FROM store.workers" \
      -c "SELECT * FROM store.cluster_status()" -c "SELECT * FROM store.jobs" -c "SELECT * FROM store.files" \
      -c "SELECT * FROM store.rejects" -c "SELECT * FROM store.checkpoints" -c "SELECT * FROM store.ingested" \
      -c "SELECT store_cancel($j)" >/dev/null
  done
  [ "$(DB=$db pinned "SELECT count(*) FROM store.status WHERE rows_per_second IS NOT NULL")" -gt 0 ] ||
    fail "$db: no job with rows_per_second: store.status's division was not exercised"
  DB=$db as_role reader -c "DROP TABLE reader.t"
  [ "$(DB=$db pinned "SELECT count(*) FROM store.ingested WHERE owner = 'reader'::regrole")" = 0 ] ||
    fail "$db: the ledger kept the rows of a dropped table"
  DB=$db sql "SELECT store_purge('100 years')" >/dev/null
}

# (a) nothing of pg_store depends on an object in public, (b) nothing planted ran, and
# every type of a column of schema store was planted for; non-zero, saying why, if not.
planted_check() {
  local db=$1 c bad=""
  [ "$(DB=$db pinned "SELECT extversion FROM pg_extension WHERE extname = 'pg_store'")" = "$NEW" ] || fail "$db: not $NEW"
  c=$(planted_captured "$db")
  [ -z "$c" ] || bad="$bad
pg_store objects depend on objects the database owner planted in public:
$c"
  c=$(DB=$db pinned "SELECT string_agg(DISTINCT what || ' (as ' || by_role || ')', '; ') FROM public.planted_trace")
  [ -z "$c" ] || bad="$bad
planted code ran: $c"
  [ "$(DB=$db pinned "SELECT is_called FROM public.planted_hits")" = f ] || bad="$bad
planted code ran $(DB=$db pinned "SELECT last_value FROM public.planted_hits") times (counting runs in transactions that rolled back)"
  ! grep -q 'WARNING:  planted .* ran' "$W/log" || bad="$bad
planted code ran: $(grep 'WARNING:  planted .* ran' "$W/log" | head -3)"
  c=$(DB=$db pinned "
    SELECT string_agg(DISTINCT format_type(a.atttypid, NULL), ', ')
      FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_type ty ON ty.oid = a.atttypid
     WHERE c.relnamespace = 'store'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped AND ty.typtype <> 'c'
       AND a.atttypid NOT IN (SELECT p.t FROM public.planted_types p)")
  [ -z "$c" ] || bad="$bad
no operators were planted for the types $c of store's columns: add them to PLANTED_COMMON"
  if [ -n "$bad" ]; then echo "FAILED: $db:$bad"; return 1; fi
  echo "$db: no pg_store object depends on anything in public, and nothing planted ran"
}
