-- Every query the daemon and the CLI run.  Each starts with a "-- name: xxx" header line and a
-- one-line description; bridge/sqlfiles.py splits the file at those headers.
-- Parameters use psycopg's %(name)s style.

-- name: dispatch_events
-- Move up to %(batch)s outbox events into one delivery per interested URL and claim the sendable
-- ones for this worker.  Returns every delivery created (unrouted ones have no url).
WITH ev AS (
    DELETE FROM crm_bridge.event
     WHERE id = ANY (ARRAY(SELECT e.id FROM crm_bridge.event e
                            ORDER BY e.id LIMIT %(batch)s FOR UPDATE SKIP LOCKED))
    RETURNING id, object, event, ids, created_at, origin_role, origin, changed, rows
), rec AS (
    -- Statement-level captures hold several records: ids is then 2-D, one row per record.
    SELECT ev.id, ev.object, ev.event, ev.created_at, ev.origin_role, ev.origin, ev.changed, k AS rec_no,
           CASE WHEN array_ndims(ev.ids) = 2 THEN ARRAY(SELECT unnest(ev.ids[k:k])) ELSE ev.ids END AS ids,
           ev.rows -> (k - 1) AS row_data
      FROM ev, generate_series(1, CASE WHEN array_ndims(ev.ids) = 2 THEN array_length(ev.ids, 1) ELSE 1 END) AS k
), routed AS (
    SELECT ev.*, ev.ids::text AS record_key, t.id AS trigger_id, t.url, t.paused, t.ordered, t.coalesce_edits,
           t.include_row,
           row_number() OVER (PARTITION BY t.id ORDER BY ev.id, ev.rec_no) AS n_url,
           row_number() OVER (PARTITION BY t.id, ev.ids::text ORDER BY ev.id, ev.rec_no) AS n_record,
           row_number() OVER (PARTITION BY t.id, ev.ids::text, ev.event ORDER BY ev.id, ev.rec_no) AS n_record_event,
           coalesce(f.free, t.max_in_flight, %(default_limit)s) AS free
      FROM rec ev
      LEFT JOIN crm_bridge.crm_trigger t
             ON t.object = ev.object AND t.event = ev.event AND t.enabled
            -- echo suppression and column filters
            AND (ev.origin_role IS NULL OR t.exclude_roles IS NULL OR NOT ev.origin_role = ANY (t.exclude_roles))
            AND (ev.origin IS NULL OR t.exclude_origins IS NULL OR NOT ev.origin = ANY (t.exclude_origins))
            AND (t.only_columns IS NULL OR ev.changed IS NULL OR ev.changed && t.only_columns)
      LEFT JOIN unnest(%(busy_ids)s::bigint[], %(busy_free)s::int[]) AS f(trigger_id, free)
             ON f.trigger_id = t.id
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
                                        AND (e2.ids = r.ids OR array_ndims(e2.ids) = 2))) THEN 'pending'
                ELSE 'in_flight' END AS status
      FROM routed r
), ins AS (
    INSERT INTO crm_bridge.delivery (event_id, object, event, ids, event_created_at, trigger_id, url,
                                     record_key, ordered, status, next_attempt_at, lease_until, worker,
                                     finished_at, last_error, row)
    SELECT d.id, d.object, d.event, d.ids, d.created_at, d.trigger_id, d.url, d.record_key,
           coalesce(d.ordered, false), d.status,
           CASE WHEN d.status IN ('pending', 'in_flight') THEN now() END,
           CASE WHEN d.status = 'in_flight' THEN now() + %(lease)s::interval END,
           CASE WHEN d.status = 'in_flight' THEN %(worker)s END,
           CASE WHEN d.status IN ('unrouted', 'coalesced') THEN now() END,
           CASE WHEN d.status = 'coalesced' THEN 'folded into an earlier unsent edit call for this record' END,
           CASE WHEN d.include_row THEN d.row_data END
      FROM decided d
     ORDER BY d.id, d.rec_no, d.trigger_id
    RETURNING id, event_id, object, event, ids, event_created_at, trigger_id, status, attempts, ordered, row
)
-- Only the claimed deliveries come back (a bulk event may create 100,000 pending ones), plus the
-- counts on every row; a single row of counts with NULL deliveries when nothing was claimed.
, counts AS (
    SELECT count(DISTINCT event_id) AS n_events,
           count(*) FILTER (WHERE status = 'pending') AS n_pending,
           count(*) FILTER (WHERE status = 'unrouted') AS n_unrouted
      FROM ins
)
SELECT c.n_events, c.n_pending, c.n_unrouted, x.*
  FROM counts c
  LEFT JOIN (
      SELECT ins.id, ins.event_id, ins.object, ins.event, ins.ids, ins.event_created_at, ins.status,
             ins.attempts, t.id AS trigger_id, t.url, t.timeout_ms, t.max_attempts, t.retry_schedule,
             t.max_in_flight, o.id_params, ins.ordered,
             t.method, t.headers, t.follow_redirects,
             (SELECT s.secret FROM crm_bridge.signing_secret s WHERE s.trigger_id = t.id) AS signing_secret,
             ins.row
        FROM ins
        JOIN crm_bridge.crm_trigger t ON t.id = ins.trigger_id
        JOIN crm_bridge.object_type o ON o.object = ins.object
       WHERE ins.status = 'in_flight'
  ) x ON true
 ORDER BY x.id;

