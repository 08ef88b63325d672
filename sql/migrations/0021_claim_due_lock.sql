-- 0021: max_in_flight and max_per_second hold for all daemons together also when a URL's calls
-- arrive between the two statements of daemon_claim_due.
--
-- daemon_claim_due first locks the url_stat row of every coordinated URL with waiting calls, then,
-- in a new statement (a new snapshot), counts each URL's calls in flight and grants what is left.
-- A URL that had no waiting call in the first statement's snapshot was not locked, yet could be
-- granted in the second (another daemon's claim had queued its calls in between): without the
-- lock, two daemons could each count the same calls in flight and each grant the limit, so twice
-- max_in_flight calls ran at once (tests/test_url_protection.py,
-- test_max_in_flight_holds_for_all_daemons_together, failed 2 runs in 21 once claims got faster).
-- A URL is now granted calls only by a call that holds its row; the others get theirs at the
-- daemon's next look at the queue, a poll interval or a wake-up later.  The function is
-- migration 0018's with that change only.

SET LOCAL lock_timeout = '10s';

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
    v_locked bigint[];   -- 0021: the URLs whose url_stat row this call holds
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
    SELECT pg_catalog.array_agg(l.trigger_id) INTO v_locked FROM (
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
           -- 0021: only a URL whose row this call locked above (see the header of 0021)
           AND s.trigger_id = ANY (v_locked)
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
