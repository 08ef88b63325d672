-- crm-bridge schema, version 12: protect the receivers (issue 13, items 1 and 2).
--
--   * crm_trigger.max_per_second: a rate limit per URL that holds for all daemons together; and
--     crm_trigger.max_in_flight now holds for all daemons together too.
--   * crm_trigger.breaker_threshold / breaker_cooldown: a circuit breaker per URL (on by default):
--     after breaker_threshold connection failures, timeouts or 5xx in a row the URL is open (no
--     calls; its calls wait, pending, without using attempts); after breaker_cooldown one probe
--     call decides (half open): an answer closes it, a failure opens it again.
--
-- How: calls of a "coordinated" URL -- one with max_per_second or max_in_flight, or whose breaker
-- is not closed -- never go into a batch: daemon_claim queues them (pending, like a paused URL's)
-- and daemon_claim_due hands them out.  It locks the URL's crm_bridge.url_stat row (in id order),
-- so daemons grant one after the other, each seeing what the one before it granted, and grants at
-- most what the URL's token bucket (tokens, refilled_at) and its global in-flight count allow.
-- The breaker's state lives in the same row; daemon_record / daemon_complete move it (through
-- note_url_stats_v1) and daemon_claim_due turns open into half open when it hands out the probe.
-- Every transition is RAISEd as a NOTICE to the daemon whose statement made it: that daemon logs
-- it, once.  See docs/DESIGN.md ("Protecting receivers").

SET LOCAL lock_timeout = '10s';

-- ---------------------------------------------------------------------------------------------
-- Configuration
-- ---------------------------------------------------------------------------------------------
ALTER TABLE crm_bridge.crm_trigger
    ADD COLUMN max_per_second    float8,
    ADD COLUMN breaker_threshold integer NOT NULL DEFAULT 5,
    ADD COLUMN breaker_cooldown  interval NOT NULL DEFAULT interval '30 seconds';
COMMENT ON COLUMN crm_bridge.crm_trigger.max_per_second IS
    'at most this many calls in any one-second window to this URL, all daemons together (NULL: no limit); see crm_bridge.rate_burst / rate_refill';
COMMENT ON COLUMN crm_bridge.crm_trigger.max_in_flight IS
    'at most this many calls to this URL at the same time, all daemons together (NULL: each daemon''s max_in_flight_per_url)';
COMMENT ON COLUMN crm_bridge.crm_trigger.breaker_threshold IS
    'circuit breaker: open after this many connection failures, timeouts or 5xx in a row (0: no breaker)';
COMMENT ON COLUMN crm_bridge.crm_trigger.breaker_cooldown IS
    'circuit breaker: how long an open URL gets no calls before one probe call decides';

-- Not folded into crm_trigger_validate_v1 (other migrations change that one): its own trigger,
-- fired after it (BEFORE triggers fire in name order).  Messages name the column and the range.
CREATE FUNCTION crm_bridge.crm_trigger_validate_protect_v1() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
BEGIN
    IF NEW.max_per_second IS NOT NULL
       AND NOT (NEW.max_per_second OPERATOR(pg_catalog.>=) 0.01::pg_catalog.float8
                AND NEW.max_per_second OPERATOR(pg_catalog.<=) 10000::pg_catalog.float8) THEN
        RAISE EXCEPTION 'max_per_second must be between 0.01 and 10000 calls per second, or NULL for no limit (got %)',
            NEW.max_per_second USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.breaker_threshold IS NULL OR NEW.breaker_threshold NOT BETWEEN 0 AND 10000 THEN
        RAISE EXCEPTION 'breaker_threshold must be between 1 and 10000 failures in a row, or 0 to switch the circuit breaker off (got %)',
            coalesce(NEW.breaker_threshold::pg_catalog.text, 'NULL') USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.breaker_cooldown IS NULL OR NEW.breaker_cooldown OPERATOR(pg_catalog.<) '1 second'::pg_catalog.interval
       OR NEW.breaker_cooldown OPERATOR(pg_catalog.>) '1 day'::pg_catalog.interval THEN
        RAISE EXCEPTION 'breaker_cooldown must be between 1 second and 1 day (got %)',
            coalesce(NEW.breaker_cooldown::pg_catalog.text, 'NULL') USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION crm_bridge.crm_trigger_validate_protect_v1() FROM PUBLIC;
