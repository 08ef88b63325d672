-- crm-bridge schema, version 4: SECURITY DEFINER hardening and capture that never fails a write
-- (issue 10, items 1-4, 7, 8 and 15).
--
-- * Every SECURITY DEFINER function (and every function one of them calls) pins
--   `search_path = pg_catalog, crm_bridge, pg_temp`: pg_temp LAST.  Left out, pg_temp is searched
--   FIRST for types and relations, and a caller's `CREATE DOMAIN pg_temp.jsonb ... CHECK (evil())`
--   ran evil() as the owner.  Types, catalog relations and operators are qualified as well.
-- * The generated per-table capture function contains no name taken from the table (it is found
--   by OID), so neither a hostile table name nor a later RENAME reaches generated source; attach()
--   refuses names with control characters.
-- * The edit trigger compares rows by binary image (`*=`), which needs no equality operator for
--   any column type, now or after ALTER TABLE ADD COLUMN.  Existing attachments are re-attached.
-- * Partitioned tables (and partitions) get row-level triggers: they fire for statements aimed at
--   the parent or at any partition, including partitions created later.
-- * Statement-level capture writes one event per chunk of at most 1000 records.
-- * The wake-up NOTIFY also needs crm_bridge.wake_state to say a daemon is idle: only the daemon
--   can set it, so a foreign session holding the advisory lock no longer makes writers NOTIFY.
-- * crm_trigger.retry_schedule is range-checked.

-- ---------------------------------------------------------------------------------------------
-- The capture functions run as crm_bridge_capture, a NOLOGIN role that may only add rows to the
-- outbox.  They are SECURITY DEFINER (writers need no right on crm_bridge), and code a table's
-- owner can attach to its column types (a CREATE CAST to json or text, used by to_json() and by
-- ::text) runs inside them: as the schema owner that code had every right of the owner (often a
-- superuser); as crm_bridge_capture it can only write events.
-- ---------------------------------------------------------------------------------------------
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'crm_bridge_capture') THEN
        BEGIN
            CREATE ROLE crm_bridge_capture NOLOGIN;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE EXCEPTION 'crm-bridge needs a role crm_bridge_capture, and % may not create roles', current_user
                USING ERRCODE = 'insufficient_privilege',
                      HINT = pg_catalog.format('as a superuser: CREATE ROLE crm_bridge_capture NOLOGIN; '
                                               'GRANT crm_bridge_capture TO %I; then run crm-bridge migrate again',
                                               current_user);
        END;
    END IF;
    -- The owner hands the capture functions to that role, so it must be able to act as it.
    IF NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user)
       AND NOT pg_catalog.pg_has_role(current_user, 'crm_bridge_capture', 'USAGE') THEN
        EXECUTE pg_catalog.format('GRANT crm_bridge_capture TO %I', current_user);
    END IF;
END
$roles$;
ALTER ROLE crm_bridge_capture NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS;
COMMENT ON ROLE crm_bridge_capture IS
    'crm-bridge: owns the capture trigger functions; may only INSERT into crm_bridge.event';
GRANT USAGE ON SCHEMA crm_bridge TO crm_bridge_capture;
GRANT INSERT ON crm_bridge.event TO crm_bridge_capture;

-- ---------------------------------------------------------------------------------------------
-- Wake-up state.  UNLOGGED: it is meaningless after a crash (and the lock it accompanies is gone).
-- ---------------------------------------------------------------------------------------------
CREATE UNLOGGED TABLE crm_bridge.wake_state (
    id         smallint PRIMARY KEY CHECK (id = 1),
    idle_until timestamptz,
    pid        integer
);
INSERT INTO crm_bridge.wake_state (id) VALUES (1);
REVOKE ALL ON crm_bridge.wake_state FROM PUBLIC;
GRANT SELECT ON crm_bridge.wake_state TO crm_bridge_capture;
COMMENT ON TABLE crm_bridge.wake_state IS
    'Set by the idle daemon (daemon_enter_idle) while it holds the wake-up lock: writers NOTIFY only then';

-- The caller must hold the exclusive wake-up lock (1668441442, 1): then no other session can be
-- "the idle daemon" at the same time, and a second daemon cannot overwrite the first one's state.
CREATE FUNCTION crm_bridge.daemon_enter_idle(seconds pg_catalog.float8) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_locks l
                    WHERE l.locktype OPERATOR(pg_catalog.=) 'advisory'
                      AND l.pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()
                      AND l.database OPERATOR(pg_catalog.=) (SELECT d.oid FROM pg_catalog.pg_database d
                                                             WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database())
                      AND l.classid OPERATOR(pg_catalog.=) 1668441442::pg_catalog.oid
                      AND l.objid OPERATOR(pg_catalog.=) 1::pg_catalog.oid
                      AND l.objsubid OPERATOR(pg_catalog.=) 2
                      AND l.mode OPERATOR(pg_catalog.=) 'ExclusiveLock' AND l.granted) THEN
        RETURN false;
    END IF;
    UPDATE crm_bridge.wake_state w
       SET idle_until = pg_catalog.now() OPERATOR(pg_catalog.+) pg_catalog.make_interval(
               secs => least(greatest(coalesce(seconds, 0), 0), 60)),
           pid = pg_catalog.pg_backend_pid()
     WHERE w.id OPERATOR(pg_catalog.=) 1;
    RETURN true;