-- name: claim_due
-- Claim pending deliveries whose next attempt is due: per enabled, unpaused URL at most its free
-- slots in this worker (busy_ids/busy_free; others get max_in_flight), %(batch)s in all.
UPDATE crm_bridge.delivery d
   SET status = 'in_flight', lease_until = now() + %(lease)s::interval, worker = %(worker)s,
       updated_at = now()
  FROM crm_bridge.crm_trigger t, crm_bridge.object_type o
 WHERE d.id = ANY (ARRAY(
           SELECT p.id
             FROM crm_bridge.crm_trigger pt
             LEFT JOIN unnest(%(busy_ids)s::bigint[], %(busy_free)s::int[]) AS f(trigger_id, free)
                    ON f.trigger_id = pt.id
            CROSS JOIN LATERAL (
                  SELECT x.id FROM crm_bridge.delivery x
                   WHERE x.trigger_id = pt.id AND x.status = 'pending' AND x.next_attempt_at <= now()
                     AND (NOT x.ordered OR (
                          NOT EXISTS (SELECT 1 FROM crm_bridge.delivery y
                                       WHERE y.ordered AND y.trigger_id = x.trigger_id AND y.record_key = x.record_key
                                         AND y.status IN ('pending', 'in_flight') AND y.event_id < x.event_id)
                          AND NOT EXISTS (SELECT 1 FROM crm_bridge.event e2
                                           WHERE e2.id < x.event_id AND e2.object = x.object
                                             AND (e2.ids = x.ids OR array_ndims(e2.ids) = 2))))
                   ORDER BY x.next_attempt_at, x.id
                   LIMIT least(coalesce(f.free, pt.max_in_flight, %(default_limit)s), %(batch)s)
                     FOR UPDATE SKIP LOCKED) p
            WHERE pt.enabled AND NOT pt.paused
            LIMIT %(batch)s))
   AND t.id = d.trigger_id AND o.object = d.object
RETURNING d.id, d.event_id, d.object, d.event, d.ids, d.event_created_at, d.status, d.attempts,
          t.id AS trigger_id, t.url, t.timeout_ms, t.max_attempts, t.retry_schedule,
          t.max_in_flight, o.id_params, d.ordered,
          t.method, t.headers, t.follow_redirects,
          (SELECT s.secret FROM crm_bridge.signing_secret s WHERE s.trigger_id = t.id) AS signing_secret,
          d.row;