CREATE TRIGGER crm_trigger_validate_protect
    BEFORE INSERT OR UPDATE ON crm_bridge.crm_trigger
    FOR EACH ROW EXECUTE FUNCTION crm_bridge.crm_trigger_validate_protect_v1();

-- ---------------------------------------------------------------------------------------------
-- State shared by the daemons, in the URL's url_stat row:
--   tokens, refilled_at   the token bucket of max_per_second (NULL: one token)
--   breaker_state         closed | open | half_open
--   breaker_since         when it entered that state (NULL: closed since ever)
--   breaker_failures      connection failures, timeouts and 5xx in a row
-- ---------------------------------------------------------------------------------------------
ALTER TABLE crm_bridge.url_stat
    ADD COLUMN tokens           float8,
    ADD COLUMN refilled_at      timestamptz,
    ADD COLUMN breaker_state    text NOT NULL DEFAULT 'closed'
                                CHECK (breaker_state IN ('closed', 'open', 'half_open')),
    ADD COLUMN breaker_since    timestamptz,
    ADD COLUMN breaker_failures integer NOT NULL DEFAULT 0;

-- The global in-flight count of a coordinated URL, read by every daemon_claim_due.
CREATE INDEX queue_in_flight_trigger_idx ON crm_bridge.queue (trigger_id) WHERE status = 'in_flight';

-- The token bucket of a rate limit r (max_per_second): it holds at most b = rate_burst(r) calls
-- (handed out at once after a quiet moment) and refills at rate_refill(r) calls per second,
-- which is just below floor(r) + 1 - b: then no one-second window -- the first one, with a full
-- bucket, included -- can hold more than r calls (at most floor(b + refill) <= floor(r)).  The
-- long-run rate is that refill rate: r - b + 1 for a whole r (46/s for 50/s, 19/s for 20/s,
-- r for r < 11).  Below 1/s the calls are at least 1/r seconds apart.  See docs/DESIGN.md.
CREATE FUNCTION crm_bridge.rate_burst(p_max_per_second float8) RETURNS float8
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$ SELECT greatest(1, pg_catalog.ceil(p_max_per_second / 10)) $$;
COMMENT ON FUNCTION crm_bridge.rate_burst(float8) IS
    'Token bucket size for a max_per_second: ceil(max_per_second / 10), at least 1';

CREATE FUNCTION crm_bridge.rate_refill(p_max_per_second float8) RETURNS float8
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
    SELECT CASE WHEN p_max_per_second < 1 THEN p_max_per_second
                ELSE least(p_max_per_second,
                           pg_catalog.floor(p_max_per_second) + 1 - crm_bridge.rate_burst(p_max_per_second) - 0.001)
           END
$$;
COMMENT ON FUNCTION crm_bridge.rate_refill(float8) IS
    'Token bucket refill rate (calls per second) for a max_per_second: no one-second window holds more than max_per_second calls';

-- ---------------------------------------------------------------------------------------------
-- What a claimed call carries: three more URL settings at the end (the daemon's copy of the
-- breaker stops sending a batch's calls after breaker_threshold failures; max_per_second tells it
-- to come back for calls of a limited URL often).  The types change, so the functions that
-- return them are made again.
-- ---------------------------------------------------------------------------------------------
DROP FUNCTION crm_bridge.daemon_claim(integer, integer, interval, text, bigint[]);
DROP FUNCTION crm_bridge.daemon_claim_due(integer, interval, text, bigint[], integer[], integer);
DROP TYPE crm_bridge.claimed;
DROP TYPE crm_bridge.dispatched;
CREATE TYPE crm_bridge.claimed AS (
    batch_id bigint, id bigint, event_id bigint, object text, event text, ids text[], event_created_at timestamptz,
    status text, attempts integer, trigger_id bigint, url text, timeout_ms integer, max_attempts integer,
    retry_schedule float8[], max_in_flight integer, id_params text[], ordered boolean, method text,
    headers text, follow_redirects boolean, signing_secret text, "row" text,
    -- migration 0012
    max_per_second float8, breaker_threshold integer, breaker_cooldown float8);
