-- 0020: a claim costs the same whatever the outbox held when its plan was made.
--
-- PL/pgSQL keeps one generic plan of daemon_claim's statement per daemon connection, made at its
-- sixth call from the outbox's size at that moment.  A daemon that starts (or sits) idle makes
-- it while the outbox holds a handful of rows, so the planner picks a sequential scan and a sort
-- of the whole table to find the oldest events, and a second sequential scan to delete them;
-- that plan is kept until autovacuum next touches the table.  When writers then get ahead (a
-- burst, an import, a busy hour), every claim read and sorted the whole backlog twice to take
-- 128 of it: 20,000 waiting events cost each claim 2 x 20,000 rows
-- (tests/test_engine_v2.py, ..._does_not_read_the_whole_outbox).  The statement is now planned
-- and run with enable_seqscan off (set for it alone, then restored): the outbox's primary key
-- gives the oldest events and finds the ones to delete, at a cost that does not grow with the
-- backlog.  (A SET clause on the function would apply the setting to its first statement too,
-- which has no index to use.)  The function is migration 0018's with that change only.

SET LOCAL lock_timeout = '10s';

CREATE OR REPLACE FUNCTION crm_bridge.daemon_claim(
    p_batch integer, p_bulk_records integer, p_lease interval, p_worker text, p_only bigint[] DEFAULT NULL)
RETURNS SETOF crm_bridge.dispatched
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $fn$
DECLARE
    v_open bigint[];   -- 0015: URLs whose circuit breaker is not closed (few, usually none)
    v_seqscan text;    -- 0020
BEGIN
    SELECT pg_catalog.array_agg(s.trigger_id) INTO v_open
      FROM crm_bridge.url_stat s WHERE s.breaker_state <> 'closed';
    -- 0020: the outbox through its indexes, whatever its size when the plan was made (see above).
    v_seqscan := pg_catalog.current_setting('enable_seqscan');
    PERFORM pg_catalog.set_config('enable_seqscan', 'off', true);
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
               -- 0015: coordinated URL (rate limit, max_in_flight, breaker not closed)
               (t.max_per_second IS NOT NULL OR t.max_in_flight IS NOT NULL
                OR (t.id = ANY (v_open) AND t.breaker_threshold > 0)) AS coordinated,
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
                    -- 0015: a coordinated URL's calls are handed out by daemon_claim_due (rate
                    -- limit, global max_in_flight, circuit breaker), never batched or held here.
                    WHEN r.coordinated THEN 'pending'
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
                                            AND (e2.ids = r.ids OR e2.ids = ARRAY[r.ids] OR e2.n_records IS NOT NULL))) THEN 'pending'
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
               (SELECT s.secret FROM crm_bridge.signing_secret s WHERE s.trigger_id = t.id) AS signing_secret,
               t.batch_max,  -- 0013 batch_max
               t.max_per_second, t.breaker_threshold,                                 -- 0015
               pg_catalog.date_part('epoch', t.breaker_cooldown)::float8 AS breaker_cooldown  -- 0015
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
                 n.send_row::text AS "row",
                 CASE WHEN n.call_id = t.first_call THEN t.batch_max END AS batch_max,  -- 0013 batch_max
                 CASE WHEN n.call_id = t.first_call THEN t.max_per_second END AS max_per_second,        -- 0015
                 CASE WHEN n.call_id = t.first_call THEN t.breaker_threshold END AS breaker_threshold,  -- 0015
                 CASE WHEN n.call_id = t.first_call THEN t.breaker_cooldown END AS breaker_cooldown     -- 0015
            FROM numbered n
            JOIN cfg t ON t.id = n.trigger_id
           WHERE n.kind IN ('fast', 'held')
      ) x ON c.n_written >= 0
     ORDER BY x.id;
    PERFORM pg_catalog.set_config('enable_seqscan', v_seqscan, true);
END
$fn$;
COMMENT ON FUNCTION crm_bridge.daemon_claim(integer, integer, interval, text, bigint[]) IS
    'Daemon only: claim outbox events as one batch of calls (p_only: exactly these events)';