-- name: complete
-- Record the outcome of finished attempts in one statement; failed attempts also get a row in
-- crm_bridge.attempt.  Rows whose lease this worker lost are left alone.
WITH r AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(statuses)s::text[], %(attempted)s::int[],
                         %(http_status)s::int[], %(errors)s::text[], %(delays)s::float8[],
                         %(durations)s::int[])
               AS r(id, status, attempted, http_status, error, delay, duration_ms)
), upd AS (
    UPDATE crm_bridge.delivery d
       SET status = r.status,
           attempts = d.attempts + r.attempted,
           last_status = CASE WHEN r.attempted > 0 THEN r.http_status ELSE d.last_status END,
           last_error = CASE WHEN r.attempted > 0 THEN r.error ELSE d.last_error END,
           next_attempt_at = CASE WHEN r.status = 'pending'
                                  THEN now() + r.delay * interval '1 second' END,
           lease_until = NULL, updated_at = now(),
           finished_at = CASE WHEN r.status IN ('delivered', 'dead') THEN now() END
      FROM r
     WHERE d.id = r.id AND d.status = 'in_flight' AND d.worker = %(worker)s
    RETURNING d.id, d.attempts
)
INSERT INTO crm_bridge.attempt (delivery_id, attempt, duration_ms, status, error, worker)
SELECT upd.id, upd.attempts, r.duration_ms, r.http_status, r.error, %(worker)s
  FROM upd JOIN r ON r.id = upd.id
 WHERE r.attempted > 0 AND r.status <> 'delivered';

-- name: heartbeat
-- Extend the leases of everything this worker holds.
UPDATE crm_bridge.delivery
   SET lease_until = now() + %(lease)s::interval
 WHERE status = 'in_flight' AND worker = %(worker)s;

-- name: recover_expired
-- Put deliveries whose worker stopped heart-beating back in the queue.
UPDATE crm_bridge.delivery d
   SET status = 'pending', next_attempt_at = now(), lease_until = NULL, worker = NULL, updated_at = now()
 WHERE d.id = ANY (ARRAY(SELECT x.id FROM crm_bridge.delivery x
                          WHERE x.status = 'in_flight' AND x.lease_until < now()
                          LIMIT 10000 FOR UPDATE SKIP LOCKED))
RETURNING d.id;

-- name: cancel_orphans
-- Deliveries whose crm_trigger row was deleted are cancelled rather than retried.
UPDATE crm_bridge.delivery
   SET status = 'cancelled', finished_at = now(), updated_at = now(), next_attempt_at = NULL
 WHERE status = 'pending' AND trigger_id IS NULL;

-- name: release
-- Give deliveries back to the queue without counting an attempt (shutdown).
UPDATE crm_bridge.delivery
   SET status = 'pending', next_attempt_at = now(), lease_until = NULL, worker = NULL, updated_at = now()
 WHERE status = 'in_flight' AND worker = %(worker)s;

-- name: retention_delete
-- Delete up to %(batch)s finished deliveries (and their attempts) older than the retention period.
DELETE FROM crm_bridge.delivery
 WHERE id = ANY (ARRAY(SELECT id FROM crm_bridge.delivery
                        WHERE status IN ('delivered', 'unrouted', 'cancelled', 'coalesced')
                          AND finished_at < now() - %(retention)s::interval
                        ORDER BY finished_at
                        LIMIT %(batch)s));

-- name: idle_lock
-- Taken by a daemon that has drained the outbox and waits: writers that see it NOTIFY.
SELECT pg_advisory_lock(1668441442, 1);

-- name: idle_unlock
-- Released as soon as the daemon is busy again: writers skip NOTIFY while it drains.
SELECT pg_advisory_unlock(1668441442, 1);

-- name: dead_letter_count
-- How many dead letters match the replay/purge filters.
SELECT count(*) FROM crm_bridge.dead_letters(%(trigger_id)s, %(url)s, %(object)s, %(since)s, %(until)s, %(ids)s);

-- name: dead_letter_sample
-- A few matching dead letters, for --dry-run: the record as AccountID=…&CaseID=…, the current URL.
SELECT x.id, x.object, x.event,
       array_to_string(ARRAY(SELECT p || '=' || coalesce(v, 'NULL')
                               FROM unnest(o.id_params, x.ids) AS u(p, v)), '&') AS record,
       coalesce(t.url, x.url) AS url, x.attempts, x.last_status, x.last_error, x.finished_at, x.next_attempt_at
  FROM crm_bridge.dead_letters(%(trigger_id)s, %(url)s, %(object)s, %(since)s, %(until)s, %(ids)s) x
  JOIN crm_bridge.object_type o ON o.object = x.object
  LEFT JOIN crm_bridge.crm_trigger t ON t.id = x.trigger_id
 ORDER BY x.id LIMIT %(limit)s;