CREATE TYPE crm_bridge.dispatched AS (
    n_events bigint, n_pending bigint, n_unrouted bigint,
    batch_id bigint, id bigint, event_id bigint, object text, event text, ids text[], event_created_at timestamptz,
    status text, attempts integer, trigger_id bigint, url text, timeout_ms integer, max_attempts integer,
    retry_schedule float8[], max_in_flight integer, id_params text[], ordered boolean, method text,
    headers text, follow_redirects boolean, signing_secret text, "row" text,
    -- migration 0012
    max_per_second float8, breaker_threshold integer, breaker_cooldown float8);

-- ---------------------------------------------------------------------------------------------
-- daemon_claim: as in migration 0010, with two changes marked "0012":
--   * a coordinated URL's calls are queued (pending), never batched or held;
--   * the three new settings are sent with a URL's first call.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION crm_bridge.daemon_claim(
    p_batch integer, p_bulk_records integer, p_lease interval, p_worker text, p_only bigint[] DEFAULT NULL)
RETURNS SETOF crm_bridge.dispatched
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $fn$
DECLARE
    v_open bigint[];   -- 0012: URLs whose circuit breaker is not closed (few, usually none)
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
               -- 0012: coordinated URL (rate limit, max_in_flight, breaker not closed)
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
                    -- 0012: a coordinated URL's calls are handed out by daemon_claim_due (rate
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
               (SELECT s.secret FROM crm_bridge.signing_secret s WHERE s.trigger_id = t.id) AS signing_secret,
               -- 0012
               t.max_per_second, t.breaker_threshold,
               pg_catalog.date_part('epoch', t.breaker_cooldown)::float8 AS breaker_cooldown
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
                 -- 0012
                 CASE WHEN n.call_id = t.first_call THEN t.max_per_second END AS max_per_second,
                 CASE WHEN n.call_id = t.first_call THEN t.breaker_threshold END AS breaker_threshold,
                 CASE WHEN n.call_id = t.first_call THEN t.breaker_cooldown END AS breaker_cooldown
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
CREATE FUNCTION crm_bridge.daemon_claim_due(
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
               s.breaker_since, t.max_in_flight,
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
               coalesce(f.free, t.max_in_flight, p_default_limit) AS local_free
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
                                                     AND (e2.ids = x.ids OR e2.n_records IS NOT NULL))))
                           ORDER BY x.next_attempt_at, x.id
                           LIMIT CASE
                                 WHEN gr.trigger_id IS NOT NULL THEN gr.n
                                 -- coordinated but not granted above (its row appeared since): next time
                                 WHEN pt.max_per_second IS NOT NULL OR pt.max_in_flight IS NOT NULL
                                      OR (coalesce(us.breaker_state, 'closed') <> 'closed'
                                          AND pt.breaker_threshold > 0) THEN 0
                                 ELSE least(coalesce(f.free, pt.max_in_flight, p_default_limit), p_batch) END
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
                  d."row"::text AS "row", t.max_per_second, t.breaker_threshold,
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

-- ---------------------------------------------------------------------------------------------
-- note_url_stats_v1 (called by daemon_record and daemon_complete with the outcomes they record):
-- last success / failure as before, and the circuit breaker.  Per URL and statement:
--   * an answer below 500 (delivered, or a 4xx) closes the breaker and resets the run of failures;
--     when it closes after being open, the URL's waiting calls are due now (the backlog flows);
--   * otherwise connection failures, timeouts and 5xx (attempted calls only: calls handed back
--     without an attempt count for nothing) add to the run; at breaker_threshold (> 0) a closed
--     breaker opens, and a failed probe (half open) opens it again, for another cool-down.
-- Each transition is RAISEd as a NOTICE (DETAIL: the new state, HINT: the crm_trigger id): the
-- daemon whose statement made it logs it, once.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION crm_bridge.note_url_stats_v1(p_trigger_ids bigint[], p_statuses text[], p_attempted integer[],
                                                       p_http_status integer[], p_errors text[]) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
