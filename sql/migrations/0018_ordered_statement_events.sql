-- 0018: a one-record statement capture's IDs, `{{acc,case}}`, are the record's IDs `{acc,case}`
-- wherever an event is compared with a record: an ordered URL's call waits for such an earlier
-- event that another daemon is claiming, and a quarantined one keeps its record's key.
--
-- Before a call of an ordered URL goes out, daemon_claim and daemon_claim_due look for an earlier
-- event of the same record still in the outbox (another daemon has it locked and is claiming it).
-- Migration 0010 compared the record's IDs with the event's (`e2.ids = r.ids`) or took any bulk
-- event (n_records set) as a possible match.  A statement capture of ONE record (nearly every
-- INSERT and DELETE) stores its IDs as a two-dimensional array of one row, `{{acc,case}}`, which
-- never equals the record's `{acc,case}`: with two daemons, the delete of a record could be sent
-- before its create (tests/test_engine_v2.py, ..._that_another_daemon_is_claiming).  The check
-- now also matches the one-row form (`e2.ids = ARRAY[r.ids]`).  Both functions are those of
-- migration 0015 with that change only.

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
BEGIN
    SELECT pg_catalog.array_agg(s.trigger_id) INTO v_open
      FROM crm_bridge.url_stat s WHERE s.breaker_state <> 'closed';
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
END
$fn$;
COMMENT ON FUNCTION crm_bridge.daemon_claim(integer, integer, interval, text, bigint[]) IS
    'Daemon only: claim outbox events as one batch of calls (p_only: exactly these events)';

-- ---------------------------------------------------------------------------------------------
-- daemon_claim_due: queued calls whose next attempt is due.  An uncoordinated URL gets at most
-- this daemon's free slots for it (p_busy_ids / p_busy_free, else max_in_flight / the default),
-- as before.  A coordinated URL gets at most what
--   * its token bucket holds (max_per_second: refilled at rate_refill(), at most rate_burst()
--     tokens, one at first),
--   * max_in_flight minus its calls in flight in any daemon,
--   * its breaker allows: nothing while open; when the cool-down is over, one probe (the call
--     that waited longest, due or not) if none is in flight, and the breaker is half open.
-- The URL's url_stat row is locked (in id order) for the rest of the call: daemons grant one
-- after the other, and each counts the calls the one before it granted.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION crm_bridge.daemon_claim_due(
    p_batch integer, p_lease interval, p_worker text, p_busy_ids bigint[], p_busy_free integer[],
    p_default_limit integer)
RETURNS SETOF crm_bridge.claimed
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $fn$
DECLARE
    v_urls   bigint[];
    v_grants integer[];
    v_probes boolean[];
    v_tokens float8[];
    v_at     timestamptz;
    r        record;