-- name: replay_batch
-- Queue up to %(limit)s matching dead letters again.
SELECT crm_bridge.replay(%(trigger_id)s, %(url)s, %(object)s, %(since)s, %(until)s, %(ids)s, %(limit)s);

-- name: purge_batch
-- Delete up to %(limit)s matching dead letters.
SELECT crm_bridge.purge(%(trigger_id)s, %(url)s, %(object)s, %(since)s, %(until)s, %(ids)s, %(limit)s);

-- name: pending_count
-- How many pending deliveries retry-now would make due (the predicate of crm_bridge.retry_now).
SELECT count(*) FROM crm_bridge.delivery d
 WHERE d.status = 'pending' AND d.next_attempt_at > now()
   AND (%(trigger_id)s::bigint IS NULL OR d.trigger_id = %(trigger_id)s)
   AND (%(url)s::text IS NULL OR d.url = %(url)s
        OR d.trigger_id IN (SELECT t.id FROM crm_bridge.crm_trigger t WHERE t.url = %(url)s))
   AND (%(object)s::text IS NULL OR d.object = %(object)s)
   AND (%(ids)s::bigint[] IS NULL OR d.id = ANY (%(ids)s))
   AND (%(record)s::text[] IS NULL OR d.ids = %(record)s);

-- name: pending_sample
-- A few of them, for retry-now --dry-run.
SELECT d.id, d.object, d.event,
       array_to_string(ARRAY(SELECT p || '=' || coalesce(v, 'NULL')
                               FROM unnest(o.id_params, d.ids) AS u(p, v)), '&') AS record,
       coalesce(t.url, d.url) AS url, d.attempts, d.last_status, d.last_error, d.finished_at, d.next_attempt_at
  FROM crm_bridge.delivery d
  JOIN crm_bridge.object_type o ON o.object = d.object
  LEFT JOIN crm_bridge.crm_trigger t ON t.id = d.trigger_id
 WHERE d.status = 'pending' AND d.next_attempt_at > now()
   AND (%(trigger_id)s::bigint IS NULL OR d.trigger_id = %(trigger_id)s)
   AND (%(url)s::text IS NULL OR d.url = %(url)s OR t.url = %(url)s)
   AND (%(object)s::text IS NULL OR d.object = %(object)s)
   AND (%(ids)s::bigint[] IS NULL OR d.id = ANY (%(ids)s))
   AND (%(record)s::text[] IS NULL OR d.ids = %(record)s)
 ORDER BY d.next_attempt_at, d.id LIMIT %(limit)s;

-- name: retry_now
-- Make matching pending deliveries due now.
SELECT crm_bridge.retry_now(%(trigger_id)s, %(url)s, %(object)s, %(ids)s, %(record)s);

-- name: delivery_explain
-- When a filter matched nothing: the deliveries it would match in any status, and their URL's state.
SELECT d.id, d.object, d.event, d.status, d.attempts, d.next_attempt_at, d.finished_at, d.worker,
       d.last_error,
       array_to_string(ARRAY(SELECT p || '=' || coalesce(v, 'NULL')
                               FROM unnest(o.id_params, d.ids) AS u(p, v)), '&') AS record,
       CASE WHEN t.id IS NULL THEN NULL WHEN NOT t.enabled THEN 'disabled' WHEN t.paused THEN 'paused'
            ELSE 'active' END AS url_state
  FROM crm_bridge.delivery d
  JOIN crm_bridge.object_type o ON o.object = d.object
  LEFT JOIN crm_bridge.crm_trigger t ON t.id = d.trigger_id
 WHERE (%(trigger_id)s::bigint IS NULL OR d.trigger_id = %(trigger_id)s)
   AND (%(url)s::text IS NULL OR d.url = %(url)s OR t.url = %(url)s)
   AND (%(object)s::text IS NULL OR d.object = %(object)s)
   AND (%(since)s::timestamptz IS NULL OR d.event_created_at >= %(since)s)
   AND (%(until)s::timestamptz IS NULL OR d.event_created_at < %(until)s)
   AND (%(ids)s::bigint[] IS NULL OR d.id = ANY (%(ids)s))
   AND (%(record)s::text[] IS NULL OR d.ids = %(record)s)
 ORDER BY d.id DESC LIMIT %(limit)s;