END
$$;
COMMENT ON FUNCTION crm_bridge.daemon_enter_idle(pg_catalog.float8) IS
    'Daemon only: while holding the wake-up lock, ask writers to NOTIFY for the next seconds (at most 60)';

CREATE FUNCTION crm_bridge.daemon_leave_idle() RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
    UPDATE crm_bridge.wake_state w SET idle_until = NULL, pid = NULL
     WHERE w.id OPERATOR(pg_catalog.=) 1 AND w.pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid();
$$;
COMMENT ON FUNCTION crm_bridge.daemon_leave_idle() IS 'Daemon only: stop asking writers to NOTIFY';

-- ---------------------------------------------------------------------------------------------
-- The generic row-level capture function (edit events; create/delete on partitioned tables).
-- ---------------------------------------------------------------------------------------------
-- Captured rows are json: jsonb refuses \u0000 and lone surrogates that a json column accepts, and
-- a CRM write must not fail over them (the daemon passes the text on as it is).
ALTER TABLE crm_bridge.event ALTER COLUMN rows TYPE pg_catalog.json USING rows::pg_catalog.json;

CREATE OR REPLACE FUNCTION crm_bridge.emit_v1() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
DECLARE
    r         pg_catalog.jsonb;
    o         pg_catalog.jsonb;
    id_values pg_catalog.text[] := '{}';
    changed   pg_catalog.text[];
    i         pg_catalog.int4;
    n_ids     pg_catalog.int4 := TG_NARGS - 1;
    rows      pg_catalog.json;