DECLARE
    r      record;
    closed bigint[];
BEGIN
    -- Rows for URLs seen for the first time (a statement does not see its own inserts: the
    -- update below is a statement of its own).
    INSERT INTO crm_bridge.url_stat (trigger_id)
    SELECT DISTINCT o.trigger_id
      FROM ROWS FROM (pg_catalog.unnest(p_trigger_ids), pg_catalog.unnest(p_statuses), pg_catalog.unnest(p_attempted))
           AS o(trigger_id, status, attempted)
      JOIN crm_bridge.crm_trigger t ON t.id = o.trigger_id
     WHERE o.status = 'delivered' OR (o.status IN ('pending', 'dead') AND o.attempted > 0)
     ORDER BY o.trigger_id                  -- several new rows: always in the same order
    ON CONFLICT (trigger_id) DO NOTHING;
    FOR r IN
        WITH o AS (
            SELECT * FROM ROWS FROM (pg_catalog.unnest(p_trigger_ids), pg_catalog.unnest(p_statuses),
                                     pg_catalog.unnest(p_attempted), pg_catalog.unnest(p_http_status),
                                     pg_catalog.unnest(p_errors))
                   AS r(trigger_id, status, attempted, http_status, error)
        ), agg AS (
            SELECT o.trigger_id, t.breaker_threshold,
                   CASE WHEN bool_or(o.status = 'delivered') THEN now() END AS success_at,
                   CASE WHEN bool_or(o.status <> 'delivered' AND o.attempted > 0) THEN now() END AS failure_at,
                   (array_agg(o.http_status) FILTER (WHERE o.status <> 'delivered' AND o.attempted > 0))[1] AS f_status,
                   (array_agg(pg_catalog.left(o.error, 1000)) FILTER (WHERE o.status <> 'delivered' AND o.attempted > 0))[1] AS f_error,
                   coalesce(bool_or(o.attempted > 0 AND (o.status = 'delivered' OR o.http_status < 500)), false) AS answered,
                   count(*) FILTER (WHERE o.attempted > 0 AND o.status <> 'delivered'
                                      AND (o.http_status IS NULL OR o.http_status >= 500))::integer AS down
              FROM o
              JOIN crm_bridge.crm_trigger t ON t.id = o.trigger_id
             WHERE o.status IN ('delivered', 'pending', 'dead')
             GROUP BY o.trigger_id, t.breaker_threshold
            HAVING bool_or(o.status = 'delivered') OR bool_or(o.attempted > 0)
        ), nxt AS (
            -- the url_stat rows, locked in id order, and what the outcomes make of them
            SELECT s.trigger_id, a.success_at, a.failure_at, a.f_status, a.f_error,
                   CASE WHEN a.answered THEN 0 ELSE s.breaker_failures + a.down END AS failures,
                   CASE WHEN a.answered OR a.breaker_threshold = 0 THEN 'closed'
                        WHEN a.down = 0 THEN s.breaker_state
                        WHEN s.breaker_state = 'half_open' THEN 'open'
                        WHEN s.breaker_state = 'closed' AND a.breaker_threshold > 0
                             AND s.breaker_failures + a.down >= a.breaker_threshold THEN 'open'
                        ELSE s.breaker_state END AS state,
                   s.breaker_state AS was
              FROM agg a JOIN crm_bridge.url_stat s ON s.trigger_id = a.trigger_id
             ORDER BY s.trigger_id
               FOR UPDATE OF s
        )
        UPDATE crm_bridge.url_stat s
           SET last_success_at = coalesce(n.success_at, s.last_success_at),
               last_failure_at = coalesce(n.failure_at, s.last_failure_at),
               last_failure_status = CASE WHEN n.failure_at IS NOT NULL THEN n.f_status ELSE s.last_failure_status END,
               last_failure_error = CASE WHEN n.failure_at IS NOT NULL THEN n.f_error ELSE s.last_failure_error END,
               breaker_failures = n.failures,
               breaker_state = n.state,
               breaker_since = CASE WHEN n.state <> n.was OR (n.was = 'half_open' AND n.state = 'open')
                                    THEN pg_catalog.clock_timestamp() ELSE s.breaker_since END
          FROM nxt n
         WHERE s.trigger_id = n.trigger_id
        RETURNING s.trigger_id, n.was, n.state, n.failures, n.f_status, n.f_error
    LOOP
        IF r.state = 'open' AND r.was = 'closed' THEN
            RAISE NOTICE 'crm-bridge breaker: URL % is open after % failures in a row (last: %): no calls until its cool-down is over',
                r.trigger_id, r.failures, coalesce('HTTP ' || r.f_status, pg_catalog.left(r.f_error, 200), 'no answer')
                USING DETAIL = 'open', HINT = r.trigger_id::pg_catalog.text;
        ELSIF r.state = 'open' AND r.was = 'half_open' THEN
            RAISE NOTICE 'crm-bridge breaker: URL % is open again: the probe call failed (%)',
                r.trigger_id, coalesce('HTTP ' || r.f_status, pg_catalog.left(r.f_error, 200), 'no answer')
                USING DETAIL = 'open', HINT = r.trigger_id::pg_catalog.text;
        ELSIF r.state = 'closed' AND r.was <> 'closed' THEN
            closed := closed || r.trigger_id;
            RAISE NOTICE 'crm-bridge breaker: URL % is closed: the receiver answered; its waiting calls are sent',
                r.trigger_id USING DETAIL = 'closed', HINT = r.trigger_id::pg_catalog.text;
        END IF;
    END LOOP;
    IF closed IS NOT NULL THEN
        -- The receiver is back: calls that waited out the outage (or its retry delays) go now.
        UPDATE crm_bridge.queue d SET next_attempt_at = now(), updated_at = now()
         WHERE d.trigger_id = ANY (closed) AND d.status = 'pending' AND d.next_attempt_at > now();
    END IF;
