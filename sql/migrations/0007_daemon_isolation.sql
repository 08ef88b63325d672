-- crm-bridge schema, version 7: the daemon writes only through functions, and one bad row is isolated.
--
-- * Every write the daemon makes goes through a SECURITY DEFINER function named crm_bridge.daemon_*
--   (apply_grants gives the daemon role EXECUTE on them and no INSERT/UPDATE/DELETE on any table):
--   a daemon login can no longer LOCK the outbox (that needs UPDATE/DELETE/TRUNCATE on it) and block
--   every CRM write, nor insert forged deliveries.
-- * Record keys are md5 hashes of the IDs: no index holds unbounded user data (ID values are as
--   long as the CRM's own keys allow; a b-tree entry is limited to ~2.7 kB).
-- * Bulk events are expanded once (unnest ... WITH ORDINALITY), not sliced per record, and one
--   dispatch takes bulk events up to a size budget: the cost per record does not grow with the
--   statement, and the main loop stays responsive during an import.
-- * Per-URL retry delays reach the daemon as seconds capped at 7 days: an absurd interval that
--   slipped past validation cannot make a claimed row unreadable.
-- * Heartbeats extend only the deliveries the calling process holds; a restarted daemon releases
--   what its previous incarnation held at once.
-- * Coalesced edits of URLs with include_row send the newest row (old: before the first folded
--   edit, new: after the last).

-- Rows travel as json end to end (capture: migration 0004): jsonb refuses values a json column
-- holds (\u0000, lone surrogates), and the daemon sends the text as it is anyway.
ALTER TABLE crm_bridge.delivery ALTER COLUMN "row" TYPE pg_catalog.json USING "row"::pg_catalog.json;

UPDATE crm_bridge.delivery SET record_key = md5(record_key)
 WHERE status IN ('pending', 'in_flight') AND left(record_key, 1) = '{';
COMMENT ON COLUMN crm_bridge.delivery.record_key IS
    'md5 of the record''s IDs (ordering and coalescing compare records by it; never the IDs themselves)';

-- Longest delay a retry may wait, whatever the configuration says.
CREATE FUNCTION crm_bridge.max_retry_delay() RETURNS float8
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 604800::float8 $$;

-- A URL's retry schedule in seconds, each delay clamped to [0, max_retry_delay()]; NULL = defaults.
CREATE FUNCTION crm_bridge.retry_seconds(schedule interval[]) RETURNS float8[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
    SELECT CASE WHEN schedule IS NOT NULL THEN ARRAY(
        SELECT least(greatest(coalesce(pg_catalog.date_part('epoch', s), 0), 0), crm_bridge.max_retry_delay())::float8
          FROM pg_catalog.unnest(schedule) WITH ORDINALITY AS u(s, n) ORDER BY n) END
$$;

-- ---------------------------------------------------------------------------------------------
-- What a claimed delivery looks like to the daemon (dispatch and claim_due return the same).
-- headers and "row" come as text, not jsonb: the daemon never parses the row (it splices its
-- text into the POST body as is), and parses headers per delivery; a value psycopg's JSON loader
-- cannot decode (nested 3000 deep, a numeric of 5000 digits) would otherwise fail the whole fetch.
-- event_created_at is NULL when Python's datetime cannot hold it (an admin's 'infinity'): that
-- delivery becomes a dead letter instead of failing the fetch of its batch.
-- ---------------------------------------------------------------------------------------------
-- A time as the daemon receives it: NULL outside the years Python's datetime holds (with a margin
-- for time zones), so that one odd value cannot fail the fetch of a whole batch.
CREATE FUNCTION crm_bridge.loadable_time(t timestamptz) RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
    SELECT CASE WHEN t OPERATOR(pg_catalog.>) '0002-01-01 00:00:00+00'::timestamptz
                 AND t OPERATOR(pg_catalog.<) '9999-01-01 00:00:00+00'::timestamptz THEN t END
$$;

