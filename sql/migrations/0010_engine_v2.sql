-- crm-bridge schema, version 10: delivery engine v2 (issue 11).  The happy path writes one row
-- per batch and one history row per call; nothing per call is updated.
--
--   event    the outbox (unchanged; n_records tells bulk statement captures from one-record events)
--   batch    calls a daemon is sending now: one row per claim, holding the calls as an array,
--            under one lease.  Claimed by DELETEing outbox events; recorded by DELETEing the batch.
--   queue    (was crm_bridge.delivery) calls that wait: retries, paused and ordered URLs, calls a
--            daemon held too long to keep in a batch, and dead letters.  Off the happy path.
--   history  every finished call (delivered, unrouted, coalesced, cancelled) and every failed
--            attempt, append-only, in time partitions that are dropped after the retention period
--            (crm_bridge.daemon_rotate), never deleted row by row.
--   url_stat last success / failure per URL, one row per URL (status views read it, not history).
--
-- crm_bridge.delivery becomes a view with the old columns over queue, batch and history, so DBA
-- queries and "what happened to the calls for this record?" keep working; crm_bridge.attempt
-- becomes a view over the failed attempts in history.

SET LOCAL lock_timeout = '10s';

-- ---------------------------------------------------------------------------------------------
-- Outbox: the number of records of a statement-level capture (NULL = one record), so that claims
-- can tell bulk events from one-record events without reading a toasted array.
-- ---------------------------------------------------------------------------------------------
-- Written by the statement capture (it counts the records anyway); a generated column cost 1-row
-- INSERTs 6-13 % of their throughput (measured with pgbench, 8 writers).
ALTER TABLE crm_bridge.event ADD COLUMN n_records integer;
UPDATE crm_bridge.event SET n_records = pg_catalog.array_length(ids, 1)
 WHERE pg_catalog.array_ndims(ids) = 2 AND pg_catalog.array_length(ids, 1) > 1;
-- The bulk lane finds bulk events without walking past every one-record event before them; only
-- bulk rows pay for this index (a partial index is not touched by rows outside its predicate).
CREATE INDEX event_bulk_idx ON crm_bridge.event (id) WHERE n_records IS NOT NULL;