END
$$;
REVOKE ALL ON FUNCTION crm_bridge.note_url_stats_v1(bigint[], text[], integer[], integer[], text[]) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- url_queue and url_status: the breaker's state per URL (closed when the URL never failed) and
-- since when (url_queue: the daemon's metrics read it); url_status adds the run of failures that
-- counts towards breaker_threshold.  url_queue as in migration 0010 with two columns at the end.
-- ---------------------------------------------------------------------------------------------
DROP VIEW crm_bridge.url_status;
CREATE OR REPLACE VIEW crm_bridge.url_queue AS
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
       d.last_dead_at,
       CASE WHEN t.breaker_threshold > 0 THEN coalesce(us.breaker_state, 'closed') ELSE 'closed' END AS breaker,
       CASE WHEN t.breaker_threshold > 0 THEN us.breaker_since END AS breaker_since      -- 0012
  FROM crm_bridge.crm_trigger t
  LEFT JOIN batched bt ON bt.trigger_id = t.id
  LEFT JOIN crm_bridge.url_stat us ON us.trigger_id = t.id                 -- 0012
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
    'Per configured URL (redacted): pending, retrying, in-flight and dead deliveries, oldest undelivered event, circuit breaker';

CREATE VIEW crm_bridge.url_status AS
SELECT q.*, s.last_success_at, s.last_failure_at, s.last_failure_status, s.last_failure_error,
       coalesce(s.breaker_failures, 0) AS breaker_failures
  FROM crm_bridge.url_queue q
  LEFT JOIN crm_bridge.url_stat s ON s.trigger_id = q.id;
COMMENT ON VIEW crm_bridge.url_status IS
    'url_queue plus the last success and the last failed attempt per URL, and the run of failures its circuit breaker counts';

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA crm_bridge FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA crm_bridge FROM PUBLIC;