CREATE TYPE crm_bridge.claimed AS (
    id bigint, event_id bigint, object text, event text, ids text[], event_created_at timestamptz,
    status text, attempts integer, trigger_id bigint, url text, timeout_ms integer, max_attempts integer,
    retry_schedule float8[], max_in_flight integer, id_params text[], ordered boolean, method text,
    headers text, follow_redirects boolean, signing_secret text, "row" text);
-- dispatch: the same, after three counts (on every row; one row with NULL delivery fields when
-- nothing was claimed).
CREATE TYPE crm_bridge.dispatched AS (
    n_events bigint, n_pending bigint, n_unrouted bigint,
    id bigint, event_id bigint, object text, event text, ids text[], event_created_at timestamptz,
    status text, attempts integer, trigger_id bigint, url text, timeout_ms integer, max_attempts integer,
    retry_schedule float8[], max_in_flight integer, id_params text[], ordered boolean, method text,
    headers text, follow_redirects boolean, signing_secret text, "row" text);

-- ---------------------------------------------------------------------------------------------
-- dispatch: move outbox events into one delivery per interested URL, claim the sendable ones.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION crm_bridge.daemon_dispatch(
    p_batch integer, p_bulk_bytes integer, p_lease interval, p_worker text,
    p_busy_ids bigint[], p_busy_free integer[], p_default_limit integer, p_only bigint[] DEFAULT NULL)
