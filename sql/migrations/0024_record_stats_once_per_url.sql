-- 0024: recording a batch costs the server less per call.
--
-- daemon_record (migration 0010) handed note_url_stats_v1 one entry per call: a batch of 128
-- delivered calls of one URL made it sort and group 128 rows (and probe url_stat with 128) to set
-- one last_success_at.  The delivered calls of a URL now come as one entry: what note_url_stats_v1
-- makes of a delivered, attempted call (a success, a receiver that answered, nothing to count
-- towards the breaker) is the same for one as for many; failed and unattempted outcomes are passed
-- one by one as before (their number and first error count).  The statuses are checked with an
-- array containment test, evaluated without a query; the check function still runs (and raises
-- its error) when that test fails.  Otherwise the function is migration 0010's.

SET LOCAL lock_timeout = '10s';

CREATE OR REPLACE FUNCTION crm_bridge.daemon_record(
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
    v_ok       bigint[];   -- 0024: URLs with a delivered call, once each
BEGIN
    IF NOT coalesce(p_statuses OPERATOR(pg_catalog.<@) ARRAY['delivered', 'pending', 'dead', 'running', 'waiting'], false) THEN
        PERFORM crm_bridge.check_statuses_v1(p_statuses, ARRAY['delivered', 'pending', 'dead', 'running', 'waiting']);
    END IF;
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
    SELECT pg_catalog.count(*),
           -- 0024: every outcome but a delivered, attempted call one by one ...
           pg_catalog.array_agg(j.live_trigger_id) FILTER (WHERE NOT (j.status = 'delivered' AND j.attempted > 0)),
           pg_catalog.array_agg(j.status) FILTER (WHERE NOT (j.status = 'delivered' AND j.attempted > 0)),
           pg_catalog.array_agg(j.attempted) FILTER (WHERE NOT (j.status = 'delivered' AND j.attempted > 0)),
           pg_catalog.array_agg(j.http_status) FILTER (WHERE NOT (j.status = 'delivered' AND j.attempted > 0)),
           pg_catalog.array_agg(j.error) FILTER (WHERE NOT (j.status = 'delivered' AND j.attempted > 0)),
           -- ... and those once per URL
           pg_catalog.array_agg(DISTINCT j.live_trigger_id) FILTER (WHERE j.status = 'delivered' AND j.attempted > 0)
      INTO n, v_triggers, v_statuses, v_attempted, v_http, v_errors, v_ok FROM j;
    IF n > 0 THEN
        IF v_ok IS NOT NULL THEN
            v_triggers := coalesce(v_triggers, '{}') OPERATOR(pg_catalog.||) v_ok;
            v_statuses := coalesce(v_statuses, '{}') OPERATOR(pg_catalog.||)
                          pg_catalog.array_fill('delivered'::text, ARRAY[pg_catalog.cardinality(v_ok)]);
            v_attempted := coalesce(v_attempted, '{}') OPERATOR(pg_catalog.||)
                           pg_catalog.array_fill(1, ARRAY[pg_catalog.cardinality(v_ok)]);
            v_http := coalesce(v_http, '{}') OPERATOR(pg_catalog.||)
                      pg_catalog.array_fill(NULL::integer, ARRAY[pg_catalog.cardinality(v_ok)]);
            v_errors := coalesce(v_errors, '{}') OPERATOR(pg_catalog.||)
                        pg_catalog.array_fill(NULL::text, ARRAY[pg_catalog.cardinality(v_ok)]);
        END IF;
        PERFORM crm_bridge.note_url_stats_v1(v_triggers, v_statuses, v_attempted, v_http, v_errors);
    END IF;
    RETURN n;
END
$fn$;
COMMENT ON FUNCTION crm_bridge.daemon_record(text, bigint, bigint[], text[], integer[], integer[], text[], float8[], integer[], interval) IS
    'Daemon only: record the outcomes of one batch this worker holds (delivered -> history; others -> queue)';