-- name: trigger_by_id
-- Is there a configured URL with this id?
SELECT id FROM crm_bridge.crm_trigger WHERE id = %(id)s;

-- name: trigger_by_url
-- Is there a configured URL that is exactly this?
SELECT id FROM crm_bridge.crm_trigger WHERE url = %(url)s LIMIT 1;

-- name: trigger_list
-- Configured URLs, for "no URL matched" messages.
SELECT id, object, event, url FROM crm_bridge.crm_trigger ORDER BY id LIMIT %(limit)s;

-- ---------------------------------------------------------------------------------------------
-- Operations: `crm-bridge status`, `crm-bridge check`, the daemon's STATUS= line and metrics.
-- They read the views of migrations/0002_views.sql, so DBAs in psql see the same numbers.
-- ---------------------------------------------------------------------------------------------

-- name: status_session
-- The status connection never waits long: a slow view must not hold up STATUS= or a scrape.
SELECT set_config('statement_timeout', %(timeout)s, false);

-- name: status_summary
-- One row: backlog, pending/retrying/in-flight/dead counts, oldest pending age, daemons.
SELECT backlog, extract(epoch FROM oldest_event_age)::float8 AS oldest_event_age,
       pending, retrying, in_flight, dead,
       extract(epoch FROM oldest_pending_age)::float8 AS oldest_pending_age,
       active_urls, daemons, at
  FROM crm_bridge.summary;

-- name: status_backlog
-- The outbox per object and event.
SELECT object, event, events, oldest_at, extract(epoch FROM oldest_age)::float8 AS oldest_age
  FROM crm_bridge.backlog
 ORDER BY object, event;

-- name: status_urls
-- Per URL: queue counts, oldest pending, last success and last failure.
SELECT id, object, event, url, state, pending, retrying, in_flight, dead,
       oldest_pending_at, extract(epoch FROM oldest_pending_age)::float8 AS oldest_pending_age,
       last_dead_at, last_success_at, last_failure_at, last_failure_status, last_failure_error
  FROM crm_bridge.url_status
 ORDER BY id;

-- name: metrics_urls
-- Per URL queue counts for the metrics (cheap view; at most %(limit)s URLs).
SELECT id, object, event, url, state, pending, retrying, in_flight, dead
  FROM crm_bridge.url_queue
 ORDER BY id
 LIMIT %(limit)s;

-- name: check_urls
-- Every configured URL, for `crm-bridge check`.
SELECT id, object, event, url, enabled, paused
  FROM crm_bridge.crm_trigger
 ORDER BY id;

-- name: check_unattached
-- Objects that have enabled URLs but no table attached: nothing will ever call those URLs.
SELECT t.object, count(*) AS urls, o.id_params
  FROM crm_bridge.crm_trigger t
  JOIN crm_bridge.object_type o ON o.object = t.object
 WHERE t.enabled
   AND NOT EXISTS (SELECT 1 FROM crm_bridge.attachment a WHERE a.object = t.object)
 GROUP BY t.object, o.id_params
 ORDER BY t.object;

-- name: check_attachments
-- Attached tables whose capture triggers were dropped or disabled after attach(): one row per
-- trigger that will not fire (problem: missing | disabled | replica-only).
SELECT a.table_name::text AS table_name, a.object, w.name AS trigger_name,
       CASE WHEN g.oid IS NULL THEN 'missing' WHEN g.tgenabled = 'D' THEN 'disabled'
            ELSE 'replica-only' END AS problem
  FROM crm_bridge.attachment a
  JOIN crm_bridge.object_type o ON o.object = a.object
 CROSS JOIN LATERAL unnest(
       ARRAY(SELECT 'crm_bridge_emit_' || e FROM unnest(o.events) e)) AS w(name)
  LEFT JOIN pg_catalog.pg_trigger g ON g.tgrelid = a.table_name AND g.tgname = w.name
 WHERE g.oid IS NULL OR g.tgenabled IN ('D', 'R')
 ORDER BY 1, 3;