RETURNS SETOF crm_bridge.dispatched
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $fn$
BEGIN
    RETURN QUERY
    WITH window_ AS (
        -- The next events in commit order (or exactly p_only, when isolating a failed batch).
        SELECT e.id, pg_catalog.pg_column_size(e.ids) AS sz
          FROM crm_bridge.event e
         WHERE p_only IS NULL OR e.id = ANY (p_only)
         ORDER BY e.id LIMIT p_batch
           FOR UPDATE SKIP LOCKED
    ), picked AS (
        -- Small events all; bulk events (statement-level captures) while their stored size fits
        -- the budget, at least one: one dispatch stays bounded however large a statement was.
        SELECT w.id FROM (
            SELECT w.id, w.sz,
                   pg_catalog.sum(CASE WHEN w.sz > 512 THEN w.sz ELSE 0 END) OVER (ORDER BY w.id) AS bulk_cum
              FROM window_ w) w
         WHERE w.sz <= 512 OR w.bulk_cum - w.sz < p_bulk_bytes
    ), ev AS (
        DELETE FROM crm_bridge.event e USING picked WHERE e.id = picked.id
        RETURNING e.id, e.object, e.event, e.ids, e.created_at, e.origin_role, e.origin, e.changed, e.rows,
                  -- computed once per event: evaluated per element, a toasted array would be
                  -- read again for every record (quadratic in the statement's size)
                  pg_catalog.array_ndims(e.ids) AS ndims, pg_catalog.array_length(e.ids, 2) AS width
    ), rec AS (
        -- One row per record.  Statement-level captures hold a 2-D ids array (one row per
        -- record) and a json array of rows aligned with it: expanded once, in linear time.
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
               pg_catalog.row_number() OVER (PARTITION BY t.id ORDER BY ev.id, ev.rec_no) AS n_url,
               pg_catalog.row_number() OVER (PARTITION BY t.id, ev.record_key ORDER BY ev.id, ev.rec_no) AS n_record,
               pg_catalog.row_number() OVER by_record_event AS n_record_event,
               pg_catalog.last_value(ev.row_data) OVER (by_record_event
                   ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING) AS last_row,
               coalesce(f.free, t.max_in_flight, p_default_limit) AS free
          FROM keyed ev
          LEFT JOIN crm_bridge.crm_trigger t
                 ON t.object = ev.object AND t.event = ev.event AND t.enabled
                -- echo suppression and column filters
                AND (ev.origin_role IS NULL OR t.exclude_roles IS NULL OR NOT ev.origin_role = ANY (t.exclude_roles))
                AND (ev.origin IS NULL OR t.exclude_origins IS NULL OR NOT ev.origin = ANY (t.exclude_origins))
                AND (t.only_columns IS NULL OR ev.changed IS NULL OR ev.changed && t.only_columns)
          LEFT JOIN ROWS FROM (pg_catalog.unnest(p_busy_ids), pg_catalog.unnest(p_busy_free)) AS f(trigger_id, free) ON f.trigger_id = t.id
        WINDOW by_record_event AS (PARTITION BY t.id, ev.record_key, ev.event ORDER BY ev.id, ev.rec_no)
    ), decided AS (
        SELECT r.*,
               CASE WHEN r.trigger_id IS NULL THEN 'unrouted'
                    -- An edit whose record already has an unsent edit call (queued, or earlier in
                    -- this batch) needs no call of its own: the receiver reads the current record.
                    WHEN r.coalesce_edits AND r.event = 'edit'
                         AND (r.n_record_event > 1
                              OR EXISTS (SELECT 1 FROM crm_bridge.delivery y
                                          WHERE y.trigger_id = r.trigger_id AND y.record_key = r.record_key
                                            AND y.status = 'pending' AND y.event = 'edit')) THEN 'coalesced'
                    WHEN r.paused OR r.n_url > r.free THEN 'pending'
                    -- Ordered URLs: one call per record at a time, in commit (= event id) order.
                    -- An earlier event of the record still in the outbox is being dispatched by
                    -- another daemon right now: wait for it too.
                    WHEN r.ordered
                         AND (r.n_record > 1
                              OR EXISTS (SELECT 1 FROM crm_bridge.delivery y
                                          WHERE y.ordered AND y.trigger_id = r.trigger_id
                                            AND y.record_key = r.record_key
                                            AND y.status IN ('pending', 'in_flight'))
                              OR EXISTS (SELECT 1 FROM crm_bridge.event e2
                                          WHERE e2.id < r.id AND e2.object = r.object
                                            AND (e2.ids = r.ids OR pg_catalog.array_ndims(e2.ids) = 2))) THEN 'pending'
                    ELSE 'in_flight' END AS status,
               -- include_row: a coalescing URL's call carries the newest row of the record.
               CASE WHEN NOT coalesce(r.include_row, false) THEN NULL
                    WHEN r.coalesce_edits AND r.event = 'edit' AND r.row_data IS NOT NULL
                    THEN pg_catalog.json_build_object('old', r.row_data OPERATOR(pg_catalog.->) 'old',
                                                      'new', r.last_row OPERATOR(pg_catalog.->) 'new')
                    -- dead-lettered by the daemon's isolation, with the reason
                    ELSE r.row_data END AS send_row
          FROM routed r
    ), refreshed AS (
        -- Edits folded into a call queued by an earlier dispatch: that call now sends the newest row.
        UPDATE crm_bridge.delivery y
           SET "row" = pg_catalog.json_build_object('old', y."row" OPERATOR(pg_catalog.->) 'old',
                                                    'new', c.last_row OPERATOR(pg_catalog.->) 'new'),
               updated_at = now()
          FROM (SELECT DISTINCT ON (d.trigger_id, d.record_key) d.trigger_id, d.record_key, d.last_row
                  FROM decided d
                 WHERE d.status = 'coalesced' AND d.include_row AND d.last_row IS NOT NULL) c
         WHERE y.trigger_id = c.trigger_id AND y.record_key = c.record_key
           AND y.status = 'pending' AND y.event = 'edit'
        RETURNING y.id
    ), ins AS (
        INSERT INTO crm_bridge.delivery (event_id, object, event, ids, event_created_at, trigger_id, url,
                                         record_key, ordered, status, next_attempt_at, lease_until, worker,
                                         finished_at, last_error, "row")
        SELECT d.id, d.object, d.event, d.ids, d.created_at, d.trigger_id, d.url, d.record_key,
               coalesce(d.ordered, false), d.status,
               CASE WHEN d.status IN ('pending', 'in_flight') THEN now() END,
               CASE WHEN d.status = 'in_flight' THEN now() + p_lease END,
               CASE WHEN d.status = 'in_flight' THEN p_worker END,
               CASE WHEN d.status IN ('unrouted', 'coalesced') THEN now() END,
               CASE WHEN d.status = 'coalesced' THEN 'folded into an earlier unsent edit call for this record' END,
               d.send_row
          FROM decided d
         ORDER BY d.id, d.rec_no, d.trigger_id
        RETURNING id, event_id, object, event, ids, event_created_at, trigger_id, status, attempts, ordered, "row"
    ), counts AS (
        SELECT pg_catalog.count(DISTINCT i.event_id) AS n_events,
               pg_catalog.count(*) FILTER (WHERE i.status = 'pending') AS n_pending,
               pg_catalog.count(*) FILTER (WHERE i.status = 'unrouted') AS n_unrouted
          FROM ins i
    )
    -- Only the claimed deliveries come back (a bulk event may create many pending ones), with
    -- the counts on every row; one row of counts and NULL delivery fields when nothing was claimed.
    SELECT c.n_events, c.n_pending, c.n_unrouted, x.*
      FROM counts c
      LEFT JOIN (
          SELECT i.id, i.event_id, i.object, i.event, i.ids, crm_bridge.loadable_time(i.event_created_at),
                 i.status, i.attempts, t.id AS trigger_id, t.url, t.timeout_ms, t.max_attempts,
                 crm_bridge.retry_seconds(t.retry_schedule) AS retry_schedule,
                 t.max_in_flight, o.id_params, i.ordered, t.method, t.headers::text AS headers, t.follow_redirects,
                 (SELECT s.secret FROM crm_bridge.signing_secret s WHERE s.trigger_id = t.id) AS signing_secret,
                 i."row"::text AS "row"
            FROM ins i
            JOIN crm_bridge.crm_trigger t ON t.id = i.trigger_id
            JOIN crm_bridge.object_type o ON o.object = i.object
           WHERE i.status = 'in_flight'
      ) x ON true
     ORDER BY x.id;
END
$fn$;
COMMENT ON FUNCTION crm_bridge.daemon_dispatch(integer, integer, interval, text, bigint[], integer[], integer, bigint[]) IS
    'Daemon only: move outbox events into deliveries and claim the sendable ones (p_only: exactly these events)';

-- The ids of the next outbox events, for isolating a batch that failed as a whole.
CREATE FUNCTION crm_bridge.daemon_outbox_head(p_limit integer) RETURNS SETOF bigint
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$ SELECT e.id FROM crm_bridge.event e ORDER BY e.id LIMIT p_limit $$;

-- An event that cannot be dispatched even alone: out of the outbox, into the dead letters (no URL),
-- with the reason, so that everything behind it flows.
CREATE FUNCTION crm_bridge.daemon_quarantine_event(p_event_id bigint, p_error text) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    WITH ev AS (DELETE FROM crm_bridge.event e WHERE e.id = p_event_id RETURNING e.*)
    INSERT INTO crm_bridge.delivery (event_id, object, event, ids, event_created_at, record_key, status,
                                     finished_at, last_error)
    SELECT ev.id, ev.object, ev.event,
           -- a one-record statement capture is shown like any delivery's IDs
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
-- claim_due: pending deliveries whose next attempt is due, per URL at most its free slots.
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
    UPDATE crm_bridge.delivery d
       SET status = 'in_flight', lease_until = now() + p_lease, worker = p_worker, updated_at = now()
      FROM crm_bridge.crm_trigger t, crm_bridge.object_type o
     WHERE d.id = ANY (ARRAY(
               SELECT p.id
                 FROM crm_bridge.crm_trigger pt
                 LEFT JOIN ROWS FROM (pg_catalog.unnest(p_busy_ids), pg_catalog.unnest(p_busy_free)) AS f(trigger_id, free)
                        ON f.trigger_id = pt.id
                CROSS JOIN LATERAL (
                      SELECT x.id FROM crm_bridge.delivery x
                       WHERE x.trigger_id = pt.id AND x.status = 'pending' AND x.next_attempt_at <= now()
                         AND (NOT x.ordered OR (
                              NOT EXISTS (SELECT 1 FROM crm_bridge.delivery y
                                           WHERE y.ordered AND y.trigger_id = x.trigger_id
                                             AND y.record_key = x.record_key
                                             AND y.status IN ('pending', 'in_flight') AND y.event_id < x.event_id)
                              AND NOT EXISTS (SELECT 1 FROM crm_bridge.event e2
                                               WHERE e2.id < x.event_id AND e2.object = x.object
                                                 AND (e2.ids = x.ids OR pg_catalog.array_ndims(e2.ids) = 2))))
                       ORDER BY x.next_attempt_at, x.id
                       LIMIT least(coalesce(f.free, pt.max_in_flight, p_default_limit), p_batch)
                         FOR UPDATE SKIP LOCKED) p
                WHERE pt.enabled AND NOT pt.paused
                LIMIT p_batch))
       AND t.id = d.trigger_id AND o.object = d.object
    RETURNING d.id, d.event_id, d.object, d.event, d.ids, crm_bridge.loadable_time(d.event_created_at),
              d.status, d.attempts, t.id, t.url, t.timeout_ms, t.max_attempts,
              crm_bridge.retry_seconds(t.retry_schedule), t.max_in_flight, o.id_params, d.ordered, t.method,
              t.headers::text, t.follow_redirects,
              (SELECT s.secret FROM crm_bridge.signing_secret s WHERE s.trigger_id = t.id),
              d."row"::text;
END
$fn$;

-- ---------------------------------------------------------------------------------------------
-- complete: record finished attempts in one statement (failed ones also get an attempt row).
-- Rows whose lease this worker lost are left alone.  Delays are capped (max_retry_delay).
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION crm_bridge.daemon_complete(
    p_worker text, p_ids bigint[], p_statuses text[], p_attempted integer[], p_http_status integer[],
    p_errors text[], p_delays float8[], p_durations integer[])
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $fn$
DECLARE
    n bigint;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.unnest(p_statuses) s WHERE s IS NULL OR s NOT IN ('delivered', 'pending', 'dead')) THEN
        RAISE EXCEPTION 'daemon_complete: a status must be delivered, pending or dead'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    WITH r AS (
        SELECT * FROM ROWS FROM (pg_catalog.unnest(p_ids), pg_catalog.unnest(p_statuses),
                                 pg_catalog.unnest(p_attempted), pg_catalog.unnest(p_http_status),
                                 pg_catalog.unnest(p_errors), pg_catalog.unnest(p_delays),
                                 pg_catalog.unnest(p_durations))
                   AS r(id, status, attempted, http_status, error, delay, duration_ms)
    ), upd AS (
        UPDATE crm_bridge.delivery d
           SET status = r.status,
               attempts = d.attempts + r.attempted,
               last_status = CASE WHEN r.attempted > 0 THEN r.http_status ELSE d.last_status END,
               last_error = CASE WHEN r.attempted > 0 OR r.status = 'dead'
                                 THEN pg_catalog.left(r.error, 1000) ELSE d.last_error END,
               next_attempt_at = CASE WHEN r.status = 'pending'
                                      THEN now() + least(greatest(coalesce(r.delay, 0), 0),
                                                         crm_bridge.max_retry_delay()) * interval '1 second' END,
               lease_until = NULL, updated_at = now(),
               finished_at = CASE WHEN r.status IN ('delivered', 'dead') THEN now() END
          FROM r
         WHERE d.id = r.id AND d.status = 'in_flight' AND d.worker = p_worker
        RETURNING d.id, d.attempts
    ), att AS (
        INSERT INTO crm_bridge.attempt (delivery_id, attempt, duration_ms, status, error, worker)
        SELECT upd.id, upd.attempts, r.duration_ms, r.http_status, pg_catalog.left(r.error, 1000), p_worker
          FROM upd JOIN r ON r.id = upd.id
         WHERE r.attempted > 0 AND r.status <> 'delivered'
    )
    SELECT pg_catalog.count(*) INTO n FROM upd;
    RETURN n;