BEGIN
    -- A state row for every limited URL (the breaker's rows come with its first failure).
    INSERT INTO crm_bridge.url_stat (trigger_id)
    SELECT t.id FROM crm_bridge.crm_trigger t
     WHERE (t.max_per_second IS NOT NULL OR t.max_in_flight IS NOT NULL)
       AND NOT EXISTS (SELECT 1 FROM crm_bridge.url_stat s WHERE s.trigger_id = t.id)
     ORDER BY t.id
    ON CONFLICT (trigger_id) DO NOTHING;

    -- Coordinated URLs with waiting calls: lock their rows, in id order (no deadlocks).
    PERFORM 1 FROM (
        SELECT s.trigger_id FROM crm_bridge.url_stat s
          JOIN crm_bridge.crm_trigger t ON t.id = s.trigger_id
         WHERE t.enabled AND NOT t.paused
           AND (t.max_per_second IS NOT NULL OR t.max_in_flight IS NOT NULL
                OR (s.breaker_state <> 'closed' AND t.breaker_threshold > 0))
           AND EXISTS (SELECT 1 FROM crm_bridge.queue x WHERE x.trigger_id = t.id AND x.status = 'pending')
         ORDER BY s.trigger_id
           FOR UPDATE OF s) l;

    -- What each may get now.  A new statement: it sees what daemons that held the locks before
    -- this one committed.  clock_timestamp(), not now(): the transaction may have waited.
    v_at := pg_catalog.clock_timestamp();
    WITH st AS (
        SELECT s.trigger_id, CASE WHEN t.breaker_threshold > 0 THEN s.breaker_state ELSE 'closed' END AS breaker_state,
               s.breaker_since,
               -- max_in_flight counts requests; a batching URL's request carries up to batch_max calls (0013)
               t.max_in_flight * CASE WHEN t.method = 'POST' AND t.batch_max > 1 THEN t.batch_max ELSE 1 END
                   AS max_in_flight,
               t.max_per_second AS rate, t.breaker_cooldown,
               CASE WHEN t.max_per_second IS NOT NULL THEN
                    least(crm_bridge.rate_burst(t.max_per_second),
                          -- a new bucket holds one call: the first call goes at once, and the first
                          -- window is not a full bucket's burst on top of the first requests' latency
                          coalesce(s.tokens + crm_bridge.rate_refill(t.max_per_second)
                                              * greatest(pg_catalog.date_part('epoch', v_at - s.refilled_at), 0),
                                   1)) END AS tokens,
               (SELECT pg_catalog.count(*) FROM crm_bridge.queue x
                 WHERE x.trigger_id = s.trigger_id AND x.status = 'in_flight') AS running,
               coalesce(f.free, coalesce(t.max_in_flight, p_default_limit)
                                * CASE WHEN t.method = 'POST' AND t.batch_max > 1 THEN t.batch_max ELSE 1 END) AS local_free
          FROM crm_bridge.url_stat s
          JOIN crm_bridge.crm_trigger t ON t.id = s.trigger_id
          LEFT JOIN ROWS FROM (pg_catalog.unnest(p_busy_ids), pg_catalog.unnest(p_busy_free)) AS f(trigger_id, free)
                 ON f.trigger_id = s.trigger_id
         WHERE t.enabled AND NOT t.paused
           AND (t.max_per_second IS NOT NULL OR t.max_in_flight IS NOT NULL
                OR (s.breaker_state <> 'closed' AND t.breaker_threshold > 0))
           AND EXISTS (SELECT 1 FROM crm_bridge.queue x WHERE x.trigger_id = t.id AND x.status = 'pending')
    ), g AS (
        SELECT st.*,
               CASE WHEN st.breaker_state = 'open' AND v_at < st.breaker_since + st.breaker_cooldown THEN false
                    WHEN st.breaker_state IN ('open', 'half_open') THEN st.running = 0
                    ELSE false END AS probe,
               CASE WHEN st.breaker_state = 'open' AND v_at < st.breaker_since + st.breaker_cooldown THEN 0
                    WHEN st.breaker_state IN ('open', 'half_open') AND st.running > 0 THEN 0
                    ELSE greatest(0, least(
                        CASE WHEN st.breaker_state <> 'closed' THEN 1 END,
                        pg_catalog.floor(st.tokens)::integer,
                        st.max_in_flight - st.running,
                        st.local_free, p_batch))::integer END AS n
          FROM st
    )
    SELECT pg_catalog.array_agg(g.trigger_id ORDER BY g.trigger_id),
           pg_catalog.array_agg(g.n ORDER BY g.trigger_id),
           pg_catalog.array_agg(g.probe AND g.n > 0 ORDER BY g.trigger_id),
           pg_catalog.array_agg(g.tokens ORDER BY g.trigger_id)
      INTO v_urls, v_grants, v_probes, v_tokens
      FROM g;

    -- Open -> half open: this daemon sends the probe (a new call of this function may send
    -- another one only when no call of the URL is in flight: the probe was lost).
    FOR r IN
        UPDATE crm_bridge.url_stat s SET breaker_state = 'half_open', breaker_since = v_at
          FROM ROWS FROM (pg_catalog.unnest(v_urls), pg_catalog.unnest(v_probes)) AS p(trigger_id, probe)
         WHERE s.trigger_id = p.trigger_id AND p.probe AND s.breaker_state = 'open'
        RETURNING s.trigger_id, s.breaker_failures
    LOOP
        RAISE NOTICE 'crm-bridge breaker: URL % is half open: cool-down over, sending one probe call', r.trigger_id
            USING DETAIL = 'half_open', HINT = r.trigger_id::pg_catalog.text;
    END LOOP;

    RETURN QUERY
    WITH grants AS (
        SELECT * FROM ROWS FROM (pg_catalog.unnest(v_urls), pg_catalog.unnest(v_grants), pg_catalog.unnest(v_probes))
                      AS x(trigger_id, n, probe)
    ), upd AS (
        UPDATE crm_bridge.queue d
           SET status = 'in_flight', lease_until = now() + p_lease, worker = p_worker, updated_at = now()
          FROM crm_bridge.crm_trigger t, crm_bridge.object_type o
         WHERE d.id = ANY (ARRAY(
                   SELECT p.id
                     FROM crm_bridge.crm_trigger pt
                     LEFT JOIN ROWS FROM (pg_catalog.unnest(p_busy_ids), pg_catalog.unnest(p_busy_free)) AS f(trigger_id, free)
                            ON f.trigger_id = pt.id
                     LEFT JOIN grants gr ON gr.trigger_id = pt.id
                     LEFT JOIN crm_bridge.url_stat us ON us.trigger_id = pt.id
                    CROSS JOIN LATERAL (
                          SELECT x.id FROM crm_bridge.queue x
                           WHERE x.trigger_id = pt.id AND x.status = 'pending'
                             AND (x.next_attempt_at <= now() OR coalesce(gr.probe, false))
                             AND (NOT x.ordered OR (
                                  NOT EXISTS (SELECT 1 FROM crm_bridge.queue y
                                               WHERE y.ordered AND y.trigger_id = x.trigger_id
                                                 AND y.record_key = x.record_key
                                                 AND y.status IN ('pending', 'in_flight') AND y.event_id < x.event_id)
                                  AND NOT EXISTS (SELECT 1 FROM crm_bridge.event e2
                                                   WHERE e2.id < x.event_id AND e2.object = x.object
                                                     AND (e2.ids = x.ids OR e2.ids = ARRAY[x.ids]
                                                          OR e2.n_records IS NOT NULL))))
                           ORDER BY x.next_attempt_at, x.id
                           LIMIT CASE
                                 WHEN gr.trigger_id IS NOT NULL THEN gr.n
                                 -- coordinated but not granted above (its row appeared since): next time
                                 WHEN pt.max_per_second IS NOT NULL OR pt.max_in_flight IS NOT NULL
                                      OR (coalesce(us.breaker_state, 'closed') <> 'closed'
                                          AND pt.breaker_threshold > 0) THEN 0
                                 -- 0013 batch_max: a URL's slots count requests of up to batch_max calls
                                 ELSE least(coalesce(f.free, coalesce(pt.max_in_flight, p_default_limit)
                                                              * CASE WHEN pt.method = 'POST' AND pt.batch_max > 1
                                                                     THEN pt.batch_max ELSE 1 END), p_batch) END
                             FOR UPDATE SKIP LOCKED) p
                    WHERE pt.enabled AND NOT pt.paused
                    LIMIT p_batch))
           AND t.id = d.trigger_id AND o.object = d.object
        RETURNING NULL::bigint AS batch_id, d.id, d.event_id, d.object, d.event, d.ids,
                  crm_bridge.loadable_time(d.event_created_at) AS event_created_at, d.status, d.attempts,
                  t.id AS trigger_id, t.url, t.timeout_ms, t.max_attempts,
                  crm_bridge.retry_seconds(t.retry_schedule) AS retry_schedule, t.max_in_flight, o.id_params,
                  d.ordered, t.method, t.headers::text AS headers, t.follow_redirects,
                  (SELECT s.secret FROM crm_bridge.signing_secret s WHERE s.trigger_id = t.id) AS signing_secret,
                  d."row"::text AS "row", t.batch_max, t.max_per_second, t.breaker_threshold,
                  pg_catalog.date_part('epoch', t.breaker_cooldown)::float8 AS breaker_cooldown
    ), spent AS (
        -- The bucket: refilled up to v_at, less the calls handed out now.
        UPDATE crm_bridge.url_stat s
           SET tokens = b.tokens - coalesce((SELECT pg_catalog.count(*) FROM upd u WHERE u.trigger_id = b.trigger_id), 0),
               refilled_at = v_at
          FROM ROWS FROM (pg_catalog.unnest(v_urls), pg_catalog.unnest(v_tokens)) AS b(trigger_id, tokens)
         WHERE s.trigger_id = b.trigger_id AND b.tokens IS NOT NULL
        RETURNING 1
    )
    SELECT * FROM upd;
END
$fn$;
COMMENT ON FUNCTION crm_bridge.daemon_claim_due(integer, interval, text, bigint[], integer[], integer) IS
    'Daemon only: claim due queued calls; coordinated URLs (rate limit, max_in_flight, breaker) as their shared state allows';

-- The same mismatch in daemon_quarantine_event (an event that cannot be claimed even alone goes to
-- the dead letters): it stored a one-record statement capture's IDs as the record's, but took the
-- record key from the one-row array, md5('{{acc,case}}'), which no other call of the record has,
-- so crm_bridge.record_key(ARRAY[...]) and `crm-bridge replay --record` did not find that dead
-- letter.  The key is now that of the IDs it stores.
CREATE OR REPLACE FUNCTION crm_bridge.daemon_quarantine_event(p_event_id bigint, p_error text) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    WITH ev AS (DELETE FROM crm_bridge.event e WHERE e.id = p_event_id RETURNING e.*),
    rec AS (
        SELECT ev.id, ev.object, ev.event, ev.created_at,
               CASE WHEN pg_catalog.array_ndims(ev.ids) = 2 AND pg_catalog.array_length(ev.ids, 1) = 1
                    THEN ARRAY(SELECT pg_catalog.unnest(ev.ids)) ELSE ev.ids END AS ids
          FROM ev)
    INSERT INTO crm_bridge.queue (event_id, object, event, ids, event_created_at, record_key, status,
                                  finished_at, last_error)
    SELECT rec.id, rec.object, rec.event, rec.ids, rec.created_at, pg_catalog.md5(rec.ids::text), 'dead', now(),
           pg_catalog.left('could not be dispatched: ' || coalesce(p_error, 'unknown error'), 1000)
      FROM rec;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n > 0;
END
$$;