-- The statement capture writes n_records: the generator of migration 0004 with that column, and
-- every attached table's capture function made again from it (the triggers stay).
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
            INSERT INTO crm_bridge.event (object, event, ids, n_records, origin_role, origin, rows)
            SELECT %4$L, 'create', pg_catalog.array_agg(ARRAY[%5$s]), %13$s, SESSION_USER,
                   pg_catalog.current_setting('crm_bridge.origin', true), %8$s
              FROM new_rows r;
        ELSE
            INSERT INTO crm_bridge.event (object, event, ids, n_records, origin_role, origin, rows)
            SELECT %4$L, 'delete', pg_catalog.array_agg(ARRAY[%5$s]), %13$s, SESSION_USER,
                   pg_catalog.current_setting('crm_bridge.origin', true), %9$s
              FROM old_rows r;
        END IF;
    ELSIF ids_ok THEN
        IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
            INSERT INTO crm_bridge.event (object, event, ids, n_records, origin_role, origin, rows)
            SELECT %4$L, 'create', pg_catalog.array_agg(c.ids ORDER BY c.k), %13$s, SESSION_USER,
                   pg_catalog.current_setting('crm_bridge.origin', true), %10$s
              FROM (SELECT ARRAY[%6$s] AS ids, %12$s AS j, pg_catalog.row_number() OVER () AS k
                      FROM new_rows r) c
             GROUP BY (c.k OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 1000 ORDER BY pg_catalog.min(c.k);
        ELSE
            INSERT INTO crm_bridge.event (object, event, ids, n_records, origin_role, origin, rows)
            SELECT %4$L, 'delete', pg_catalog.array_agg(c.ids ORDER BY c.k), %13$s, SESSION_USER,
                   pg_catalog.current_setting('crm_bridge.origin', true), %11$s
              FROM (SELECT ARRAY[%6$s] AS ids, %12$s AS j, pg_catalog.row_number() OVER () AS k
                      FROM old_rows r) c
             GROUP BY (c.k OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 1000 ORDER BY pg_catalog.min(c.k);
        END IF;
    ELSE
        -- An ID column was renamed or dropped after attach(): record what is left (the daemon
        -- reports the NULL IDs) rather than fail the CRM write.
        IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
            INSERT INTO crm_bridge.event (object, event, ids, n_records, origin_role, origin)
            SELECT %4$L, 'create', pg_catalog.array_agg(c.ids ORDER BY c.k), %13$s, SESSION_USER,
                   pg_catalog.current_setting('crm_bridge.origin', true)
              FROM (SELECT ARRAY[%7$s] AS ids, pg_catalog.row_number() OVER () AS k FROM new_rows r) c
             GROUP BY (c.k OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 1000 ORDER BY pg_catalog.min(c.k);
        ELSE
            INSERT INTO crm_bridge.event (object, event, ids, n_records, origin_role, origin)
            SELECT %4$L, 'delete', pg_catalog.array_agg(c.ids ORDER BY c.k), %13$s, SESSION_USER,
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
    CASE WHEN capture_rows THEN 'pg_catalog.to_json(r.*)' ELSE 'NULL::pg_catalog.json' END,
    -- n_records: how many records the event holds when more than one (claims tell bulk events
    -- from one-record events by it without reading the array); NULL = one.
    'CASE WHEN pg_catalog.count(*) OPERATOR(pg_catalog.>) 1 THEN pg_catalog.count(*)::pg_catalog.int4 END');
END
$gen$;

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

-- ---------------------------------------------------------------------------------------------
-- queue: the old delivery table, now only for calls that wait (pending), are held one by one
-- (in_flight: retries, ordered URLs, calls moved out of a batch) or were given up (dead).
-- ---------------------------------------------------------------------------------------------
DROP VIEW crm_bridge.url_status;
DROP VIEW crm_bridge.url_queue;
DROP VIEW crm_bridge.summary;
DROP VIEW crm_bridge.dead_letter;
DROP FUNCTION crm_bridge.replay(bigint, text, text, timestamptz, timestamptz, bigint[], integer);
DROP FUNCTION crm_bridge.purge(bigint, text, text, timestamptz, timestamptz, bigint[], integer);
DROP FUNCTION crm_bridge.dead_letters(bigint, text, text, timestamptz, timestamptz, bigint[]);

ALTER TABLE crm_bridge.delivery RENAME TO queue;
ALTER SEQUENCE crm_bridge.delivery_id_seq RENAME TO call_id_seq;
ALTER INDEX crm_bridge.delivery_pkey RENAME TO queue_pkey;
ALTER INDEX crm_bridge.delivery_pending_idx RENAME TO queue_pending_idx;
ALTER INDEX crm_bridge.delivery_in_flight_idx RENAME TO queue_in_flight_idx;
ALTER INDEX crm_bridge.delivery_dead_idx RENAME TO queue_dead_idx;
ALTER INDEX crm_bridge.delivery_ordered_idx RENAME TO queue_ordered_idx;
ALTER INDEX crm_bridge.delivery_pending_edit_idx RENAME TO queue_pending_edit_idx;
ALTER INDEX crm_bridge.delivery_trigger_idx RENAME TO queue_trigger_idx;
DROP INDEX crm_bridge.delivery_finished_idx;
COMMENT ON TABLE crm_bridge.queue IS
    'Calls that wait (pending), are held one by one (in_flight) or were given up (dead); see the view crm_bridge.delivery';
ALTER TABLE crm_bridge.queue SET (fillfactor = 80);

-- ---------------------------------------------------------------------------------------------
-- history: finished calls and failed attempts, partitioned by time.
--   outcome  delivered | unrouted | coalesced | cancelled  (the call is finished)
--            failed                                      (one attempt failed; the call is in queue)
-- One index: by record, for "what happened to the calls for this record?".  Replays of what a
-- URL was sent since T read the partitions from T on (partition pruning on at).
-- ---------------------------------------------------------------------------------------------
CREATE TABLE crm_bridge.history (
    at               timestamptz NOT NULL,
    call_id          bigint NOT NULL,
    event_id         bigint NOT NULL,
    trigger_id       bigint,            -- no foreign key: history outlives its URL's configuration
    object           text NOT NULL,
    event            text NOT NULL,
    ids              text[] NOT NULL,
    event_created_at timestamptz NOT NULL,
    record_key       text NOT NULL,
    outcome          text NOT NULL,
    attempt          integer NOT NULL DEFAULT 0,
    http_status      integer,
    duration_ms      integer,
    error            text,
    worker           text,
    "row"            json               -- the payload sent, only for URLs with include_row
) PARTITION BY RANGE (at);
COMMENT ON TABLE crm_bridge.history IS
    'Finished calls and failed attempts, kept for the retention period in time partitions';
CREATE INDEX history_record_idx ON crm_bridge.history (record_key);

-- Which partitions exist and what they cover (daemon_rotate keeps it; a partition dropped by
-- hand is forgotten on the next rotation).
CREATE TABLE crm_bridge.history_partition (
    relname     name PRIMARY KEY,
    lower_bound timestamptz NOT NULL UNIQUE,
    upper_bound timestamptz NOT NULL
);

-- One partition of history, [lo, hi), named by its start in UTC, and its bookkeeping row.
CREATE FUNCTION crm_bridge.history_add_partition_v1(lo timestamptz, hi timestamptz) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
DECLARE
    name_ name := ('history_' || pg_catalog.to_char(lo AT TIME ZONE 'UTC', 'YYYYMMDD"_"HH24MISS'))::name;
BEGIN
    EXECUTE pg_catalog.format('CREATE TABLE crm_bridge.%I PARTITION OF crm_bridge.history FOR VALUES FROM (%L) TO (%L)',
                              name_, lo, hi);
    INSERT INTO crm_bridge.history_partition VALUES (name_, lo, hi);
END
$$;

CREATE FUNCTION crm_bridge.history_drop_partition_v1(p_relname name) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
BEGIN
    EXECUTE pg_catalog.format('DROP TABLE crm_bridge.%I', p_relname);
    DELETE FROM crm_bridge.history_partition h WHERE h.relname = p_relname;
END
$$;

-- Create partitions from the last one's upper bound (or from now) until `ahead` past now, each
-- `width` long; drop those that ended more than `retention` ago.  Partition DDL locks the parent
-- briefly (ACCESS EXCLUSIVE): it waits at most 200 ms for a DBA's long query and returns 'busy'
-- rather than hold up the daemons' records behind it; the next round tries again.
CREATE FUNCTION crm_bridge.history_rotate(p_retention interval, p_width interval, p_ahead interval)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
DECLARE
    lo      timestamptz;
    hi      timestamptz;
    made    integer := 0;
    dropped integer := 0;
    p       record;
    busy    boolean;
BEGIN
    IF p_width IS NULL OR p_width < interval '10 seconds' OR p_ahead IS NULL OR p_retention IS NULL
       OR p_retention <= interval '0' THEN
        RAISE EXCEPTION 'history_rotate: width must be at least 10 seconds and retention positive (got %, %)',
            p_width, p_retention USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pg_catalog.set_config('lock_timeout', '200ms', true);
    DELETE FROM crm_bridge.history_partition h WHERE pg_catalog.to_regclass(
        pg_catalog.quote_ident('crm_bridge') || '.' || pg_catalog.quote_ident(h.relname)) IS NULL;
    -- Partitions made for a longer retention (wider than twice the width asked for) that reach
    -- past now and are still empty are made again at the new width, latest first, so that a
    -- shorter retention takes effect now rather than after them.  The parent is locked first
    -- (as every writer locks it before a partition).
    FOR p IN SELECT h.relname FROM crm_bridge.history_partition h
              WHERE h.upper_bound > pg_catalog.now() AND h.upper_bound - h.lower_bound > 2 * p_width
              ORDER BY h.lower_bound DESC LOOP
        LOCK TABLE crm_bridge.history IN ACCESS EXCLUSIVE MODE;
        EXECUTE pg_catalog.format('SELECT EXISTS (SELECT 1 FROM crm_bridge.%I)', p.relname) INTO busy;
        EXIT WHEN busy;
        PERFORM crm_bridge.history_drop_partition_v1(p.relname);
        dropped := dropped + 1;
    END LOOP;
    SELECT max(h.upper_bound) INTO hi FROM crm_bridge.history_partition h;
    lo := greatest(hi, pg_catalog.date_trunc('second', pg_catalog.now()));
    WHILE lo < pg_catalog.now() + p_ahead LOOP
        PERFORM crm_bridge.history_add_partition_v1(lo, lo + p_width);
        lo := lo + p_width;
        made := made + 1;
    END LOOP;
    FOR p IN SELECT h.relname FROM crm_bridge.history_partition h
              WHERE h.upper_bound <= pg_catalog.now() - p_retention ORDER BY h.lower_bound LOOP
        PERFORM crm_bridge.history_drop_partition_v1(p.relname);
        dropped := dropped + 1;
    END LOOP;
    RETURN pg_catalog.format('created %s, dropped %s', made, dropped);
EXCEPTION WHEN lock_not_available THEN
    RETURN 'busy';
END
$$;
COMMENT ON FUNCTION crm_bridge.history_rotate(interval, interval, interval) IS
    'Create history partitions ahead of now and drop those older than the retention period';

-- The partition width for a retention period: a quarter of it, between 10 seconds and 1 day, in
-- whole seconds; history keeps at least the retention period and at most one width more.
CREATE FUNCTION crm_bridge.history_width(p_retention interval) RETURNS interval
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
    SELECT pg_catalog.make_interval(secs => greatest(10, least(86400,
               (pg_catalog.date_part('epoch', p_retention) / 4)::integer)))
$$;

-- Partitions for the rows this migration moves (a day each, from the oldest) and for the next
-- minute; the daemons' rotation continues from there with the width their retention asks for
-- (and at start-up, before they record anything).  Nothing but the daemons and the DBA writes
-- history: a CRM write never needs a partition.
DO $$
DECLARE
    oldest timestamptz;
    lo     timestamptz;
    hi     timestamptz;
BEGIN
    SELECT least(min(d.finished_at), min(d.updated_at)) INTO oldest
      FROM crm_bridge.queue d WHERE d.status IN ('delivered', 'unrouted', 'coalesced', 'cancelled');
    oldest := least(oldest, (SELECT min(a.at) FROM crm_bridge.attempt a));
    lo := pg_catalog.date_trunc('second', pg_catalog.now());
    IF oldest IS NOT NULL AND oldest < lo THEN
        lo := pg_catalog.date_trunc('day', oldest AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    END IF;
    WHILE lo < pg_catalog.date_trunc('second', pg_catalog.now()) + interval '1 minute' LOOP
        hi := least(lo + interval '1 day', pg_catalog.date_trunc('second', pg_catalog.now()) + interval '1 minute');
        PERFORM crm_bridge.history_add_partition_v1(lo, hi);
        lo := hi;
    END LOOP;
END
$$;

INSERT INTO crm_bridge.history (at, call_id, event_id, trigger_id, object, event, ids, event_created_at,
                                record_key, outcome, attempt, http_status, duration_ms, error, worker)
SELECT a.at, d.id, d.event_id, d.trigger_id, d.object, d.event, d.ids, d.event_created_at, d.record_key,
       'failed', a.attempt, a.status, a.duration_ms, a.error, a.worker
  FROM crm_bridge.attempt a JOIN crm_bridge.queue d ON d.id = a.delivery_id;
INSERT INTO crm_bridge.history (at, call_id, event_id, trigger_id, object, event, ids, event_created_at,
                                record_key, outcome, attempt, http_status, error, worker, "row")
SELECT coalesce(d.finished_at, d.updated_at), d.id, d.event_id, d.trigger_id, d.object, d.event, d.ids,
       d.event_created_at, d.record_key, d.status, d.attempts, d.last_status, d.last_error, d.worker, d."row"
  FROM crm_bridge.queue d WHERE d.status IN ('delivered', 'unrouted', 'coalesced', 'cancelled');
DELETE FROM crm_bridge.queue d WHERE d.status IN ('delivered', 'unrouted', 'coalesced', 'cancelled');
DROP TABLE crm_bridge.attempt;
-- Call ids continue after every id in use (rows inserted with explicit ids never moved the sequence).
SELECT pg_catalog.setval('crm_bridge.call_id_seq'::pg_catalog.regclass, x.m)
  FROM (SELECT greatest((SELECT max(q.id) FROM crm_bridge.queue q), (SELECT max(h.call_id) FROM crm_bridge.history h)) AS m) x
 WHERE x.m > (SELECT s.last_value FROM crm_bridge.call_id_seq s);

-- ---------------------------------------------------------------------------------------------
-- batch: the calls one claim gave one daemon, under one lease.  One index (the key): records and
-- heartbeats find a batch by id; recovery reads a table of a few dozen rows.  The calls array
-- is stored out of line, so a heartbeat rewrites a small tuple (HOT with fillfactor 50).
-- ---------------------------------------------------------------------------------------------
CREATE TYPE crm_bridge.call AS (
    call_id bigint, event_id bigint, object text, event text, ids text[], event_created_at timestamptz,
    trigger_id bigint, url text, record_key text, "row" json);
CREATE TABLE crm_bridge.batch (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    worker      text NOT NULL,
    lease_until timestamptz NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    calls       crm_bridge.call[] NOT NULL
) WITH (fillfactor = 50);
-- Out of line but not compressed: pglz took ~10 ms for the array of a 500-call batch (measured),
-- more than the rest of the claim; the row lives for about a second.
ALTER TABLE crm_bridge.batch ALTER COLUMN calls SET STORAGE EXTERNAL;
-- A queue of rows that live about a second: vacuumed often, without cost-based delays, so that
-- its heap and TOAST stay at their working size (the same for the outbox and the queue).
ALTER TABLE crm_bridge.batch SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 200,
    autovacuum_vacuum_cost_delay = 0, toast.autovacuum_vacuum_scale_factor = 0,
    toast.autovacuum_vacuum_threshold = 2000, toast.autovacuum_vacuum_cost_delay = 0);
ALTER TABLE crm_bridge.event SET (autovacuum_vacuum_cost_delay = 0, toast.autovacuum_vacuum_cost_delay = 0);
COMMENT ON TABLE crm_bridge.batch IS 'Calls a daemon is sending now (one row per claim, one lease)';

-- Last success and failure per URL, updated once per URL per record statement.
CREATE TABLE crm_bridge.url_stat (
    trigger_id          bigint PRIMARY KEY REFERENCES crm_bridge.crm_trigger (id) ON DELETE CASCADE,
    last_success_at     timestamptz,
    last_failure_at     timestamptz,
    last_failure_status integer,
    last_failure_error  text
) WITH (fillfactor = 50);

-- ---------------------------------------------------------------------------------------------
-- Compatibility views: crm_bridge.delivery (one row per call, the old columns) and
-- crm_bridge.attempt (failed attempts).  A call is in exactly one of queue, a batch, or history
-- as finished.
-- ---------------------------------------------------------------------------------------------
CREATE VIEW crm_bridge.delivery AS
SELECT q.id, q.event_id, q.object, q.event, q.ids, q.event_created_at, q.trigger_id, q.url, q.record_key,
       q."row", q.ordered, q.status, q.attempts, q.next_attempt_at, q.lease_until, q.worker, q.last_status,
       q.last_error, q.created_at, q.updated_at, q.finished_at
  FROM crm_bridge.queue q
UNION ALL
SELECT c.call_id, c.event_id, c.object, c.event, c.ids, c.event_created_at, c.trigger_id, c.url, c.record_key,
       c."row", false, 'in_flight', 0, b.claimed_at, b.lease_until, b.worker, NULL, NULL, b.claimed_at,
       b.claimed_at, NULL
  FROM crm_bridge.batch b CROSS JOIN LATERAL pg_catalog.unnest(b.calls) c
UNION ALL
SELECT h.call_id, h.event_id, h.object, h.event, h.ids, h.event_created_at, h.trigger_id, t.url, h.record_key,
       h."row", coalesce(t.ordered, false), h.outcome, h.attempt, NULL, NULL, h.worker, h.http_status, h.error,
       h.at, h.at, h.at
  FROM crm_bridge.history h LEFT JOIN crm_bridge.crm_trigger t ON t.id = h.trigger_id
 WHERE h.outcome <> 'failed';
COMMENT ON VIEW crm_bridge.delivery IS
    'One row per call (queue, batches in flight, finished calls in history), with the columns of the old delivery table';

CREATE VIEW crm_bridge.attempt AS
SELECT h.call_id AS delivery_id, h.attempt, h.at, h.duration_ms, h.http_status AS status, h.error, h.worker
  FROM crm_bridge.history h WHERE h.outcome = 'failed';
COMMENT ON VIEW crm_bridge.attempt IS 'Failed attempts (kept in crm_bridge.history for the retention period)';

-- Writes through the delivery view go to the queue (a DBA's UPDATE of a pending or dead call, a
-- DELETE); finished calls are history and only rotation removes them.
CREATE FUNCTION crm_bridge.delivery_write_v1() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.status NOT IN ('pending', 'in_flight', 'dead') THEN
            RAISE EXCEPTION 'crm_bridge.delivery: only pending, in_flight or dead calls can be inserted (got %)', NEW.status
                USING ERRCODE = 'check_violation';
        END IF;
        INSERT INTO crm_bridge.queue (id, event_id, object, event, ids, event_created_at, trigger_id, url, record_key,
                                      "row", ordered, status, attempts, next_attempt_at, lease_until, worker,
                                      last_status, last_error, created_at, updated_at, finished_at)
        VALUES (coalesce(NEW.id, pg_catalog.nextval('crm_bridge.call_id_seq'::pg_catalog.regclass)), NEW.event_id,
                NEW.object, NEW.event, NEW.ids, NEW.event_created_at, NEW.trigger_id, NEW.url,
                coalesce(NEW.record_key, pg_catalog.md5(NEW.ids::text)), NEW."row", coalesce(NEW.ordered, false),
                NEW.status, coalesce(NEW.attempts, 0), NEW.next_attempt_at, NEW.lease_until, NEW.worker,
                NEW.last_status, NEW.last_error, coalesce(NEW.created_at, pg_catalog.now()),
                coalesce(NEW.updated_at, pg_catalog.now()), NEW.finished_at)
        RETURNING * INTO NEW;
        RETURN NEW;
    ELSIF TG_OP = 'UPDATE' THEN
        UPDATE crm_bridge.queue q
           SET event_id = NEW.event_id, object = NEW.object, event = NEW.event, ids = NEW.ids,
               event_created_at = NEW.event_created_at, trigger_id = NEW.trigger_id, url = NEW.url,
               record_key = NEW.record_key, "row" = NEW."row", ordered = NEW.ordered, status = NEW.status,
               attempts = NEW.attempts, next_attempt_at = NEW.next_attempt_at, lease_until = NEW.lease_until,
               worker = NEW.worker, last_status = NEW.last_status, last_error = NEW.last_error,
               updated_at = pg_catalog.now(), finished_at = NEW.finished_at
         WHERE q.id = OLD.id;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'crm_bridge.delivery: call % is %: only waiting and dead calls (crm_bridge.queue) can be changed',
                OLD.id, CASE WHEN OLD.status = 'in_flight' THEN 'being sent by a daemon' ELSE 'finished (history)' END
                USING ERRCODE = 'object_not_in_prerequisite_state';
        END IF;
        RETURN NEW;
    ELSE
        DELETE FROM crm_bridge.queue q WHERE q.id = OLD.id;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'crm_bridge.delivery: call % is %: only waiting and dead calls (crm_bridge.queue) can be deleted',
                OLD.id, CASE WHEN OLD.status = 'in_flight' THEN 'being sent by a daemon' ELSE 'finished (history)' END
                USING ERRCODE = 'object_not_in_prerequisite_state';
        END IF;
        RETURN OLD;
    END IF;
END
$$;
CREATE TRIGGER delivery_write INSTEAD OF INSERT OR UPDATE OR DELETE ON crm_bridge.delivery
    FOR EACH ROW EXECUTE FUNCTION crm_bridge.delivery_write_v1();

-- ---------------------------------------------------------------------------------------------
-- Status views (columns as before).  in_flight counts calls in batches too; the last success and
-- failure come from url_stat.
-- ---------------------------------------------------------------------------------------------
CREATE VIEW crm_bridge.url_queue AS
WITH batched AS (
    SELECT c.trigger_id, count(*) AS in_flight, min(c.event_created_at) AS oldest_at
      FROM crm_bridge.batch b CROSS JOIN LATERAL unnest(b.calls) c
     GROUP BY c.trigger_id
)
SELECT t.id, t.object, t.event, crm_bridge.redact_url(t.url) AS url, t.enabled, t.paused,
       CASE WHEN NOT t.enabled THEN 'disabled' WHEN t.paused THEN 'paused' ELSE 'active' END AS state,
       p.pending, p.retrying, i.in_flight + coalesce(bt.in_flight, 0) AS in_flight, d.dead,
       least(p.oldest_at, i.oldest_at, bt.oldest_at)                     AS oldest_pending_at,
       crm_bridge.age_of(least(p.oldest_at, i.oldest_at, bt.oldest_at)) AS oldest_pending_age,
       d.last_dead_at
  FROM crm_bridge.crm_trigger t
  LEFT JOIN batched bt ON bt.trigger_id = t.id
 CROSS JOIN LATERAL (
       SELECT count(*) AS pending, count(*) FILTER (WHERE x.attempts > 0) AS retrying,
              min(x.event_created_at) AS oldest_at
         FROM crm_bridge.queue x WHERE x.trigger_id = t.id AND x.status = 'pending') p
 CROSS JOIN LATERAL (
       SELECT count(*) AS in_flight, min(x.event_created_at) AS oldest_at
         FROM crm_bridge.queue x WHERE x.trigger_id = t.id AND x.status = 'in_flight') i
 CROSS JOIN LATERAL (
       SELECT count(*) AS dead, max(x.finished_at) AS last_dead_at
         FROM crm_bridge.queue x WHERE x.trigger_id = t.id AND x.status = 'dead') d;
COMMENT ON VIEW crm_bridge.url_queue IS
    'Per configured URL (redacted): pending, retrying, in-flight and dead deliveries, oldest undelivered event';

CREATE VIEW crm_bridge.url_status AS
SELECT q.*, s.last_success_at, s.last_failure_at, s.last_failure_status, s.last_failure_error
  FROM crm_bridge.url_queue q
  LEFT JOIN crm_bridge.url_stat s ON s.trigger_id = q.id;
COMMENT ON VIEW crm_bridge.url_status IS 'url_queue plus the last success and the last failed attempt per URL';

CREATE VIEW crm_bridge.summary AS
WITH outbox AS (
    SELECT coalesce(sum(coalesce(n_records, 1)), 0)::bigint AS backlog,
           (SELECT e.created_at FROM crm_bridge.event e ORDER BY e.id LIMIT 1) AS oldest_at
      FROM crm_bridge.event
), batched AS (
    SELECT count(*) AS in_flight, min(c.event_created_at) AS oldest_at
      FROM crm_bridge.batch b CROSS JOIN LATERAL unnest(b.calls) c
), counts AS (
    SELECT (SELECT count(*) FROM crm_bridge.queue WHERE status = 'pending')   AS pending,
           (SELECT count(*) FROM crm_bridge.queue WHERE status = 'pending' AND attempts > 0) AS retrying,
           (SELECT count(*) FROM crm_bridge.queue WHERE status = 'in_flight') AS in_flight,
           (SELECT count(*) FROM crm_bridge.queue WHERE status = 'dead')      AS dead
), waiting AS (
    SELECT min(x.event_created_at) AS oldest_at
      FROM crm_bridge.queue x
      JOIN crm_bridge.crm_trigger t ON t.id = x.trigger_id AND t.enabled AND NOT t.paused
     WHERE x.status IN ('pending', 'in_flight')
)
SELECT o.backlog,
       crm_bridge.age_of(o.oldest_at)                                      AS oldest_event_age,
       c.pending, c.retrying, c.in_flight + b.in_flight AS in_flight, c.dead,
       crm_bridge.age_of(least(o.oldest_at, w.oldest_at, b.oldest_at))     AS oldest_pending_age,
       (SELECT count(*) FROM crm_bridge.crm_trigger WHERE enabled AND NOT paused) AS active_urls,
       (SELECT count(*) FROM pg_catalog.pg_stat_activity
         WHERE datname = current_database() AND application_name = 'crm-bridge listener') AS daemons,
       now() AS at
  FROM outbox o, counts c, waiting w, batched b;
COMMENT ON VIEW crm_bridge.summary IS
    'One row: backlog, pending/retrying/in-flight/dead deliveries, oldest pending age, daemons connected';

CREATE OR REPLACE VIEW crm_bridge.backlog AS
SELECT e.object, e.event,
       sum(coalesce(e.n_records, 1))::bigint         AS events,
       min(e.created_at)                              AS oldest_at,
       crm_bridge.age_of(min(e.created_at))          AS oldest_age
  FROM crm_bridge.event e
 GROUP BY e.object, e.event;

CREATE VIEW crm_bridge.dead_letter AS
SELECT d.id AS delivery_id, d.trigger_id, d.object, d.event,
       array_to_string(ARRAY(SELECT p || '=' || coalesce(v, 'NULL')
                               FROM unnest(o.id_params, d.ids) AS x(p, v)), '&') AS ids,
       crm_bridge.redact_url(coalesce(t.url, d.url)) AS url,
       d.attempts, d.last_status, d.last_error,
       d.event_created_at, d.finished_at AS died_at
  FROM crm_bridge.queue d
  JOIN crm_bridge.object_type o ON o.object = d.object
  LEFT JOIN crm_bridge.crm_trigger t ON t.id = d.trigger_id
 WHERE d.status = 'dead';
COMMENT ON VIEW crm_bridge.dead_letter IS
    'Deliveries that were given up: the call''s IDs, its URL (redacted), attempts and the last error';

-- ---------------------------------------------------------------------------------------------
-- Dead letters (in the queue): list, replay, purge; retry_now.  Signatures as before.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION crm_bridge.dead_letters(
    p_trigger_id bigint DEFAULT NULL, p_url text DEFAULT NULL, p_object text DEFAULT NULL,
    p_since timestamptz DEFAULT NULL, p_until timestamptz DEFAULT NULL, p_ids bigint[] DEFAULT NULL)
RETURNS SETOF crm_bridge.queue
LANGUAGE sql STABLE
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
    SELECT d.* FROM crm_bridge.queue d
     WHERE d.status = 'dead'
       AND (p_trigger_id IS NULL OR d.trigger_id = p_trigger_id)
       AND (p_url IS NULL OR d.url = p_url
            OR d.trigger_id IN (SELECT t.id FROM crm_bridge.crm_trigger t WHERE t.url = p_url))
       AND (p_object IS NULL OR d.object = p_object)
       AND (p_since IS NULL OR d.event_created_at >= p_since)
       AND (p_until IS NULL OR d.event_created_at < p_until)
       AND (p_ids IS NULL OR d.id = ANY (p_ids))
$$;
COMMENT ON FUNCTION crm_bridge.dead_letters(bigint, text, text, timestamptz, timestamptz, bigint[]) IS
    'Dead deliveries matching the filters (NULL = any); time range applies to when the change happened';

CREATE FUNCTION crm_bridge.replay(
    p_trigger_id bigint DEFAULT NULL, p_url text DEFAULT NULL, p_object text DEFAULT NULL,
    p_since timestamptz DEFAULT NULL, p_until timestamptz DEFAULT NULL, p_ids bigint[] DEFAULT NULL,
    p_limit integer DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    WITH picked AS (
        SELECT x.id FROM crm_bridge.dead_letters(p_trigger_id, p_url, p_object, p_since, p_until, p_ids) x
         WHERE x.trigger_id IS NOT NULL
         ORDER BY x.id LIMIT p_limit)
    UPDATE crm_bridge.queue d
       SET status = 'pending', attempts = 0, next_attempt_at = now(), finished_at = NULL,
           lease_until = NULL, updated_at = now()
      FROM picked WHERE d.id = picked.id AND d.status = 'dead';
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
COMMENT ON FUNCTION crm_bridge.replay(bigint, text, text, timestamptz, timestamptz, bigint[], integer) IS
    'Queue matching dead letters again (attempts restart at 0; failed attempts stay in crm_bridge.history)';

CREATE FUNCTION crm_bridge.purge(
    p_trigger_id bigint DEFAULT NULL, p_url text DEFAULT NULL, p_object text DEFAULT NULL,
    p_since timestamptz DEFAULT NULL, p_until timestamptz DEFAULT NULL, p_ids bigint[] DEFAULT NULL,
    p_limit integer DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    DELETE FROM crm_bridge.queue d
     WHERE d.id IN (SELECT x.id FROM crm_bridge.dead_letters(p_trigger_id, p_url, p_object, p_since, p_until, p_ids) x
                     ORDER BY x.id LIMIT p_limit)
       AND d.status = 'dead';
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
COMMENT ON FUNCTION crm_bridge.purge(bigint, text, text, timestamptz, timestamptz, bigint[], integer) IS
    'Delete matching dead letters (their failed attempts stay in crm_bridge.history until it is rotated)';

CREATE OR REPLACE FUNCTION crm_bridge.retry_now(
    p_trigger_id bigint DEFAULT NULL, p_url text DEFAULT NULL, p_object text DEFAULT NULL,
    p_ids bigint[] DEFAULT NULL, p_record text[] DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    UPDATE crm_bridge.queue d
       SET next_attempt_at = pg_catalog.now(), updated_at = pg_catalog.now()
     WHERE d.status = 'pending'
       AND d.next_attempt_at > pg_catalog.now()
       AND (p_trigger_id IS NULL OR d.trigger_id = p_trigger_id)
       AND (p_url IS NULL OR d.url = p_url
            OR d.trigger_id IN (SELECT t.id FROM crm_bridge.crm_trigger t WHERE t.url = p_url))
       AND (p_object IS NULL OR d.object = p_object)
       AND (p_ids IS NULL OR d.id = ANY (p_ids))
       AND (p_record IS NULL OR d.ids = p_record);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- The key of a record's calls: what history_record_idx is built on.
CREATE FUNCTION crm_bridge.record_key(ids text[]) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$ SELECT pg_catalog.md5(ids::text) $$;
COMMENT ON FUNCTION crm_bridge.record_key(text[]) IS
    'The key of a record''s calls in crm_bridge.history (its IDs in id_params order): WHERE record_key = crm_bridge.record_key(ARRAY[...])';

-- ---------------------------------------------------------------------------------------------
-- The daemon's functions.  Old ones whose shape changed go.
-- ---------------------------------------------------------------------------------------------
DROP FUNCTION crm_bridge.daemon_dispatch(integer, integer, interval, text, bigint[], integer[], integer, bigint[]);
DROP TYPE crm_bridge.dispatched;
DROP FUNCTION crm_bridge.daemon_heartbeat(text, bigint[], interval);
DROP FUNCTION crm_bridge.daemon_retention(interval, integer);
DROP FUNCTION crm_bridge.daemon_claim_due(integer, interval, text, bigint[], integer[], integer);
DROP TYPE crm_bridge.claimed;

-- What a claimed call looks like to the daemon (claim and claim_due return the same columns).
-- batch_id: the batch that holds it, NULL for a call held one by one in the queue.  claim sends
-- a URL's settings (url ... signing_secret) only on the first of its calls in the result.
CREATE TYPE crm_bridge.claimed AS (
    batch_id bigint, id bigint, event_id bigint, object text, event text, ids text[], event_created_at timestamptz,
    status text, attempts integer, trigger_id bigint, url text, timeout_ms integer, max_attempts integer,
    retry_schedule float8[], max_in_flight integer, id_params text[], ordered boolean, method text,
    headers text, follow_redirects boolean, signing_secret text, "row" text);
-- claim: the same after three counts (on every row; one row with NULL call fields when nothing
-- was claimed).
CREATE TYPE crm_bridge.dispatched AS (
    n_events bigint, n_pending bigint, n_unrouted bigint,
    batch_id bigint, id bigint, event_id bigint, object text, event text, ids text[], event_created_at timestamptz,
    status text, attempts integer, trigger_id bigint, url text, timeout_ms integer, max_attempts integer,
    retry_schedule float8[], max_in_flight integer, id_params text[], ordered boolean, method text,
    headers text, follow_redirects boolean, signing_secret text, "row" text);

-- ---------------------------------------------------------------------------------------------
-- claim: take the next outbox events in two lanes -- one-record events up to p_batch, and bulk
-- statement captures up to about p_bulk_records records (at least one event) -- route each record
-- to its URLs, and hand the sendable calls to this worker as ONE batch row.  A bulk import
-- therefore never holds up the one-record events committed after it (they come in the next
-- claim), and each bulk chunk is expanded once, in linear time.
--   fast     -> the batch (returned with its batch_id)
--   held     -> queue in_flight for this worker (ordered URLs: one call per record at a time)
--   pending  -> queue (paused URL; ordered call that must wait for an earlier one)
--   unrouted, coalesced -> history
-- Per-URL limits (max_in_flight) are applied by the daemon to the calls it holds.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION crm_bridge.daemon_claim(
    p_batch integer, p_bulk_records integer, p_lease interval, p_worker text, p_only bigint[] DEFAULT NULL)
RETURNS SETOF crm_bridge.dispatched
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $fn$
BEGIN
    RETURN QUERY
    WITH small AS (
        SELECT e.id FROM crm_bridge.event e
         WHERE e.n_records IS NULL AND (p_only IS NULL OR e.id = ANY (p_only))
         ORDER BY e.id LIMIT p_batch
           FOR UPDATE SKIP LOCKED
    ), bulk_window AS (
        SELECT e.id, e.n_records FROM crm_bridge.event e
         WHERE e.n_records IS NOT NULL AND (p_only IS NULL OR e.id = ANY (p_only))
         ORDER BY e.id LIMIT 64
           FOR UPDATE SKIP LOCKED
    ), picked AS (
        SELECT s.id FROM small s
        UNION ALL
        SELECT w.id FROM (
            SELECT w.id, w.n_records,
                   pg_catalog.sum(w.n_records) OVER (ORDER BY w.id) AS cum
              FROM bulk_window w) w
         WHERE w.cum <= p_bulk_records OR w.cum = w.n_records   -- at least the first one
    ), ev AS (
        DELETE FROM crm_bridge.event e USING picked WHERE e.id = picked.id
        RETURNING e.id, e.object, e.event, e.ids, e.created_at, e.origin_role, e.origin, e.changed, e.rows,
                  pg_catalog.array_ndims(e.ids) AS ndims, pg_catalog.array_length(e.ids, 2) AS width
    ), rec AS (
        SELECT ev.id, ev.object, ev.event, ev.created_at, ev.origin_role, ev.origin, ev.changed,
               1::bigint AS rec_no, ev.ids, ev.rows OPERATOR(pg_catalog.->) 0 AS row_data
          FROM ev WHERE ev.ndims IS DISTINCT FROM 2
        UNION ALL
        SELECT ev.id, ev.object, ev.event, ev.created_at, ev.origin_role, ev.origin, ev.changed,
               x.rec_no, x.ids, x.row_data
          FROM ev
         CROSS JOIN LATERAL (
               SELECT g.rec_no, g.ids, j.value AS row_data
                 FROM (SELECT (u.n - 1) / ev.width + 1 AS rec_no,
                              pg_catalog.array_agg(u.v ORDER BY u.n) AS ids
                         FROM pg_catalog.unnest(ev.ids) WITH ORDINALITY AS u(v, n)
                        GROUP BY 1) g
                 LEFT JOIN pg_catalog.json_array_elements(
                                CASE WHEN pg_catalog.json_typeof(ev.rows) = 'array' THEN ev.rows END)
                           WITH ORDINALITY AS j(value, n) ON j.n = g.rec_no) x
         WHERE ev.ndims = 2
    ), keyed AS (
        SELECT rec.*, pg_catalog.md5(rec.ids::text) AS record_key FROM rec
    ), routed AS (
        SELECT ev.*, t.id AS trigger_id, t.url, t.paused, t.ordered, t.coalesce_edits, t.include_row,
               pg_catalog.row_number() OVER (PARTITION BY t.id, ev.record_key ORDER BY ev.id, ev.rec_no) AS n_record,
               pg_catalog.row_number() OVER by_record_event AS n_record_event,
               pg_catalog.last_value(ev.row_data) OVER (by_record_event
                   ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING) AS last_row
          FROM keyed ev
          LEFT JOIN crm_bridge.crm_trigger t
                 ON t.object = ev.object AND t.event = ev.event AND t.enabled
                AND (ev.origin_role IS NULL OR t.exclude_roles IS NULL OR NOT ev.origin_role = ANY (t.exclude_roles))
                AND (ev.origin IS NULL OR t.exclude_origins IS NULL OR NOT ev.origin = ANY (t.exclude_origins))
                AND (t.only_columns IS NULL OR ev.changed IS NULL OR ev.changed && t.only_columns)
        WINDOW by_record_event AS (PARTITION BY t.id, ev.record_key, ev.event ORDER BY ev.id, ev.rec_no)
    ), decided AS (
        SELECT r.*,
               CASE WHEN r.trigger_id IS NULL THEN 'unrouted'
                    -- An edit whose record already has an unsent edit call (queued, or earlier in
                    -- this claim) needs no call of its own: the receiver reads the current record.
                    WHEN r.coalesce_edits AND r.event = 'edit'
                         AND (r.n_record_event > 1
                              OR EXISTS (SELECT 1 FROM crm_bridge.queue y
                                          WHERE y.trigger_id = r.trigger_id AND y.record_key = r.record_key
                                            AND y.status = 'pending' AND y.event = 'edit')) THEN 'coalesced'
                    WHEN r.paused THEN 'pending'
                    -- Ordered URLs: one call per record at a time, in commit (= event id) order,
                    -- always through the queue (where the next claim can see it).  An earlier
                    -- event of the record still in the outbox is being claimed by another daemon
                    -- right now: wait for it too.
                    WHEN r.ordered
                         AND (r.n_record > 1
                              OR EXISTS (SELECT 1 FROM crm_bridge.queue y
                                          WHERE y.ordered AND y.trigger_id = r.trigger_id
                                            AND y.record_key = r.record_key
                                            AND y.status IN ('pending', 'in_flight'))
                              OR EXISTS (SELECT 1 FROM crm_bridge.event e2
                                          WHERE e2.id < r.id AND e2.object = r.object
                                            AND (e2.ids = r.ids OR e2.n_records IS NOT NULL))) THEN 'pending'
                    WHEN r.ordered THEN 'held'
                    ELSE 'fast' END AS kind,
               CASE WHEN NOT coalesce(r.include_row, false) THEN NULL
                    WHEN r.coalesce_edits AND r.event = 'edit' AND r.row_data IS NOT NULL
                    THEN pg_catalog.json_build_object('old', r.row_data OPERATOR(pg_catalog.->) 'old',
                                                      'new', r.last_row OPERATOR(pg_catalog.->) 'new')
                    ELSE r.row_data END AS send_row
          FROM routed r
    ), numbered AS (
        SELECT d.*, pg_catalog.nextval('crm_bridge.call_id_seq'::pg_catalog.regclass) AS call_id
          FROM (SELECT * FROM decided ORDER BY decided.id, decided.rec_no, decided.trigger_id) d
    ), refreshed AS (
        -- Edits folded into a call queued earlier: that call now sends the newest row.
        UPDATE crm_bridge.queue y
           SET "row" = pg_catalog.json_build_object('old', y."row" OPERATOR(pg_catalog.->) 'old',
                                                    'new', c.last_row OPERATOR(pg_catalog.->) 'new'),
               updated_at = now()
          FROM (SELECT DISTINCT ON (d.trigger_id, d.record_key) d.trigger_id, d.record_key, d.last_row
                  FROM numbered d
                 WHERE d.kind = 'coalesced' AND d.include_row AND d.last_row IS NOT NULL) c
         WHERE y.trigger_id = c.trigger_id AND y.record_key = c.record_key
           AND y.status = 'pending' AND y.event = 'edit'
        RETURNING y.id
    ), queued AS (
        INSERT INTO crm_bridge.queue (id, event_id, object, event, ids, event_created_at, trigger_id, url,
                                      record_key, ordered, status, next_attempt_at, lease_until, worker, "row")
        SELECT n.call_id, n.id, n.object, n.event, n.ids, n.created_at, n.trigger_id, n.url, n.record_key,
               coalesce(n.ordered, false), CASE n.kind WHEN 'held' THEN 'in_flight' ELSE 'pending' END, now(),
               CASE WHEN n.kind = 'held' THEN now() + p_lease END,
               CASE WHEN n.kind = 'held' THEN p_worker END, n.send_row
          FROM numbered n WHERE n.kind IN ('pending', 'held')
         ORDER BY n.call_id
        RETURNING id
    ), finished AS (
        INSERT INTO crm_bridge.history (at, call_id, event_id, trigger_id, object, event, ids, event_created_at,
                                        record_key, outcome, error, worker)
        SELECT now(), n.call_id, n.id, n.trigger_id, n.object, n.event, n.ids, n.created_at, n.record_key, n.kind,
               CASE n.kind WHEN 'coalesced' THEN 'folded into an earlier unsent edit call for this record' END,
               p_worker
          FROM numbered n WHERE n.kind IN ('unrouted', 'coalesced')
        RETURNING 1
    ), b AS (
        INSERT INTO crm_bridge.batch (worker, lease_until, calls)
        SELECT p_worker, now() + p_lease,
               pg_catalog.array_agg(ROW(n.call_id, n.id, n.object, n.event, n.ids, n.created_at, n.trigger_id,
                                        n.url, n.record_key, n.send_row)::crm_bridge.call ORDER BY n.call_id)
          FROM numbered n WHERE n.kind = 'fast'
        HAVING pg_catalog.count(*) > 0
        RETURNING batch.id
    ), counts AS (
        SELECT (SELECT pg_catalog.count(*) FROM ev) AS n_events,
               (SELECT pg_catalog.count(*) FROM numbered n WHERE n.kind = 'pending') AS n_pending,
               (SELECT pg_catalog.count(*) FROM numbered n WHERE n.kind = 'unrouted') AS n_unrouted,
               (SELECT pg_catalog.count(*) FROM queued) + (SELECT pg_catalog.count(*) FROM finished)
             + (SELECT pg_catalog.count(*) FROM refreshed) AS n_written
    ), cfg AS (
        -- Each URL's call settings once per claim, on the first of its calls (the lowest id) only:
        -- sent for every call they cost the server about 10 us per call (measured).  The daemon
        -- takes them for the following calls of the same URL from that row.
        SELECT t.id, f.first_call, t.url, t.timeout_ms, t.max_attempts,
               crm_bridge.retry_seconds(t.retry_schedule) AS retry_schedule, t.max_in_flight, o.id_params, t.method,
               t.headers::text AS headers, t.follow_redirects,
               (SELECT s.secret FROM crm_bridge.signing_secret s WHERE s.trigger_id = t.id) AS signing_secret
          FROM (SELECT n.trigger_id, min(n.call_id) AS first_call FROM numbered n
                 WHERE n.kind IN ('fast', 'held') GROUP BY n.trigger_id) f
          JOIN crm_bridge.crm_trigger t ON t.id = f.trigger_id
          JOIN crm_bridge.object_type o ON o.object = t.object
    )
    SELECT c.n_events, c.n_pending, c.n_unrouted, x.*
      FROM counts c
      LEFT JOIN (
          SELECT CASE WHEN n.kind = 'fast' THEN (SELECT b.id FROM b) END AS batch_id, n.call_id AS id,
                 n.id AS event_id, n.object, n.event, n.ids, crm_bridge.loadable_time(n.created_at) AS event_created_at,
                 'in_flight'::text AS status, 0 AS attempts, t.id AS trigger_id,
                 CASE WHEN n.call_id = t.first_call THEN t.url END AS url,
                 CASE WHEN n.call_id = t.first_call THEN t.timeout_ms END AS timeout_ms,
                 CASE WHEN n.call_id = t.first_call THEN t.max_attempts END AS max_attempts,
                 CASE WHEN n.call_id = t.first_call THEN t.retry_schedule END AS retry_schedule,
                 CASE WHEN n.call_id = t.first_call THEN t.max_in_flight END AS max_in_flight,
                 CASE WHEN n.call_id = t.first_call THEN t.id_params END AS id_params,
                 coalesce(n.ordered, false) AS ordered,
                 CASE WHEN n.call_id = t.first_call THEN t.method END AS method,
                 CASE WHEN n.call_id = t.first_call THEN t.headers END AS headers,
                 CASE WHEN n.call_id = t.first_call THEN t.follow_redirects END AS follow_redirects,
                 CASE WHEN n.call_id = t.first_call THEN t.signing_secret END AS signing_secret,
                 n.send_row::text AS "row"
            FROM numbered n
            JOIN cfg t ON t.id = n.trigger_id
           WHERE n.kind IN ('fast', 'held')
      ) x ON c.n_written >= 0
     ORDER BY x.id;
END
$fn$;
COMMENT ON FUNCTION crm_bridge.daemon_claim(integer, integer, interval, text, bigint[]) IS
    'Daemon only: claim outbox events as one batch of calls (p_only: exactly these events)';

-- An event that cannot be claimed even alone: out of the outbox, into the dead letters (no URL),
-- with the reason, so that everything behind it flows.
CREATE OR REPLACE FUNCTION crm_bridge.daemon_quarantine_event(p_event_id bigint, p_error text) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    WITH ev AS (DELETE FROM crm_bridge.event e WHERE e.id = p_event_id RETURNING e.*)
    INSERT INTO crm_bridge.queue (event_id, object, event, ids, event_created_at, record_key, status,
                                  finished_at, last_error)
    SELECT ev.id, ev.object, ev.event,
           CASE WHEN pg_catalog.array_ndims(ev.ids) = 2 AND pg_catalog.array_length(ev.ids, 1) = 1
                THEN ARRAY(SELECT pg_catalog.unnest(ev.ids)) ELSE ev.ids END,
           ev.created_at, pg_catalog.md5(ev.ids::text), 'dead', now(),
           pg_catalog.left('could not be dispatched: ' || coalesce(p_error, 'unknown error'), 1000)
      FROM ev;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n > 0;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- claim_due: queued calls whose next attempt is due, per URL at most its free slots.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION crm_bridge.daemon_claim_due(
    p_batch integer, p_lease interval, p_worker text, p_busy_ids bigint[], p_busy_free integer[],
    p_default_limit integer)
RETURNS SETOF crm_bridge.claimed
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $fn$
BEGIN
    RETURN QUERY
    UPDATE crm_bridge.queue d
       SET status = 'in_flight', lease_until = now() + p_lease, worker = p_worker, updated_at = now()
      FROM crm_bridge.crm_trigger t, crm_bridge.object_type o
     WHERE d.id = ANY (ARRAY(
               SELECT p.id
                 FROM crm_bridge.crm_trigger pt
                 LEFT JOIN ROWS FROM (pg_catalog.unnest(p_busy_ids), pg_catalog.unnest(p_busy_free)) AS f(trigger_id, free)
                        ON f.trigger_id = pt.id
                CROSS JOIN LATERAL (
                      SELECT x.id FROM crm_bridge.queue x
                       WHERE x.trigger_id = pt.id AND x.status = 'pending' AND x.next_attempt_at <= now()
                         AND (NOT x.ordered OR (
                              NOT EXISTS (SELECT 1 FROM crm_bridge.queue y
                                           WHERE y.ordered AND y.trigger_id = x.trigger_id
                                             AND y.record_key = x.record_key
                                             AND y.status IN ('pending', 'in_flight') AND y.event_id < x.event_id)
                              AND NOT EXISTS (SELECT 1 FROM crm_bridge.event e2
                                               WHERE e2.id < x.event_id AND e2.object = x.object
                                                 AND (e2.ids = x.ids OR e2.n_records IS NOT NULL))))
                       ORDER BY x.next_attempt_at, x.id
                       LIMIT least(coalesce(f.free, pt.max_in_flight, p_default_limit), p_batch)
                         FOR UPDATE SKIP LOCKED) p
                WHERE pt.enabled AND NOT pt.paused
                LIMIT p_batch))
       AND t.id = d.trigger_id AND o.object = d.object
    RETURNING NULL::bigint, d.id, d.event_id, d.object, d.event, d.ids, crm_bridge.loadable_time(d.event_created_at),
              d.status, d.attempts, t.id, t.url, t.timeout_ms, t.max_attempts,
              crm_bridge.retry_seconds(t.retry_schedule), t.max_in_flight, o.id_params, d.ordered, t.method,
              t.headers::text, t.follow_redirects,
              (SELECT s.secret FROM crm_bridge.signing_secret s WHERE s.trigger_id = t.id),
              d."row"::text;
END
$fn$;

-- ---------------------------------------------------------------------------------------------
-- Recording outcomes.  Status per call: delivered | pending (failed, retry after delay) | dead,
-- and for batch calls also running (still being sent: held one by one in the queue from now on)
-- and waiting (not started: back to the queue for anyone).  Failed attempts get a history row.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION crm_bridge.check_statuses_v1(p_statuses text[], p_allowed text[]) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.unnest(p_statuses) s WHERE s IS NULL OR NOT s = ANY (p_allowed)) THEN
        RAISE EXCEPTION 'a status must be one of %', pg_catalog.array_to_string(p_allowed, ', ')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- Last success / failure per URL from a set of outcomes.
CREATE FUNCTION crm_bridge.note_url_stats_v1(p_trigger_ids bigint[], p_statuses text[], p_attempted integer[],
                                            p_http_status integer[], p_errors text[]) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
    INSERT INTO crm_bridge.url_stat AS s (trigger_id, last_success_at, last_failure_at, last_failure_status,
                                          last_failure_error)
    SELECT r.trigger_id,
           CASE WHEN bool_or(r.status = 'delivered') THEN now() END,
           CASE WHEN bool_or(r.status <> 'delivered' AND r.attempted > 0) THEN now() END,
           (array_agg(r.http_status) FILTER (WHERE r.status <> 'delivered' AND r.attempted > 0))[1],
           (array_agg(pg_catalog.left(r.error, 1000)) FILTER (WHERE r.status <> 'delivered' AND r.attempted > 0))[1]
      FROM ROWS FROM (pg_catalog.unnest(p_trigger_ids), pg_catalog.unnest(p_statuses), pg_catalog.unnest(p_attempted),
                      pg_catalog.unnest(p_http_status), pg_catalog.unnest(p_errors))
           AS r(trigger_id, status, attempted, http_status, error)
      JOIN crm_bridge.crm_trigger t ON t.id = r.trigger_id
     WHERE r.status IN ('delivered', 'pending', 'dead')
     GROUP BY r.trigger_id
    HAVING bool_or(r.status = 'delivered') OR bool_or(r.attempted > 0)
    ON CONFLICT (trigger_id) DO UPDATE
       SET last_success_at = coalesce(EXCLUDED.last_success_at, s.last_success_at),
           last_failure_at = coalesce(EXCLUDED.last_failure_at, s.last_failure_at),
           last_failure_status = CASE WHEN EXCLUDED.last_failure_at IS NOT NULL THEN EXCLUDED.last_failure_status
                                      ELSE s.last_failure_status END,
           last_failure_error = CASE WHEN EXCLUDED.last_failure_at IS NOT NULL THEN EXCLUDED.last_failure_error
                                     ELSE s.last_failure_error END
$$;

-- record: the outcomes of one batch.  The batch row goes (only if this worker still holds it: a
-- batch whose lease expired was given back to the queue and is not recorded twice); each call
-- becomes history (delivered) or a queue row.  A call of the batch without an outcome goes back
-- to the queue: nothing is lost.  Returns how many calls were recorded (0: batch not held).
CREATE FUNCTION crm_bridge.daemon_record(
    p_worker text, p_batch bigint, p_ids bigint[], p_statuses text[], p_attempted integer[],
    p_http_status integer[], p_errors text[], p_delays float8[], p_durations integer[], p_lease interval)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $fn$
DECLARE
    n          bigint;
    v_triggers bigint[];
    v_statuses text[];
    v_attempted integer[];
    v_http     integer[];
    v_errors   text[];
BEGIN
    PERFORM crm_bridge.check_statuses_v1(p_statuses, ARRAY['delivered', 'pending', 'dead', 'running', 'waiting']);
    WITH b AS (
        DELETE FROM crm_bridge.batch x WHERE x.id = p_batch AND x.worker = p_worker RETURNING x.calls
    ), r AS (
        SELECT * FROM ROWS FROM (pg_catalog.unnest(p_ids), pg_catalog.unnest(p_statuses),
                                 pg_catalog.unnest(p_attempted), pg_catalog.unnest(p_http_status),
                                 pg_catalog.unnest(p_errors), pg_catalog.unnest(p_delays),
                                 pg_catalog.unnest(p_durations))
                   AS r(id, status, attempted, http_status, error, delay, duration_ms)
    ), j AS (
        SELECT c.*, coalesce(r.status, 'waiting') AS status, coalesce(r.attempted, 0) AS attempted, r.http_status,
               pg_catalog.left(r.error, 1000) AS error,
               least(greatest(coalesce(r.delay, 0), 0), crm_bridge.max_retry_delay()) AS delay, r.duration_ms,
               t.id AS live_trigger_id, t.include_row
          FROM b CROSS JOIN LATERAL pg_catalog.unnest(b.calls) c
          LEFT JOIN r ON r.id = c.call_id
          LEFT JOIN crm_bridge.crm_trigger t ON t.id = c.trigger_id
    ), h AS (
        INSERT INTO crm_bridge.history (at, call_id, event_id, trigger_id, object, event, ids, event_created_at,
                                        record_key, outcome, attempt, http_status, duration_ms, error, worker, "row")
        SELECT now(), j.call_id, j.event_id, j.trigger_id, j.object, j.event, j.ids, j.event_created_at,
               j.record_key, CASE WHEN j.status = 'delivered' THEN 'delivered' ELSE 'failed' END, 1, j.http_status,
               j.duration_ms, CASE WHEN j.status <> 'delivered' THEN j.error END, p_worker,
               CASE WHEN j.status = 'delivered' AND j.include_row THEN j."row" END
          FROM j
         WHERE j.status = 'delivered' OR (j.status IN ('pending', 'dead') AND j.attempted > 0)
    ), q AS (
        INSERT INTO crm_bridge.queue (id, event_id, object, event, ids, event_created_at, trigger_id, url, record_key,
                                      "row", status, attempts, next_attempt_at, lease_until, worker, last_status,
                                      last_error, finished_at)
        SELECT j.call_id, j.event_id, j.object, j.event, j.ids, j.event_created_at, j.live_trigger_id, j.url,
               j.record_key, j."row",
               CASE j.status WHEN 'dead' THEN 'dead' WHEN 'running' THEN 'in_flight' ELSE 'pending' END,
               j.attempted,
               CASE WHEN j.status IN ('pending', 'waiting', 'running') THEN now() + j.delay * interval '1 second' END,
               CASE WHEN j.status = 'running' THEN now() + p_lease END,
               CASE WHEN j.status IN ('running', 'pending', 'dead') THEN p_worker END,
               j.http_status,
               CASE WHEN j.attempted > 0 OR j.status = 'dead' THEN j.error END,
               CASE WHEN j.status = 'dead' THEN now() END
          FROM j
         WHERE j.status <> 'delivered'
         ORDER BY j.call_id
    )
    SELECT pg_catalog.count(*), pg_catalog.array_agg(j.live_trigger_id), pg_catalog.array_agg(j.status),
           pg_catalog.array_agg(j.attempted), pg_catalog.array_agg(j.http_status), pg_catalog.array_agg(j.error)
      INTO n, v_triggers, v_statuses, v_attempted, v_http, v_errors FROM j;
    IF n > 0 THEN
        PERFORM crm_bridge.note_url_stats_v1(v_triggers, v_statuses, v_attempted, v_http, v_errors);
    END IF;
    RETURN n;
END
$fn$;
COMMENT ON FUNCTION crm_bridge.daemon_record(text, bigint, bigint[], text[], integer[], integer[], text[], float8[], integer[], interval) IS
    'Daemon only: record the outcomes of one batch this worker holds (delivered -> history; others -> queue)';

-- complete: outcomes of calls held one by one in the queue.  Delivered ones leave the queue for
-- history; the others are updated in place.  Rows whose lease this worker lost are left alone.
CREATE OR REPLACE FUNCTION crm_bridge.daemon_complete(
    p_worker text, p_ids bigint[], p_statuses text[], p_attempted integer[], p_http_status integer[],
    p_errors text[], p_delays float8[], p_durations integer[])
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $fn$
DECLARE
    n          bigint;
    v_triggers bigint[];
    v_statuses text[];
    v_attempted integer[];
    v_http     integer[];
    v_errors   text[];
BEGIN
    PERFORM crm_bridge.check_statuses_v1(p_statuses, ARRAY['delivered', 'pending', 'dead']);
    WITH r AS (
        SELECT * FROM ROWS FROM (pg_catalog.unnest(p_ids), pg_catalog.unnest(p_statuses),
                                 pg_catalog.unnest(p_attempted), pg_catalog.unnest(p_http_status),
                                 pg_catalog.unnest(p_errors), pg_catalog.unnest(p_delays),
                                 pg_catalog.unnest(p_durations))
                   AS r(id, status, attempted, http_status, error, delay, duration_ms)
    ), gone AS (
        DELETE FROM crm_bridge.queue d USING r
         WHERE d.id = r.id AND r.status = 'delivered' AND d.status = 'in_flight' AND d.worker = p_worker
        RETURNING d.*
    ), upd AS (
        UPDATE crm_bridge.queue d
           SET status = r.status,
               attempts = d.attempts + r.attempted,
               last_status = CASE WHEN r.attempted > 0 THEN r.http_status ELSE d.last_status END,
               last_error = CASE WHEN r.attempted > 0 OR r.status = 'dead'
                                 THEN pg_catalog.left(r.error, 1000) ELSE d.last_error END,
               next_attempt_at = CASE WHEN r.status = 'pending'
                                      THEN now() + least(greatest(coalesce(r.delay, 0), 0),
                                                         crm_bridge.max_retry_delay()) * interval '1 second' END,
               lease_until = NULL, updated_at = now(),
               finished_at = CASE WHEN r.status = 'dead' THEN now() END
          FROM r
         WHERE d.id = r.id AND r.status <> 'delivered' AND d.status = 'in_flight' AND d.worker = p_worker
        RETURNING d.*
    ), h AS (
        INSERT INTO crm_bridge.history (at, call_id, event_id, trigger_id, object, event, ids, event_created_at,
                                        record_key, outcome, attempt, http_status, duration_ms, error, worker, "row")
        SELECT now(), g.id, g.event_id, g.trigger_id, g.object, g.event, g.ids, g.event_created_at, g.record_key,
               'delivered', g.attempts + r.attempted, r.http_status, r.duration_ms, NULL, p_worker, g."row"
          FROM gone g JOIN r ON r.id = g.id
        UNION ALL
        SELECT now(), u.id, u.event_id, u.trigger_id, u.object, u.event, u.ids, u.event_created_at, u.record_key,
               'failed', u.attempts, r.http_status, r.duration_ms, pg_catalog.left(r.error, 1000), p_worker, NULL
          FROM upd u JOIN r ON r.id = u.id
         WHERE r.attempted > 0
        RETURNING 1
    ), st AS (
        SELECT g.trigger_id, r.status, r.attempted, r.http_status, r.error FROM gone g JOIN r ON r.id = g.id
        UNION ALL
        SELECT u.trigger_id, r.status, r.attempted, r.http_status, r.error FROM upd u JOIN r ON r.id = u.id
    )
    SELECT pg_catalog.count(*), pg_catalog.array_agg(st.trigger_id), pg_catalog.array_agg(st.status),
           pg_catalog.array_agg(st.attempted), pg_catalog.array_agg(st.http_status), pg_catalog.array_agg(st.error)
      INTO n, v_triggers, v_statuses, v_attempted, v_http, v_errors FROM st;
    IF n > 0 THEN
        PERFORM crm_bridge.note_url_stats_v1(v_triggers, v_statuses, v_attempted, v_http, v_errors);
    END IF;
    RETURN n;
END
$fn$;

-- An outcome that could not be recorded: the call (held in the queue) becomes a dead letter.
CREATE OR REPLACE FUNCTION crm_bridge.daemon_dead_letter(p_worker text, p_id bigint, p_error text) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    UPDATE crm_bridge.queue d
       SET status = 'dead', lease_until = NULL, updated_at = now(), finished_at = now(), next_attempt_at = NULL,
           last_error = pg_catalog.left(p_error, 1000)
     WHERE d.id = p_id AND d.status = 'in_flight' AND d.worker = p_worker;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n > 0;
END
$$;

-- Calls of batches that leave a daemon's hands go back to the queue: pending and due now for
-- anyone, or (p_worker given) in_flight, held by that worker under a lease of p_lease.  A call
-- whose URL was deleted meanwhile gets no URL (cancel_orphans cancels it).
CREATE FUNCTION crm_bridge.requeue_batches_v1(p_batches bigint[], p_worker text DEFAULT NULL,
                                              p_lease interval DEFAULT NULL) RETURNS bigint
LANGUAGE sql
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
    WITH b AS (
        DELETE FROM crm_bridge.batch x WHERE x.id = ANY (p_batches) RETURNING x.calls
    ), moved AS (
        INSERT INTO crm_bridge.queue (id, event_id, object, event, ids, event_created_at, trigger_id, url, record_key,
                                      "row", status, next_attempt_at, lease_until, worker)
        SELECT c.call_id, c.event_id, c.object, c.event, c.ids, c.event_created_at, t.id, c.url, c.record_key,
               c."row", CASE WHEN p_worker IS NULL THEN 'pending' ELSE 'in_flight' END, now(),
               CASE WHEN p_worker IS NOT NULL THEN now() + p_lease END, p_worker
          FROM b CROSS JOIN LATERAL pg_catalog.unnest(b.calls) c
          LEFT JOIN crm_bridge.crm_trigger t ON t.id = c.trigger_id
        RETURNING 1)
    SELECT pg_catalog.count(*) FROM moved
$$;

-- A batch whose record failed as a whole: its calls move to the queue, held by this worker, so
-- that their outcomes can be recorded (or dead-lettered) one by one.  Returns the calls moved.
CREATE FUNCTION crm_bridge.daemon_unbatch(p_worker text, p_batch bigint, p_lease interval) RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
    SELECT crm_bridge.requeue_batches_v1(ARRAY(SELECT x.id FROM crm_bridge.batch x
                                                WHERE x.id = p_batch AND x.worker = p_worker FOR UPDATE),
                                         p_worker, p_lease)
$$;

-- ---------------------------------------------------------------------------------------------
-- Leases: a batch has one; calls held one by one in the queue have their own.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION crm_bridge.daemon_heartbeat(p_worker text, p_batches bigint[], p_ids bigint[], p_lease interval)
RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
    WITH b AS (
        UPDATE crm_bridge.batch x SET lease_until = now() + p_lease
         WHERE x.id = ANY (p_batches) AND x.worker = p_worker
        RETURNING 1
    ), q AS (
        UPDATE crm_bridge.queue d SET lease_until = now() + p_lease
         WHERE d.id = ANY (p_ids) AND d.status = 'in_flight' AND d.worker = p_worker
        RETURNING 1)
    SELECT (SELECT pg_catalog.count(*) FROM b) + (SELECT pg_catalog.count(*) FROM q)
$$;
COMMENT ON FUNCTION crm_bridge.daemon_heartbeat(text, bigint[], bigint[], interval) IS
    'Daemon only: extend the leases of exactly the batches and calls this process holds';

CREATE OR REPLACE FUNCTION crm_bridge.daemon_release_previous(p_base text, p_worker text) RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
    WITH changed AS (
        UPDATE crm_bridge.queue d
           SET status = 'pending', next_attempt_at = now(), lease_until = NULL, worker = NULL, updated_at = now()
         WHERE d.status = 'in_flight' AND d.worker <> p_worker
           AND (d.worker = p_base OR pg_catalog.left(d.worker, pg_catalog.length(p_base) + 1) = p_base || '/')
        RETURNING 1)
    SELECT (SELECT pg_catalog.count(*) FROM changed)
         + crm_bridge.requeue_batches_v1(ARRAY(
               SELECT x.id FROM crm_bridge.batch x
                WHERE x.worker <> p_worker
                  AND (x.worker = p_base OR pg_catalog.left(x.worker, pg_catalog.length(p_base) + 1) = p_base || '/')
                  FOR UPDATE SKIP LOCKED))
$$;

CREATE OR REPLACE FUNCTION crm_bridge.daemon_release(p_worker text) RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
    WITH changed AS (
        UPDATE crm_bridge.queue d
           SET status = 'pending', next_attempt_at = now(), lease_until = NULL, worker = NULL, updated_at = now()
         WHERE d.status = 'in_flight' AND d.worker = p_worker
        RETURNING 1)
    SELECT (SELECT pg_catalog.count(*) FROM changed)
         + crm_bridge.requeue_batches_v1(ARRAY(SELECT x.id FROM crm_bridge.batch x WHERE x.worker = p_worker
                                                  FOR UPDATE SKIP LOCKED))
$$;

CREATE OR REPLACE FUNCTION crm_bridge.daemon_recover_expired() RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
    WITH changed AS (
        UPDATE crm_bridge.queue d
           SET status = 'pending', next_attempt_at = now(), lease_until = NULL, worker = NULL, updated_at = now()
         WHERE d.id = ANY (ARRAY(SELECT x.id FROM crm_bridge.queue x
                                  WHERE x.status = 'in_flight' AND x.lease_until < now()
                                  LIMIT 10000 FOR UPDATE SKIP LOCKED))
        RETURNING 1)
    SELECT (SELECT pg_catalog.count(*) FROM changed)
         + crm_bridge.requeue_batches_v1(ARRAY(SELECT x.id FROM crm_bridge.batch x WHERE x.lease_until < now()
                                                 LIMIT 100 FOR UPDATE SKIP LOCKED))
$$;

-- Queued calls whose crm_trigger row was deleted are cancelled (history) rather than retried.
CREATE OR REPLACE FUNCTION crm_bridge.daemon_cancel_orphans() RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
    WITH gone AS (
        DELETE FROM crm_bridge.queue d
         WHERE d.id = ANY (ARRAY(SELECT x.id FROM crm_bridge.queue x
                                  WHERE x.status = 'pending' AND x.trigger_id IS NULL
                                  LIMIT 10000 FOR UPDATE SKIP LOCKED))
        RETURNING d.*
    ), h AS (
        INSERT INTO crm_bridge.history (at, call_id, event_id, trigger_id, object, event, ids, event_created_at,
                                        record_key, outcome, attempt, http_status, error, worker)
        SELECT now(), g.id, g.event_id, NULL, g.object, g.event, g.ids, g.event_created_at, g.record_key,
               'cancelled', g.attempts, g.last_status, g.last_error, g.worker
          FROM gone g
        RETURNING 1)
    SELECT pg_catalog.count(*) FROM h
$$;

-- Retention: history partitions older than p_retention are dropped, new ones made ahead of time.
CREATE FUNCTION crm_bridge.daemon_rotate(p_retention interval) RETURNS text
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
    -- Ahead: more than the time between two rotations of a daemon (at most a minute), by far.
    SELECT crm_bridge.history_rotate(p_retention, crm_bridge.history_width(p_retention),
                                     greatest(3 * crm_bridge.history_width(p_retention), interval '3 minutes'))
$$;
COMMENT ON FUNCTION crm_bridge.daemon_rotate(interval) IS
    'Daemon only: make history partitions ahead of now, drop those older than the retention period';

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA crm_bridge FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA crm_bridge FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- apply_grants: the admin's writes through crm_bridge.delivery reach the queue; crm_bridge.attempt
-- is a view now (no DELETE); replay_delivered and record_key are the admin's.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION crm_bridge.apply_grants(admin_role   name DEFAULT 'crm_bridge_admin',
                                        daemon_role  name DEFAULT 'crm_bridge_daemon',
                                        monitor_role name DEFAULT 'crm_bridge_monitor')
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
DECLARE
    r      name;
    f      pg_catalog.regprocedure;
    -- Only what an admin calls.  Never a trigger function (emit_v1, crm_trigger_validate_v1, ...):
    -- a trigger fires without EXECUTE, and EXECUTE is exactly what CREATE TRIGGER needs, so with it
    -- an admin could put emit_v1 on a table of its own and forge events.  redact_url: the views.
    admin_functions CONSTANT text[] := ARRAY[
        'set_signing_secret', 'clear_signing_secret', 'signed_urls', 'attach', 'detach',
        'capture_rows', 'dead_letters', 'replay', 'purge', 'retry_now', 'age_of', 'redact_url',
        'replay_delivered', 'record_key'];
    status_views CONSTANT text[] := ARRAY['summary', 'backlog', 'url_queue', 'url_status', 'dead_letter'];
    daemon_views CONSTANT text[] := ARRAY['summary', 'backlog', 'url_queue'];
BEGIN
    IF admin_role IS NULL OR daemon_role IS NULL OR monitor_role IS NULL
       OR admin_role = daemon_role OR admin_role = monitor_role OR daemon_role = monitor_role THEN
        RAISE EXCEPTION 'apply_grants needs three different role names (got %, % and %)',
            admin_role, daemon_role, monitor_role
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH r IN ARRAY ARRAY[admin_role, daemon_role, monitor_role] LOOP
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r AND (rolsuper OR rolbypassrls)) THEN
            RAISE EXCEPTION 'role "%" is a superuser: pick a dedicated role for crm-bridge', r
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
        END IF;
        -- Start from nothing: what a role holds is exactly what is granted below.
        EXECUTE pg_catalog.format('REVOKE ALL ON ALL TABLES IN SCHEMA crm_bridge FROM %I', r);
        EXECUTE pg_catalog.format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA crm_bridge FROM %I', r);
        EXECUTE pg_catalog.format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA crm_bridge FROM %I', r);
    END LOOP;

    -- Objects added by later migrations start with the default PUBLIC grants: take them away.
    REVOKE ALL ON SCHEMA crm_bridge FROM PUBLIC;
    REVOKE ALL ON ALL TABLES IN SCHEMA crm_bridge FROM PUBLIC;
    REVOKE ALL ON ALL SEQUENCES IN SCHEMA crm_bridge FROM PUBLIC;
    REVOKE ALL ON ALL FUNCTIONS IN SCHEMA crm_bridge FROM PUBLIC;

    EXECUTE pg_catalog.format('GRANT USAGE ON SCHEMA crm_bridge TO %I, %I, %I',
                              admin_role, daemon_role, monitor_role);

    -- admin: read everything but the secrets; edit config; replay/purge/retry deliveries; attach.
    EXECUTE pg_catalog.format('GRANT SELECT ON ALL TABLES IN SCHEMA crm_bridge TO %I', admin_role);
    EXECUTE pg_catalog.format('REVOKE ALL ON crm_bridge.signing_secret FROM %I', admin_role);
    -- The wake-up mark is the daemon's alone (written through daemon_enter_idle/leave_idle).
    EXECUTE pg_catalog.format('REVOKE ALL ON crm_bridge.wake_state FROM %I', admin_role);
    EXECUTE pg_catalog.format('GRANT INSERT, UPDATE, DELETE ON crm_bridge.crm_trigger TO %I', admin_role);
    -- The delivery view writes through to the queue with the caller's rights (migration 0010).
    EXECUTE pg_catalog.format('GRANT UPDATE, DELETE ON crm_bridge.delivery, crm_bridge.queue TO %I', admin_role);
    -- No INSERT/DELETE on attachment: attach/detach/capture_rows write it as the owner after
    -- checking the caller's TRIGGER privilege; a row written by hand would make a later re-attach
    -- capture a table the admin has no rights on.
    FOR f IN SELECT p.oid::pg_catalog.regprocedure FROM pg_catalog.pg_proc p
              WHERE p.pronamespace = 'crm_bridge'::pg_catalog.regnamespace
                AND p.proname::text = ANY (admin_functions)
                AND p.prorettype <> 'pg_catalog.trigger'::pg_catalog.regtype LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I', f, admin_role);
    END LOOP;

    -- daemon: read config and secrets; the status views for its STATUS= line and metrics.  It
    -- writes nothing directly: every write is a crm_bridge.daemon_* function (migration 0007),
    -- so it cannot LOCK the outbox in a mode that stops CRM writers, nor forge deliveries.
    EXECUTE pg_catalog.format('GRANT SELECT ON crm_bridge.crm_trigger, crm_bridge.object_type, '
                              'crm_bridge.signing_secret, crm_bridge.schema_version, crm_bridge.attachment TO %I',
                              daemon_role);
    FOREACH r IN ARRAY daemon_views LOOP
        EXECUTE pg_catalog.format('GRANT SELECT ON crm_bridge.%I TO %I', r, daemon_role);
    END LOOP;
    FOR f IN SELECT p.oid::pg_catalog.regprocedure FROM pg_catalog.pg_proc p
              WHERE p.pronamespace = 'crm_bridge'::pg_catalog.regnamespace
                AND (p.proname::text LIKE 'daemon\_%' OR p.proname IN ('age_of', 'redact_url'))
                AND p.prorettype <> 'pg_catalog.trigger'::pg_catalog.regtype LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I', f, daemon_role);
    END LOOP;

    -- monitor: the status views (they run with their owner's rights on the tables; functions
    -- they call are checked against the caller, hence age_of and redact_url, migration 0009)
    -- and the schema version.
    FOREACH r IN ARRAY status_views LOOP
        EXECUTE pg_catalog.format('GRANT SELECT ON crm_bridge.%I TO %I', r, monitor_role);
    END LOOP;
    EXECUTE pg_catalog.format('GRANT SELECT ON crm_bridge.schema_version TO %I', monitor_role);
    FOR f IN SELECT p.oid::pg_catalog.regprocedure FROM pg_catalog.pg_proc p
              WHERE p.pronamespace = 'crm_bridge'::pg_catalog.regnamespace
                AND p.proname IN ('age_of', 'redact_url') LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I', f, monitor_role);
    END LOOP;

    DELETE FROM crm_bridge.role_name;
    INSERT INTO crm_bridge.role_name (kind, role)
    VALUES ('admin', admin_role), ('daemon', daemon_role), ('monitor', monitor_role);
END
$$;
COMMENT ON FUNCTION crm_bridge.apply_grants(name, name, name) IS
    'Create (NOLOGIN) and grant the crm-bridge admin, daemon and monitor group roles; idempotent';
REVOKE ALL ON FUNCTION crm_bridge.apply_grants(name, name, name) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- replay_delivered: send again what one URL was sent (delivered) in [p_since, p_until), because
-- its receiver lost data.  Reads history (partitions from p_since on), oldest first, in pages of
-- p_limit calls: pass the returned cursor (last_at, last_call) back to continue.  With p_dry_run
-- nothing is queued (count and cursor only).  Each call is queued again (pending, due now) for the
-- URL as it is configured now, under its own call id, so webhook-id / Idempotency-Key are those of
-- the original call (as a retry would: a receiver that deduplicates must forget the lost window).
-- A call already queued again by an overlapping replay is not queued twice.
-- The row payload is the one sent (history keeps it for include_row URLs).
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION crm_bridge.replay_delivered(
    p_trigger_id bigint, p_since timestamptz, p_until timestamptz DEFAULT NULL, p_dry_run boolean DEFAULT false,
    p_limit integer DEFAULT NULL, p_after_at timestamptz DEFAULT NULL, p_after_call bigint DEFAULT NULL)
RETURNS TABLE (calls bigint, last_at timestamptz, last_call bigint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
DECLARE
    t        crm_bridge.crm_trigger%ROWTYPE;
    kept     timestamptz;
BEGIN
    SELECT * INTO t FROM crm_bridge.crm_trigger x WHERE x.id = p_trigger_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'replay_delivered: there is no URL with crm_trigger id %', p_trigger_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_since IS NULL OR (p_until IS NOT NULL AND p_until <= p_since) THEN
        RAISE EXCEPTION 'replay_delivered: since must be given and before until (got % and %)', p_since, p_until
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_limit IS NOT NULL AND p_limit < 1 THEN
        RAISE EXCEPTION 'replay_delivered: limit must be at least 1 (got %)', p_limit
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT min(h.lower_bound) INTO kept FROM crm_bridge.history_partition h;
    IF kept IS NULL OR p_since < kept THEN
        RAISE EXCEPTION 'replay_delivered: history only goes back to % (the retention period); since % is older',
            kept, p_since USING ERRCODE = 'invalid_parameter_value',
            HINT = 'replay from the oldest time kept, or choose a later since';
    END IF;
    RETURN QUERY
    WITH picked AS (
        SELECT h.* FROM crm_bridge.history h
         WHERE h.trigger_id = p_trigger_id AND h.outcome = 'delivered'
           AND h.at >= p_since AND h.at < coalesce(p_until, pg_catalog.now())
           AND (p_after_at IS NULL OR (h.at, h.call_id) > (p_after_at, coalesce(p_after_call, 0)))
         ORDER BY h.at, h.call_id
         LIMIT p_limit
    ), queued AS (
        INSERT INTO crm_bridge.queue (id, event_id, object, event, ids, event_created_at, trigger_id, url, record_key,
                                      "row", ordered, status, next_attempt_at, last_error)
        SELECT p.call_id, p.event_id, p.object, p.event, p.ids, p.event_created_at, t.id, t.url, p.record_key,
               CASE WHEN t.include_row THEN p."row" END, t.ordered, 'pending', pg_catalog.now(),
               pg_catalog.format('replay of the call delivered at %s', p.at)
          FROM picked p WHERE NOT p_dry_run
         ORDER BY p.at, p.call_id
        ON CONFLICT (id) DO NOTHING   -- already queued again (an overlapping replay)
        RETURNING 1
    ), last_ AS (
        SELECT p.at, p.call_id FROM picked p ORDER BY p.at DESC, p.call_id DESC LIMIT 1
    )
    SELECT (SELECT pg_catalog.count(*) FROM picked), (SELECT l.at FROM last_ l), (SELECT l.call_id FROM last_ l)
     WHERE (SELECT pg_catalog.count(*) FROM queued) >= 0;
END
$$;
COMMENT ON FUNCTION crm_bridge.replay_delivered(bigint, timestamptz, timestamptz, boolean, integer, timestamptz, bigint) IS
    'Queue again the calls one URL was delivered in [since, until), oldest first, p_limit per call (cursor: last_at, last_call); p_dry_run: count only';
REVOKE ALL ON FUNCTION crm_bridge.replay_delivered(bigint, timestamptz, timestamptz, boolean, integer, timestamptz, bigint) FROM PUBLIC;