END
$fn$;

-- An outcome that could not be recorded (the batch and then the row alone failed): the delivery
-- becomes a dead letter with the reason, instead of being sent again and again.
CREATE FUNCTION crm_bridge.daemon_dead_letter(p_worker text, p_id bigint, p_error text) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    UPDATE crm_bridge.delivery d
       SET status = 'dead', lease_until = NULL, updated_at = now(), finished_at = now(),
           last_error = pg_catalog.left(p_error, 1000)
     WHERE d.id = p_id AND d.status = 'in_flight' AND d.worker = p_worker;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n > 0;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Leases.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION crm_bridge.daemon_heartbeat(p_worker text, p_ids bigint[], p_lease interval) RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
    WITH changed AS (
        UPDATE crm_bridge.delivery d SET lease_until = now() + p_lease
         WHERE d.id = ANY (p_ids) AND d.status = 'in_flight' AND d.worker = p_worker
        RETURNING 1)
    SELECT pg_catalog.count(*) FROM changed
$$;
COMMENT ON FUNCTION crm_bridge.daemon_heartbeat(text, bigint[], interval) IS
    'Daemon only: extend the leases of exactly the deliveries this process holds';

-- At start-up: what an earlier process of the same worker name (same host and pid: a restarted
-- container) still holds goes back to the queue now, instead of waiting for its lease.
CREATE FUNCTION crm_bridge.daemon_release_previous(p_base text, p_worker text) RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
    WITH changed AS (
        UPDATE crm_bridge.delivery d
           SET status = 'pending', next_attempt_at = now(), lease_until = NULL, worker = NULL, updated_at = now()
         WHERE d.status = 'in_flight' AND d.worker <> p_worker
           AND (d.worker = p_base OR pg_catalog.left(d.worker, pg_catalog.length(p_base) + 1) = p_base || '/')
        RETURNING 1)
    SELECT pg_catalog.count(*) FROM changed
