-- 0025: the short claim deletes the events it takes by their row addresses.
--
-- Migration 0022's short claim deleted the oldest events with `id = ANY (ARRAY(SELECT id ...
-- FOR UPDATE SKIP LOCKED))`: the locking scan walks the primary key once, then the DELETE looked
-- every id up in it again (a bitmap index scan with one descent per id: about a tenth of the
-- claim's and record's CPU per event under perf at 512 events a claim).  It now takes the row
-- addresses (ctid) the locking scan read and deletes through a TID scan.  That is safe because
-- the rows are locked by the same statement (nobody else can delete or move them before it ends)
-- and outbox events are never updated: a locked row's address is the row the DELETE removes.
-- Otherwise the function is migration 0022's.

SET LOCAL lock_timeout = '10s';

CREATE OR REPLACE FUNCTION crm_bridge.daemon_claim(
    p_batch integer, p_bulk_records integer, p_lease interval, p_worker text, p_only bigint[] DEFAULT NULL)
RETURNS SETOF crm_bridge.dispatched
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $fn$
DECLARE
    v_seqscan text;
BEGIN
    -- The checks and the statement through their indexes whatever the outbox held when the plans
    -- were made (migration 0020); restored before returning.
    v_seqscan := pg_catalog.current_setting('enable_seqscan');
    PERFORM pg_catalog.set_config('enable_seqscan', 'off', true);
    IF p_only IS NOT NULL
       OR EXISTS (SELECT 1 FROM crm_bridge.event e WHERE e.n_records IS NOT NULL)
       OR EXISTS (SELECT 1 FROM crm_bridge.crm_trigger t
                   WHERE t.enabled
                     AND (t.paused OR t.ordered OR t.coalesce_edits OR t.include_row
                          OR t.max_per_second IS NOT NULL OR t.max_in_flight IS NOT NULL
                          OR t.exclude_roles IS NOT NULL OR t.exclude_origins IS NOT NULL
                          OR t.only_columns IS NOT NULL))
       OR EXISTS (SELECT 1 FROM crm_bridge.url_stat s JOIN crm_bridge.crm_trigger t ON t.id = s.trigger_id
                   WHERE t.enabled AND t.breaker_threshold > 0 AND s.breaker_state <> 'closed') THEN
        PERFORM pg_catalog.set_config('enable_seqscan', v_seqscan, true);
        RETURN QUERY SELECT * FROM crm_bridge.claim_full_v1(p_batch, p_bulk_records, p_lease, p_worker, p_only);
        RETURN;
    END IF;

    RETURN QUERY
    WITH ev AS (
        -- 0025: by the row addresses the locking scan read (a TID scan), not by id (a second
        -- descent of the primary key per event)
        DELETE FROM crm_bridge.event e
         WHERE e.ctid = ANY (ARRAY(SELECT x.ctid FROM crm_bridge.event x WHERE x.n_records IS NULL
                                    ORDER BY x.id LIMIT p_batch FOR UPDATE SKIP LOCKED))
        RETURNING e.id, e.object, e.event, e.created_at,
                  CASE WHEN pg_catalog.array_ndims(e.ids) = 2 THEN ARRAY(SELECT pg_catalog.unnest(e.ids))
                       ELSE e.ids END AS ids
    ), url AS MATERIALIZED (
        -- a handful of rows: hashed once rather than looked up per event
        SELECT t.id, t.object, t.event, t.url FROM crm_bridge.crm_trigger t WHERE t.enabled
    ), numbered AS (
        SELECT d.*, pg_catalog.md5(d.ids::pg_catalog.text) AS record_key,
               pg_catalog.nextval('crm_bridge.call_id_seq'::pg_catalog.regclass) AS call_id
          FROM (SELECT ev.id, ev.object, ev.event, ev.created_at, ev.ids, u.id AS trigger_id, u.url
                  FROM ev LEFT JOIN url u ON u.object = ev.object AND u.event = ev.event
                 ORDER BY ev.id, u.id) d
    ), finished AS (
        INSERT INTO crm_bridge.history (at, call_id, event_id, trigger_id, object, event, ids, event_created_at,
                                        record_key, outcome, worker)
        SELECT now(), n.call_id, n.id, NULL, n.object, n.event, n.ids, n.created_at, n.record_key, 'unrouted',
               p_worker
          FROM numbered n WHERE n.trigger_id IS NULL
        RETURNING 1
    ), b AS (
        INSERT INTO crm_bridge.batch (worker, lease_until, calls)
        SELECT p_worker, now() + p_lease,
               pg_catalog.array_agg(ROW(n.call_id, n.id, n.object, n.event, n.ids, n.created_at, n.trigger_id,
                                        n.url, n.record_key, NULL)::crm_bridge.call ORDER BY n.call_id)
          FROM numbered n WHERE n.trigger_id IS NOT NULL
        HAVING pg_catalog.count(*) > 0
        RETURNING batch.id
    ), counts AS (
        SELECT (SELECT pg_catalog.count(*) FROM ev) AS n_events,
               (SELECT pg_catalog.count(*) FROM finished) AS n_unrouted
    ), cfg AS MATERIALIZED (
        -- Each URL's settings on the first of its calls only, as in the full statement.
        SELECT t.id, f.first_call, t.url, t.timeout_ms, t.max_attempts,
               crm_bridge.retry_seconds(t.retry_schedule) AS retry_schedule, t.max_in_flight, o.id_params, t.method,
               t.headers::pg_catalog.text AS headers, t.follow_redirects,
               (SELECT s.secret FROM crm_bridge.signing_secret s WHERE s.trigger_id = t.id) AS signing_secret,
               t.batch_max, t.max_per_second, t.breaker_threshold,
               pg_catalog.date_part('epoch', t.breaker_cooldown)::float8 AS breaker_cooldown
          FROM (SELECT n.trigger_id, min(n.call_id) AS first_call FROM numbered n
                 WHERE n.trigger_id IS NOT NULL GROUP BY n.trigger_id) f
          JOIN crm_bridge.crm_trigger t ON t.id = f.trigger_id
          JOIN crm_bridge.object_type o ON o.object = t.object
    )
    SELECT c.n_events, 0::bigint, c.n_unrouted, x.*
      FROM counts c
      LEFT JOIN (
          SELECT (SELECT b.id FROM b) AS batch_id, n.call_id AS id,
                 n.id AS event_id, n.object, n.event, n.ids, crm_bridge.loadable_time(n.created_at) AS event_created_at,
                 'in_flight'::pg_catalog.text AS status, 0 AS attempts, t.id AS trigger_id,
                 CASE WHEN n.call_id = t.first_call THEN t.url END AS url,
                 CASE WHEN n.call_id = t.first_call THEN t.timeout_ms END AS timeout_ms,
                 CASE WHEN n.call_id = t.first_call THEN t.max_attempts END AS max_attempts,
                 CASE WHEN n.call_id = t.first_call THEN t.retry_schedule END AS retry_schedule,
                 CASE WHEN n.call_id = t.first_call THEN t.max_in_flight END AS max_in_flight,
                 CASE WHEN n.call_id = t.first_call THEN t.id_params END AS id_params,
                 false AS ordered,
                 CASE WHEN n.call_id = t.first_call THEN t.method END AS method,
                 CASE WHEN n.call_id = t.first_call THEN t.headers END AS headers,
                 CASE WHEN n.call_id = t.first_call THEN t.follow_redirects END AS follow_redirects,
                 CASE WHEN n.call_id = t.first_call THEN t.signing_secret END AS signing_secret,
                 NULL::pg_catalog.text AS "row",
                 CASE WHEN n.call_id = t.first_call THEN t.batch_max END AS batch_max,
                 CASE WHEN n.call_id = t.first_call THEN t.max_per_second END AS max_per_second,
                 CASE WHEN n.call_id = t.first_call THEN t.breaker_threshold END AS breaker_threshold,
                 CASE WHEN n.call_id = t.first_call THEN t.breaker_cooldown END AS breaker_cooldown
            FROM numbered n
            JOIN cfg t ON t.id = n.trigger_id
      ) x ON c.n_events >= 0
     ORDER BY x.id;
    PERFORM pg_catalog.set_config('enable_seqscan', v_seqscan, true);
END
$fn$;
