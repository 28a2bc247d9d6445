-- Run by tests/upgrade.sh as the owner of a database (a role without superuser, which
-- owns schema public there, as any database owner does in PostgreSQL 15) before a
-- superuser creates or updates pg_store in it: what such an owner can plant in public
-- for pg_store's install-time SQL to capture.
--
-- * For every pair of the types in :types (the types pg_store's objects use, and other
--   common ones) and every common operator name, where pg_catalog has no operator of
--   exactly these operand types (so that a bare `a op b` resolves to pg_catalog's
--   through an implicit cast, and an exact match in public would win): such an operator
--   in public, computing what pg_catalog's would.
-- * For every pg_catalog function whose name is in :names (the names pg_store's SQL
--   calls), and every argument position: a function in public of that name, with that
--   argument of another type of :types that converts to pg_catalog's argument type, so
--   an unqualified call that needs the cast would find it first.
--
-- Every planted function is IMMUTABLE (so that an index predicate could capture it
-- too) and leaves a trace when it runs: a row of public.planted_trace and a step of
-- public.planted_hits (which a rollback does not undo), or, where it may write neither
-- (a read-only transaction), a WARNING in the server log. public.planted lists what
-- was planted.

\set ON_ERROR_STOP 1
SET search_path = pg_catalog, pg_temp;
SET client_min_messages = warning;

CREATE TABLE public.planted_trace (what text NOT NULL, by_role name NOT NULL DEFAULT current_user,
                                   at timestamptz NOT NULL DEFAULT clock_timestamp());
GRANT SELECT, INSERT ON public.planted_trace TO PUBLIC;
CREATE SEQUENCE public.planted_hits;
GRANT USAGE ON SEQUENCE public.planted_hits TO PUBLIC;
CREATE TABLE public.planted (what text PRIMARY KEY);
CREATE TABLE public.planted_types (t regtype PRIMARY KEY);
INSERT INTO public.planted_types
SELECT DISTINCT trim(x)::regtype FROM unnest(string_to_array(:'types', ',')) x WHERE trim(x) <> '';
CREATE TABLE public.planted_names (n name PRIMARY KEY);
INSERT INTO public.planted_names
SELECT DISTINCT trim(x) FROM unnest(string_to_array(:'names', ',')) x WHERE trim(x) <> '';

CREATE FUNCTION public.planted_ran(what text) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM nextval('public.planted_hits');
    INSERT INTO public.planted_trace (what) VALUES (what);
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'planted % ran (its trace failed: %)', what, SQLERRM;
END
$$;

DO $plant$
DECLARE
    l regtype;
    r regtype;
    op text;
    rt regtype;
    n integer := 0;
    f record;
    i integer;
    t regtype;
    args regtype[];
    sig text;
    call text;