$$;

CREATE FUNCTION crm_bridge.daemon_release(p_worker text) RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
    WITH changed AS (
        UPDATE crm_bridge.delivery d
           SET status = 'pending', next_attempt_at = now(), lease_until = NULL, worker = NULL, updated_at = now()
         WHERE d.status = 'in_flight' AND d.worker = p_worker
        RETURNING 1)
    SELECT pg_catalog.count(*) FROM changed
$$;

CREATE FUNCTION crm_bridge.daemon_recover_expired() RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
    WITH changed AS (
        UPDATE crm_bridge.delivery d
           SET status = 'pending', next_attempt_at = now(), lease_until = NULL, worker = NULL, updated_at = now()
         WHERE d.id = ANY (ARRAY(SELECT x.id FROM crm_bridge.delivery x
                                  WHERE x.status = 'in_flight' AND x.lease_until < now()
                                  LIMIT 10000 FOR UPDATE SKIP LOCKED))
        RETURNING 1)
    SELECT pg_catalog.count(*) FROM changed
$$;

CREATE FUNCTION crm_bridge.daemon_cancel_orphans() RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
    WITH changed AS (
        UPDATE crm_bridge.delivery d
           SET status = 'cancelled', finished_at = now(), updated_at = now(), next_attempt_at = NULL
         WHERE d.status = 'pending' AND d.trigger_id IS NULL
        RETURNING 1)
    SELECT pg_catalog.count(*) FROM changed
$$;

CREATE FUNCTION crm_bridge.daemon_retention(p_retention interval, p_batch integer) RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
    WITH changed AS (
        DELETE FROM crm_bridge.delivery d
         WHERE d.id = ANY (ARRAY(SELECT x.id FROM crm_bridge.delivery x
                                  WHERE x.status IN ('delivered', 'unrouted', 'cancelled', 'coalesced')
                                    AND x.finished_at < now() - p_retention
                                  ORDER BY x.finished_at
                                  LIMIT p_batch))
        RETURNING 1)
    SELECT pg_catalog.count(*) FROM changed
$$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA crm_bridge FROM PUBLIC;