BEGIN
    -- A last argument '+rows' (attach(): capture_rows) asks for the row(s) themselves too.
    IF TG_ARGV[TG_NARGS - 1] = '+rows' THEN
        n_ids := TG_NARGS - 2;
    END IF;
    BEGIN
        IF TG_OP = 'DELETE' THEN
            r := pg_catalog.to_jsonb(OLD);
        ELSE
            r := pg_catalog.to_jsonb(NEW);
        END IF;
        FOR i IN 1 .. n_ids LOOP
            id_values := id_values || (r OPERATOR(pg_catalog.->>) TG_ARGV[i]);
        END LOOP;
        IF TG_OP = 'UPDATE' THEN
            o := pg_catalog.to_jsonb(OLD);
            SELECT pg_catalog.array_agg(n.key ORDER BY n.key) INTO changed
              FROM pg_catalog.jsonb_each(r) n WHERE n.value IS DISTINCT FROM o OPERATOR(pg_catalog.->) n.key;
        END IF;
    EXCEPTION WHEN data_exception OR program_limit_exceeded THEN
        -- A value jsonb refuses though its column type accepts it (a json column holding \u0000 or
        -- a lone surrogate; a row over jsonb's size limit): the CRM write must not fail.  The IDs
        -- are read from the record itself; which columns changed is unknown (NULL: every
        -- only_columns filter lets the edit through).
        EXECUTE (SELECT pg_catalog.format('SELECT ARRAY[%s]::pg_catalog.text[]',
                                          pg_catalog.string_agg(pg_catalog.format('($1).%I::pg_catalog.text', a.col),
                                                                ', ' ORDER BY a.n))
                   FROM pg_catalog.unnest(TG_ARGV[1:n_ids]) WITH ORDINALITY AS a(col, n))
           INTO id_values USING CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
        changed := NULL;
    END;
    IF n_ids < TG_NARGS - 1 THEN
        -- json, not jsonb: it takes every value a json column holds, as it is.
        rows := pg_catalog.json_build_array(
            CASE TG_OP WHEN 'INSERT' THEN pg_catalog.json_build_object('new', pg_catalog.to_json(NEW))
                       WHEN 'UPDATE' THEN pg_catalog.json_build_object('old', pg_catalog.to_json(OLD),
                                                                       'new', pg_catalog.to_json(NEW))
                       ELSE pg_catalog.json_build_object('old', pg_catalog.to_json(OLD)) END);
    END IF;
    INSERT INTO crm_bridge.event (object, event, ids, origin_role, origin, changed, rows)
    VALUES (TG_ARGV[0],
            CASE TG_OP WHEN 'INSERT' THEN 'create' WHEN 'UPDATE' THEN 'edit' ELSE 'delete' END,
            id_values, session_user, pg_catalog.current_setting('crm_bridge.origin', true), changed, rows);
    -- Wake-up: the shared try-lock fails only while some session holds the lock exclusively;
    -- wake_state (read only then) says whether that session is the idle daemon.
    IF NOT pg_catalog.pg_try_advisory_xact_lock_shared(1668441442, 1)
       AND EXISTS (SELECT 1 FROM crm_bridge.wake_state w WHERE w.idle_until > pg_catalog.now())
       AND pg_catalog.pg_notification_queue_usage() < 0.5 THEN
        -- Same payload for the whole transaction: PostgreSQL folds duplicates into one.
        PERFORM pg_catalog.pg_notify('crm_bridge', '{"xid":' || pg_catalog.pg_current_xact_id()::pg_catalog.text || '}');
    END IF;
    RETURN NULL;
END
$$;
ALTER FUNCTION crm_bridge.emit_v1() OWNER TO crm_bridge_capture;

-- ---------------------------------------------------------------------------------------------
-- Helpers of attach(): no SECURITY DEFINER themselves, but they run inside one, so they pin
-- their search_path too.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION crm_bridge.emit_rows_name_v1(tbl regclass) RETURNS pg_catalog.name
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$ SELECT pg_catalog.concat('emit_rows_', tbl::pg_catalog.oid, '_v1')::pg_catalog.name $$;

CREATE OR REPLACE FUNCTION crm_bridge.require_trigger_privilege_v1(tbl regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
BEGIN
    IF NOT pg_catalog.has_table_privilege(session_user, tbl::pg_catalog.oid, 'TRIGGER') THEN
        RAISE EXCEPTION 'permission denied: role % needs the TRIGGER privilege on table % to attach or detach it',
            session_user, tbl USING ERRCODE = 'insufficient_privilege';
    END IF;
END
$$;

-- "schema"."table" from the catalogue, quoted: generated DDL never depends on the caller's
-- search_path or on how regclass happens to print.
CREATE FUNCTION crm_bridge.table_ident_v1(tbl regclass) RETURNS pg_catalog.text
LANGUAGE sql STABLE
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
    SELECT pg_catalog.format('%I.%I', n.nspname, c.relname)
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
     WHERE c.oid OPERATOR(pg_catalog.=) tbl::pg_catalog.oid
$$;

-- Statement-level capture: records per event row.  A bulk statement becomes ceil(n / 1000)
-- events, so no event holds an unbounded array or jsonb (jsonb values are limited to 256 MB) and
-- the daemon's per-event work is bounded.
CREATE OR REPLACE FUNCTION crm_bridge.emit_rows_source_v1(tbl regclass, object text, id_columns text[],
                                                          capture_rows boolean DEFAULT false) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $gen$
DECLARE
    small_ids pg_catalog.text;
    chunk_ids pg_catalog.text;   -- the same expressions, evaluated in the chunking subquery
    json_ids  pg_catalog.text;
    rows_of   pg_catalog.text := 'pg_catalog.json_agg(pg_catalog.json_build_object(%L, pg_catalog.to_json(%s))%s)';
    rows_chunk pg_catalog.text := 'pg_catalog.json_agg(pg_catalog.json_build_object(%L, c.j) ORDER BY c.k)';
BEGIN
    SELECT pg_catalog.string_agg(pg_catalog.format('r.%I::pg_catalog.text', u.c), ', ' ORDER BY u.o),
           pg_catalog.string_agg(pg_catalog.format('r.%I::pg_catalog.text', u.c), ', ' ORDER BY u.o),
           pg_catalog.string_agg(pg_catalog.format('pg_catalog.to_json(r.*) OPERATOR(pg_catalog.->>) %L', u.c),
                                 ', ' ORDER BY u.o)
      INTO small_ids, chunk_ids, json_ids
      FROM pg_catalog.unnest(id_columns) WITH ORDINALITY AS u(c, o);
    -- The generated function has no SET search_path clause: it runs in every writer's INSERT and
    -- DELETE statement and the clause costs ~10 us per call on PostgreSQL 15.  It is safe without:
    --   * every function, operator and type in it is schema-qualified (pg_catalog.x, OPERATOR(...));
    --   * its relations are crm_bridge.event / crm_bridge.wake_state (qualified) and the transition
    --     tables new_rows / old_rows, which are looked up before any schema;
    --   * SESSION_USER is a keyword; literals are typed by context; GROUP BY/ORDER BY use the
    --     types' default operator classes (creating one needs a superuser);
    --   * it contains no name taken from the table: the table is identified by TG_RELID, the ID
    --     columns only appear through %I / %L, the object name through %L.
    -- tests/test_definer_security.py runs it under a hostile search_path and pg_temp shadows.
    --
    -- Statements of up to 1000 records (nearly all) take the plain one-aggregate INSERT; larger
    -- ones are numbered and grouped into chunks of 1000 (row_number + GROUP BY costs ~7 us, too
    -- much for every 1-row INSERT).  ids and rows come from the same aggregate node, so they stay
    -- aligned record by record.
    RETURN pg_catalog.format($src$
CREATE OR REPLACE FUNCTION crm_bridge.%1$I() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $body$
-- Generated by crm_bridge.attach(): do not edit.  Captures every record the triggering statement
-- touched, in events of at most 1000 records each.
DECLARE
    ids_ok pg_catalog.bool;
    n      pg_catalog.int8;
BEGIN
    IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
        SELECT (SELECT pg_catalog.count(*) FROM pg_catalog.pg_attribute a
                 WHERE a.attrelid OPERATOR(pg_catalog.=) TG_RELID
                   AND a.attname OPERATOR(pg_catalog.=) ANY (%2$L::pg_catalog.name[])
                   AND NOT a.attisdropped) OPERATOR(pg_catalog.=) %3$s,
               (SELECT pg_catalog.count(*) FROM new_rows)
          INTO ids_ok, n;
    ELSE
        SELECT (SELECT pg_catalog.count(*) FROM pg_catalog.pg_attribute a
                 WHERE a.attrelid OPERATOR(pg_catalog.=) TG_RELID
                   AND a.attname OPERATOR(pg_catalog.=) ANY (%2$L::pg_catalog.name[])
                   AND NOT a.attisdropped) OPERATOR(pg_catalog.=) %3$s,
               (SELECT pg_catalog.count(*) FROM old_rows)
          INTO ids_ok, n;
    END IF;
    IF n OPERATOR(pg_catalog.=) 0 THEN
        RETURN NULL;
    ELSIF ids_ok AND n OPERATOR(pg_catalog.<=) 1000 THEN
        IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
            INSERT INTO crm_bridge.event (object, event, ids, origin_role, origin, rows)
            SELECT %4$L, 'create', pg_catalog.array_agg(ARRAY[%5$s]), SESSION_USER,
                   pg_catalog.current_setting('crm_bridge.origin', true), %8$s
              FROM new_rows r;
        ELSE
            INSERT INTO crm_bridge.event (object, event, ids, origin_role, origin, rows)
            SELECT %4$L, 'delete', pg_catalog.array_agg(ARRAY[%5$s]), SESSION_USER,
                   pg_catalog.current_setting('crm_bridge.origin', true), %9$s
              FROM old_rows r;
        END IF;
    ELSIF ids_ok THEN
        IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
            INSERT INTO crm_bridge.event (object, event, ids, origin_role, origin, rows)
            SELECT %4$L, 'create', pg_catalog.array_agg(c.ids ORDER BY c.k), SESSION_USER,
                   pg_catalog.current_setting('crm_bridge.origin', true), %10$s
              FROM (SELECT ARRAY[%6$s] AS ids, %12$s AS j, pg_catalog.row_number() OVER () AS k
                      FROM new_rows r) c
             GROUP BY (c.k OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 1000 ORDER BY pg_catalog.min(c.k);
        ELSE
            INSERT INTO crm_bridge.event (object, event, ids, origin_role, origin, rows)
            SELECT %4$L, 'delete', pg_catalog.array_agg(c.ids ORDER BY c.k), SESSION_USER,
                   pg_catalog.current_setting('crm_bridge.origin', true), %11$s
              FROM (SELECT ARRAY[%6$s] AS ids, %12$s AS j, pg_catalog.row_number() OVER () AS k
                      FROM old_rows r) c
             GROUP BY (c.k OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 1000 ORDER BY pg_catalog.min(c.k);
        END IF;
    ELSE
        -- An ID column was renamed or dropped after attach(): record what is left (the daemon
        -- reports the NULL IDs) rather than fail the CRM write.
        IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
            INSERT INTO crm_bridge.event (object, event, ids, origin_role, origin)
            SELECT %4$L, 'create', pg_catalog.array_agg(c.ids ORDER BY c.k), SESSION_USER,
                   pg_catalog.current_setting('crm_bridge.origin', true)
              FROM (SELECT ARRAY[%7$s] AS ids, pg_catalog.row_number() OVER () AS k FROM new_rows r) c
             GROUP BY (c.k OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 1000 ORDER BY pg_catalog.min(c.k);
        ELSE
            INSERT INTO crm_bridge.event (object, event, ids, origin_role, origin)
            SELECT %4$L, 'delete', pg_catalog.array_agg(c.ids ORDER BY c.k), SESSION_USER,
                   pg_catalog.current_setting('crm_bridge.origin', true)
              FROM (SELECT ARRAY[%7$s] AS ids, pg_catalog.row_number() OVER () AS k FROM old_rows r) c
             GROUP BY (c.k OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 1000 ORDER BY pg_catalog.min(c.k);
        END IF;
    END IF;
    -- Same wake-up rule as emit_v1 (kept inline: this is every writer's hot path).
    IF NOT pg_catalog.pg_try_advisory_xact_lock_shared(1668441442, 1)
       AND EXISTS (SELECT 1 FROM crm_bridge.wake_state w
                    WHERE w.idle_until OPERATOR(pg_catalog.>) pg_catalog.now())
       AND pg_catalog.pg_notification_queue_usage() OPERATOR(pg_catalog.<) 0.5::pg_catalog.float8 THEN
        PERFORM pg_catalog.pg_notify('crm_bridge', pg_catalog.concat('{"xid":', pg_catalog.pg_current_xact_id(), '}'));
    END IF;
    RETURN NULL;
END
$body$;
$src$, crm_bridge.emit_rows_name_v1(tbl), id_columns, pg_catalog.cardinality(id_columns), object,
    small_ids, chunk_ids, json_ids,
    -- r.* (not r) is the whole row even when the table has a column named r
    CASE WHEN capture_rows THEN pg_catalog.format(rows_of, 'new', 'r.*', '') ELSE 'NULL' END,
    CASE WHEN capture_rows THEN pg_catalog.format(rows_of, 'old', 'r.*', '') ELSE 'NULL' END,
    CASE WHEN capture_rows THEN pg_catalog.format(rows_chunk, 'new') ELSE 'NULL' END,
    CASE WHEN capture_rows THEN pg_catalog.format(rows_chunk, 'old') ELSE 'NULL' END,
    CASE WHEN capture_rows THEN 'pg_catalog.to_json(r.*)' ELSE 'NULL::pg_catalog.json' END);
END
$gen$;

-- ---------------------------------------------------------------------------------------------
-- Installing the capture triggers.  No privilege check here: attach() checks its caller, and
-- the migration below calls this directly (as the owner) to upgrade existing attachments.
-- Not granted to anyone.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION crm_bridge.install_capture_v1(tbl regclass, object text, id_columns text[], rows boolean)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
DECLARE
    params   pg_catalog.text[];
    evs      pg_catalog.text[];
    col      pg_catalog.text;
    args     pg_catalog.text;
    target   pg_catalog.text;
    cls      pg_catalog.pg_class;
    nsp      pg_catalog.name;
    bad      pg_catalog.text;
    per_row  boolean;
    other    pg_catalog.text;
BEGIN
    SELECT * INTO cls FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) tbl::pg_catalog.oid;
    SELECT n.nspname INTO nsp FROM pg_catalog.pg_namespace n WHERE n.oid OPERATOR(pg_catalog.=) cls.relnamespace;
    IF cls.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '% is not a table (only tables and partitioned tables can be attached)', tbl
            USING ERRCODE = 'wrong_object_type';
    END IF;
    IF cls.relpersistence OPERATOR(pg_catalog.=) 't' THEN
        RAISE EXCEPTION '% is a temporary table: attach the CRM''s permanent tables', tbl
            USING ERRCODE = 'wrong_object_type';
    END IF;
    -- Names are never pasted into generated code (only %I / %L), but a name with a newline or
    -- another control character is a mistake or an attack: refuse it, naming the culprit.
    IF nsp ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'the schema name % contains a control character (newline, tab, ...): rename the schema before attaching its tables',
            pg_catalog.quote_ident(nsp) USING ERRCODE = 'invalid_name';
    END IF;
    IF cls.relname ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'the table name % contains a control character (newline, tab, ...): rename the table before attaching it',
            pg_catalog.quote_ident(cls.relname) USING ERRCODE = 'invalid_name';
    END IF;
    SELECT pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO bad
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid OPERATOR(pg_catalog.=) tbl::pg_catalog.oid AND a.attnum > 0 AND NOT a.attisdropped
       AND a.attname ~ '[[:cntrl:]]';
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'table % has column names with control characters (newline, tab, ...): %; rename them before attaching',
            tbl, bad USING ERRCODE = 'invalid_name';
    END IF;

    SELECT o.id_params, o.events INTO params, evs FROM crm_bridge.object_type o
     WHERE o.object OPERATOR(pg_catalog.=) install_capture_v1.object;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown CRM object "%" (expected one of: %)', object,
            (SELECT pg_catalog.string_agg(o.object, ', ' ORDER BY o.object) FROM crm_bridge.object_type o)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF id_columns IS NULL OR pg_catalog.cardinality(id_columns) <> pg_catalog.cardinality(params) THEN
        RAISE EXCEPTION 'object "%" needs % ID columns, for %, in that order (got %)',
            object, pg_catalog.cardinality(params), pg_catalog.array_to_string(params, ', '),
            coalesce(pg_catalog.cardinality(id_columns), 0)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH col IN ARRAY id_columns LOOP
        IF col IS NULL OR NOT EXISTS (
                SELECT 1 FROM pg_catalog.pg_attribute a
                 WHERE a.attrelid OPERATOR(pg_catalog.=) tbl::pg_catalog.oid
                   AND a.attname OPERATOR(pg_catalog.=) col::pg_catalog.name
                   AND a.attnum > 0 AND NOT a.attisdropped) THEN
            RAISE EXCEPTION 'table % has no column "%"', tbl, col
                USING ERRCODE = 'undefined_column';
        END IF;
    END LOOP;

    -- Partitions: capture on the partitioned table OR on partitions, never both (double events).
    SELECT pg_catalog.string_agg(a.table_name::pg_catalog.text, ', ') INTO other
      FROM crm_bridge.attachment a
     WHERE a.table_name::pg_catalog.oid OPERATOR(pg_catalog.<>) tbl::pg_catalog.oid
       AND (a.table_name::pg_catalog.oid IN (SELECT t.relid FROM pg_catalog.pg_partition_tree(tbl) t)
            OR a.table_name::pg_catalog.oid IN (SELECT t.relid FROM pg_catalog.pg_partition_ancestors(tbl) t));
    IF other IS NOT NULL THEN
        RAISE EXCEPTION 'table % is part of the same partition tree as attached table(s) %: attach either the partitioned table (it covers every partition) or single partitions, not both; detach % first',
            tbl, other, other USING ERRCODE = 'invalid_parameter_value';
    END IF;

    PERFORM crm_bridge.remove_capture_v1(tbl);

    target := crm_bridge.table_ident_v1(tbl);
    SELECT pg_catalog.string_agg(pg_catalog.quote_literal(a), ', ') INTO args
      FROM pg_catalog.unnest(ARRAY[object] || id_columns || CASE WHEN rows THEN ARRAY['+rows'] ELSE '{}' END) a;
    -- Partitioned tables and partitions: statement-level triggers on a partitioned table do not
    -- fire for statements aimed at a partition (and transition tables are not allowed on
    -- partitions' row triggers), so they get row-level triggers: on a partitioned table these are
    -- cloned to every partition, present and future.  Plain tables: statement-level triggers
    -- running a function generated for the table, one event per 1000 records.
    per_row := cls.relkind OPERATOR(pg_catalog.=) 'p' OR cls.relispartition;
    IF NOT per_row AND ('create' = ANY (evs) OR 'delete' = ANY (evs)) THEN
        EXECUTE crm_bridge.emit_rows_source_v1(tbl, object, id_columns, rows);
        -- Only ever called as a trigger: nobody needs EXECUTE on it.
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION crm_bridge.%I() FROM PUBLIC', crm_bridge.emit_rows_name_v1(tbl));
        -- Runs as crm_bridge_capture, which may only write the outbox (see the top of this file).
        EXECUTE pg_catalog.format('ALTER FUNCTION crm_bridge.%I() OWNER TO crm_bridge_capture',
                                  crm_bridge.emit_rows_name_v1(tbl));
    END IF;
    IF 'create' = ANY (evs) THEN
        IF per_row THEN
            EXECUTE pg_catalog.format('CREATE TRIGGER crm_bridge_emit_create AFTER INSERT ON %s FOR EACH ROW '
                                      'EXECUTE FUNCTION crm_bridge.emit_v1(%s)', target, args);
        ELSE
            EXECUTE pg_catalog.format('CREATE TRIGGER crm_bridge_emit_create AFTER INSERT ON %s REFERENCING NEW TABLE AS new_rows '
                                      'FOR EACH STATEMENT EXECUTE FUNCTION crm_bridge.%I()', target, crm_bridge.emit_rows_name_v1(tbl));
        END IF;
    END IF;
    IF 'delete' = ANY (evs) THEN
        IF per_row THEN
            EXECUTE pg_catalog.format('CREATE TRIGGER crm_bridge_emit_delete AFTER DELETE ON %s FOR EACH ROW '
                                      'EXECUTE FUNCTION crm_bridge.emit_v1(%s)', target, args);
        ELSE
            EXECUTE pg_catalog.format('CREATE TRIGGER crm_bridge_emit_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS old_rows '
                                      'FOR EACH STATEMENT EXECUTE FUNCTION crm_bridge.%I()', target, crm_bridge.emit_rows_name_v1(tbl));
        END IF;
    END IF;
    IF 'edit' = ANY (evs) THEN
        -- UPDATEs that change nothing fire nothing.  `*=` compares the rows' binary images: it
        -- needs no equality operator of any column type (json, xml, point ... and columns added
        -- later), and is the cheapest of the forms that always work (measured: docs/DBA.md).
        -- A value rewritten with a different binary form (numeric 1.0 -> 1.00) counts as a change.
        EXECUTE pg_catalog.format('CREATE TRIGGER crm_bridge_emit_edit AFTER UPDATE ON %s FOR EACH ROW '
                                  'WHEN (NOT (OLD OPERATOR(pg_catalog.*=) NEW)) '
                                  'EXECUTE FUNCTION crm_bridge.emit_v1(%s)', target, args);
    END IF;
    INSERT INTO crm_bridge.attachment (table_name, object, id_columns, capture_rows)
    VALUES (tbl, object, id_columns, rows);
END
$$;

CREATE FUNCTION crm_bridge.remove_capture_v1(tbl regclass) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
DECLARE
    had    boolean := false;
    trg    pg_catalog.name;
BEGIN
    -- Only the table's own triggers: clones on a partition (tgparentid <> 0) belong to the
    -- partitioned table's attachment and go when it is detached.
    FOR trg IN SELECT t.tgname FROM pg_catalog.pg_trigger t
                WHERE t.tgrelid OPERATOR(pg_catalog.=) tbl::pg_catalog.oid
                  AND t.tgparentid OPERATOR(pg_catalog.=) 0::pg_catalog.oid
                  AND t.tgname IN ('crm_bridge_emit_create', 'crm_bridge_emit_delete', 'crm_bridge_emit_edit') LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER %I ON %s', trg, crm_bridge.table_ident_v1(tbl));
        had := true;
    END LOOP;
    EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS crm_bridge.%I()', crm_bridge.emit_rows_name_v1(tbl));
    DELETE FROM crm_bridge.attachment a WHERE a.table_name::pg_catalog.oid OPERATOR(pg_catalog.=) tbl::pg_catalog.oid;
    RETURN had;
END
$$;

REVOKE ALL ON FUNCTION crm_bridge.install_capture_v1(regclass, text, text[], boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION crm_bridge.remove_capture_v1(regclass) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- The public entry points: check the caller, then act as the owner.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION crm_bridge.attach(tbl regclass, object text, id_columns text[])
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
BEGIN
    PERFORM crm_bridge.require_trigger_privilege_v1(tbl);
    -- Re-attaching keeps the table's capture_rows choice (see crm_bridge.capture_rows()).
    PERFORM crm_bridge.install_capture_v1(tbl, object, id_columns,
        coalesce((SELECT a.capture_rows FROM crm_bridge.attachment a
                   WHERE a.table_name::pg_catalog.oid OPERATOR(pg_catalog.=) tbl::pg_catalog.oid), false));
END
$$;

CREATE OR REPLACE FUNCTION crm_bridge.capture_rows(tbl regclass, enabled boolean DEFAULT true) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
DECLARE
    a crm_bridge.attachment;
BEGIN
    PERFORM crm_bridge.require_trigger_privilege_v1(tbl);
    SELECT * INTO a FROM crm_bridge.attachment x
     WHERE x.table_name::pg_catalog.oid OPERATOR(pg_catalog.=) tbl::pg_catalog.oid;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table % is not attached: run crm_bridge.attach() first', tbl
            USING ERRCODE = 'undefined_object';
    END IF;
    PERFORM crm_bridge.install_capture_v1(tbl, a.object, a.id_columns, coalesce(enabled, false));
END
$$;

CREATE OR REPLACE FUNCTION crm_bridge.detach(tbl regclass) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
BEGIN
    PERFORM crm_bridge.require_trigger_privilege_v1(tbl);
    RETURN crm_bridge.remove_capture_v1(tbl);
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Signing secrets: same bodies as 0003, with pg_temp last and qualified types.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION crm_bridge.set_signing_secret(url_id bigint, secret text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
DECLARE
    raw pg_catalog.bytea;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM crm_bridge.crm_trigger t WHERE t.id OPERATOR(pg_catalog.=) url_id) THEN
        RAISE EXCEPTION 'no crm_trigger row with id %', url_id USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF secret IS NULL THEN
        -- 2 x 122 random bits from the core CSPRNG (pgcrypto is not required).
        raw := pg_catalog.decode(pg_catalog.replace(pg_catalog.gen_random_uuid()::pg_catalog.text
                                                    || pg_catalog.gen_random_uuid()::pg_catalog.text, '-', ''), 'hex');
        secret := 'whsec_' || pg_catalog.encode(raw, 'base64');
    ELSE
        -- Messages below never echo the secret.
        IF secret !~ '^whsec_[A-Za-z0-9+/]+={0,2}$' THEN
            RAISE EXCEPTION 'a signing secret looks like whsec_<base64> (the secret given does not)'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF pg_catalog.length(secret) - 6 NOT BETWEEN 32 AND 88 OR (pg_catalog.length(secret) - 6) % 4 <> 0 THEN
            RAISE EXCEPTION 'a signing secret must be whsec_ + padded base64 of 24 to 64 bytes'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
    INSERT INTO crm_bridge.signing_secret AS s (trigger_id, secret) VALUES (url_id, secret)
    ON CONFLICT (trigger_id) DO UPDATE SET secret = EXCLUDED.secret, created_at = pg_catalog.now();
    RETURN secret;
END
$$;

CREATE OR REPLACE FUNCTION crm_bridge.clear_signing_secret(url_id bigint) RETURNS boolean
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
    WITH d AS (DELETE FROM crm_bridge.signing_secret s WHERE s.trigger_id OPERATOR(pg_catalog.=) url_id RETURNING 1)
    SELECT pg_catalog.count(*) OPERATOR(pg_catalog.>) 0 FROM d;
$$;

CREATE OR REPLACE FUNCTION crm_bridge.signed_urls() RETURNS TABLE (trigger_id bigint, since timestamptz)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$ SELECT s.trigger_id, s.created_at FROM crm_bridge.signing_secret s ORDER BY 1 $$;

-- ---------------------------------------------------------------------------------------------
-- crm_trigger validation: as in 0001, plus ranges for retry_schedule (a value the daemon cannot
-- add to a timestamp, like '1000000 years', used to stop it).  Not SECURITY DEFINER; pg_temp last anyway.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION crm_bridge.crm_trigger_validate_v1() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
DECLARE
    known   pg_catalog.text[];
    allowed pg_catalog.text[];
    other   bigint;
    bad     pg_catalog.text;
BEGIN
    IF NEW.object IS NULL OR NEW.event IS NULL OR NEW.url IS NULL THEN
        RAISE EXCEPTION 'crm_trigger: object, event and url are required'
            USING ERRCODE = 'not_null_violation';
    END IF;
    SELECT o.events INTO allowed FROM crm_bridge.object_type o WHERE o.object = NEW.object;
    IF NOT FOUND THEN
        SELECT pg_catalog.array_agg(o.object ORDER BY o.object) INTO known FROM crm_bridge.object_type o;
        RAISE EXCEPTION 'unknown CRM object "%" (expected one of: %)', NEW.object, pg_catalog.array_to_string(known, ', ')
            USING ERRCODE = 'check_violation';
    END IF;
    IF NOT NEW.event = ANY (allowed) THEN
        RAISE EXCEPTION 'event "%" is not allowed for object "%" (allowed: %)',
            NEW.event, NEW.object, pg_catalog.array_to_string(allowed, ', ')
            USING ERRCODE = 'check_violation';
    END IF;
    NEW.url := pg_catalog.btrim(NEW.url);
    IF NEW.url = '' THEN
        RAISE EXCEPTION 'url must not be empty' USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.url !~* '^https?://' THEN
        RAISE EXCEPTION 'url "%" must start with http:// or https://', NEW.url
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.url !~* '^https?://([^/?#@]*@)?(\[[0-9a-f:.]+\]|[^/?#@:\[\]]+)(:[0-9]{1,5})?([/?].*)?$' THEN
        RAISE EXCEPTION 'url "%" has no valid host', NEW.url USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.url ~ '[[:space:][:cntrl:]]' THEN
        RAISE EXCEPTION 'url "%" contains white space or control characters (percent-encode them)', NEW.url
            USING ERRCODE = 'check_violation';
    END IF;
    IF pg_catalog.strpos(NEW.url, '#') > 0 THEN
        RAISE EXCEPTION 'url "%" has a fragment (#...); fragments are never sent to a server', NEW.url
            USING ERRCODE = 'check_violation';
    END IF;
    IF pg_catalog.length(NEW.url) > 2000 THEN
        RAISE EXCEPTION 'url is % characters long (at most 2000)', pg_catalog.length(NEW.url)
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.only_columns IS NOT NULL AND NEW.event <> 'edit' THEN
        RAISE EXCEPTION 'only_columns applies to edit events, not "%"', NEW.event
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.coalesce_edits AND NEW.event <> 'edit' THEN
        RAISE EXCEPTION 'coalesce_edits applies to edit events, not "%"', NEW.event
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.retry_schedule IS NOT NULL THEN
        IF pg_catalog.cardinality(NEW.retry_schedule) NOT BETWEEN 1 AND 100 THEN
            RAISE EXCEPTION 'retry_schedule has % elements: it must have 1 to 100 (or be NULL for the daemon''s setting)',
                pg_catalog.cardinality(NEW.retry_schedule) USING ERRCODE = 'check_violation';
        END IF;
        SELECT pg_catalog.string_agg(coalesce(s.v::pg_catalog.text, 'NULL'), ', ' ORDER BY s.i) INTO bad
          FROM pg_catalog.unnest(NEW.retry_schedule) WITH ORDINALITY AS s(v, i)
         WHERE s.v IS NULL OR s.v < '0'::pg_catalog.interval OR s.v > '7 days'::pg_catalog.interval;
        IF bad IS NOT NULL THEN
            RAISE EXCEPTION 'retry_schedule: every element must be an interval between 0 and 7 days (got %)', bad
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    SELECT t.id INTO other FROM crm_bridge.crm_trigger t
     WHERE t.object = NEW.object AND t.event = NEW.event AND t.url = NEW.url AND t.id IS DISTINCT FROM NEW.id;
    IF FOUND THEN
        RAISE EXCEPTION 'duplicate URL for %/%: % is already configured (crm_trigger id %)',
            NEW.object, NEW.event, NEW.url, other
            USING ERRCODE = 'unique_violation';
    END IF;
    NEW.updated_at := pg_catalog.now();
    RETURN NEW;
END
$$;

REVOKE ALL ON FUNCTION crm_bridge.daemon_enter_idle(pg_catalog.float8) FROM PUBLIC;
REVOKE ALL ON FUNCTION crm_bridge.daemon_leave_idle() FROM PUBLIC;
REVOKE ALL ON FUNCTION crm_bridge.table_ident_v1(regclass) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- Upgrade every existing attachment to the triggers above (new WHEN form, chunked capture,
-- row-level triggers on partitioned tables).  A table that cannot be re-attached (an ID column
-- dropped, a name with a control character, ...) keeps its old triggers and is reported here and
-- by `crm-bridge check`; the migration itself does not fail for it.
-- Only tables that carry the bridge's capture triggers now are re-attached: before this version
-- the admin role could INSERT attachment rows, and a row naming a table that attach() never
-- captured (one the admin has no rights on) must not make this migration capture it.
-- ---------------------------------------------------------------------------------------------
DO $$
DECLARE
    a crm_bridge.attachment;
BEGIN
    FOR a IN SELECT * FROM crm_bridge.attachment ORDER BY attached_at LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = a.table_name::pg_catalog.oid) THEN
            CONTINUE;  -- dropped table: `crm-bridge check` reports it
        END IF;
        -- The table's own crm_bridge_emit_* triggers, every one running a crm_bridge function.
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                        WHERE t.tgrelid OPERATOR(pg_catalog.=) a.table_name::pg_catalog.oid
                          AND t.tgname IN ('crm_bridge_emit_create', 'crm_bridge_emit_delete', 'crm_bridge_emit_edit'))
           OR EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                        JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) t.tgfoid
                       WHERE t.tgrelid OPERATOR(pg_catalog.=) a.table_name::pg_catalog.oid
                         AND t.tgname IN ('crm_bridge_emit_create', 'crm_bridge_emit_delete', 'crm_bridge_emit_edit')
                         AND p.pronamespace OPERATOR(pg_catalog.<>) 'crm_bridge'::pg_catalog.regnamespace) THEN
            RAISE WARNING 'crm-bridge: % not re-attached: it does not carry crm-bridge''s capture triggers (its crm_bridge.attachment row was not written by attach()); run crm_bridge.attach() for it if it should be captured, else delete that row',
                a.table_name;
            CONTINUE;
        END IF;
        BEGIN
            PERFORM crm_bridge.install_capture_v1(a.table_name, a.object, a.id_columns, a.capture_rows);
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'crm-bridge: could not re-attach %: %; it keeps its old capture triggers (see crm-bridge check)',
                a.table_name, SQLERRM;
        END;
    END LOOP;
END
$$;