BEGIN
    FOR l IN SELECT p.t FROM public.planted_types p LOOP
        FOR r IN SELECT p.t FROM public.planted_types p LOOP
            FOREACH op IN ARRAY ARRAY['=', '<>', '<', '>', '<=', '>=', '+', '-', '*', '/', '%', '||', '~~', '!~~', '~', '!~'] LOOP
                CONTINUE WHEN EXISTS (SELECT FROM pg_operator o
                                       WHERE o.oprnamespace = 'pg_catalog'::regnamespace AND o.oprname = op
                                         AND o.oprleft = l AND o.oprright = r);
                -- The type of what pg_catalog's operator computes, through implicit casts;
                -- none: no operator of pg_catalog takes these types at all.
                BEGIN
                    EXECUTE format('CREATE TEMP TABLE planted_probe AS SELECT NULL::%s OPERATOR(pg_catalog.%s) NULL::%s AS v WITH NO DATA',
                                   l, op, r);
                    SELECT a.atttypid INTO rt FROM pg_attribute a WHERE a.attrelid = 'pg_temp.planted_probe'::regclass AND a.attnum = 1;
                    DROP TABLE pg_temp.planted_probe;
                EXCEPTION WHEN OTHERS THEN
                    CONTINUE;
                END;
                n := n + 1;
                sig := format('operator %s %s %s', l, op, r);
                EXECUTE format($f$CREATE FUNCTION public.planted_op_%s(a %s, b %s) RETURNS %s
                                  LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $b$
                                  BEGIN PERFORM public.planted_ran(%L); RETURN a OPERATOR(pg_catalog.%s) b; END $b$$f$,
                               n, l, r, rt, sig, op);
                EXECUTE format('CREATE OPERATOR public.%s (LEFTARG = %s, RIGHTARG = %s, FUNCTION = public.planted_op_%s)',
                               op, l, r, n);
                INSERT INTO public.planted VALUES (sig);
            END LOOP;
        END LOOP;
    END LOOP;

    -- Functions: each pg_catalog overload of a name pg_store calls, of up to 3 plain
    -- arguments ("any" stands for every type), returning one plain value.
    FOR f IN SELECT p.proname, string_to_array(p.proargtypes::text, ' ')::oid[]::regtype[] AS argtypes, p.prorettype::regtype AS rettype
               FROM pg_proc p JOIN public.planted_names nm ON nm.n = p.proname
               JOIN pg_type rtt ON rtt.oid = p.prorettype
              WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.prokind IN ('f', 'a')
                AND p.pronargs BETWEEN 1 AND 3 AND NOT p.proretset AND rtt.typtype <> 'p'
                AND NOT EXISTS (SELECT FROM unnest(p.proargtypes::oid[]) a JOIN pg_type at ON at.oid = a
                                 WHERE at.typtype = 'p' AND a <> '"any"'::regtype)
    LOOP
        FOR i IN 1 .. array_length(f.argtypes, 1) LOOP
            FOR t IN SELECT p.t FROM public.planted_types p
                      WHERE p.t <> f.argtypes[i]
                        AND (f.argtypes[i] = '"any"'::regtype
                             OR EXISTS (SELECT FROM pg_cast c WHERE c.castsource = p.t AND c.casttarget = f.argtypes[i]
                                                                AND c.castcontext IN ('i', 'a')))
            LOOP
                args := f.argtypes;
                args[i] := t;
                -- "any" elsewhere: text, the type an unknown literal there would take.
                SELECT array_agg(CASE WHEN a = '"any"'::regtype THEN 'text'::regtype ELSE a END ORDER BY o)
                  INTO args FROM unnest(args) WITH ORDINALITY AS x(a, o);
                sig := format('function %s(%s)', f.proname, array_to_string(args, ', '));
                CONTINUE WHEN EXISTS (SELECT FROM public.planted p WHERE p.what = sig)
                           OR EXISTS (SELECT FROM pg_proc p WHERE p.pronamespace = 'pg_catalog'::regnamespace
                                         AND p.proname = f.proname AND p.proargtypes::text = array_to_string(args::oid[], ' '));
                -- What pg_catalog's function returns, from the planted arguments cast to its types.
                SELECT string_agg(CASE WHEN f.argtypes[o] = '"any"'::regtype THEN format('$%s', o)
                                       ELSE format('$%s::%s', o, f.argtypes[o]) END, ', ' ORDER BY o)
                  INTO call FROM generate_series(1, array_length(args, 1)) o;
                n := n + 1;
                EXECUTE format($f$CREATE FUNCTION public.%I(%s) RETURNS %s
                                  LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $b$
                                  BEGIN
                                      PERFORM public.planted_ran(%L);
                                      BEGIN
                                          RETURN pg_catalog.%I(%s);
                                      EXCEPTION WHEN OTHERS THEN
                                          RETURN NULL;
                                      END;
                                  END $b$$f$,
                               f.proname, array_to_string(args, ', '), f.rettype, sig, f.proname, call);
                INSERT INTO public.planted VALUES (sig);
            END LOOP;
        END LOOP;
    END LOOP;
END
$plant$;

-- The trace starts empty: planting ran nothing of its own.
SELECT count(*) AS planted FROM public.planted;
