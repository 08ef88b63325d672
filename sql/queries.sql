-- Every query the daemon and the CLI run.  Each starts with a "-- name: xxx" header line and a
-- one-line description; bridge/sqlfiles.py splits the file at those headers.
-- Parameters use psycopg's %(name)s style.

-- name: dispatch_events
-- Move up to %(batch)s outbox events into one delivery per enabled URL and claim the sendable
-- ones for this worker.  Returns every delivery created (unrouted ones have no url).
WITH ev AS (
    DELETE FROM crm_bridge.event
     WHERE id = ANY (ARRAY(SELECT e.id FROM crm_bridge.event e
                            ORDER BY e.id LIMIT %(batch)s FOR UPDATE SKIP LOCKED))
    RETURNING id, object, event, ids, created_at, origin_role, origin
), routed AS (
    -- Per URL, the first `free` deliveries are claimed now; the rest wait as pending so that
    -- one URL never holds more than its max_in_flight in this worker.
    SELECT ev.*, t.id AS trigger_id, t.url,
           CASE WHEN t.id IS NULL THEN 'unrouted'
                WHEN t.paused OR row_number() OVER (PARTITION BY t.id ORDER BY ev.id)
                                 > coalesce(f.free, t.max_in_flight, %(default_limit)s) THEN 'pending'
                ELSE 'in_flight' END AS status
      FROM ev
      LEFT JOIN crm_bridge.crm_trigger t
             ON t.object = ev.object AND t.event = ev.event AND t.enabled
      LEFT JOIN unnest(%(busy_ids)s::bigint[], %(busy_free)s::int[]) AS f(trigger_id, free)
             ON f.trigger_id = t.id
), ins AS (
    INSERT INTO crm_bridge.delivery (event_id, object, event, ids, event_created_at, trigger_id, url,
                                     status, next_attempt_at, lease_until, worker, finished_at)
    SELECT r.id, r.object, r.event, r.ids, r.created_at, r.trigger_id, r.url, r.status,
           CASE WHEN r.status <> 'unrouted' THEN now() END,
           CASE WHEN r.status = 'in_flight' THEN now() + %(lease)s::interval END,
           CASE WHEN r.status = 'in_flight' THEN %(worker)s END,
           CASE WHEN r.status = 'unrouted' THEN now() END
      FROM routed r
     ORDER BY r.id, r.trigger_id
    RETURNING id, event_id, object, event, ids, event_created_at, trigger_id, status, attempts
)
SELECT ins.id, ins.event_id, ins.object, ins.event, ins.ids, ins.event_created_at, ins.status,
       ins.attempts, t.id AS trigger_id, t.url, t.timeout_ms, t.max_attempts, t.retry_schedule,
       t.max_in_flight, o.id_params
  FROM ins
  LEFT JOIN crm_bridge.crm_trigger t ON t.id = ins.trigger_id
  JOIN crm_bridge.object_type o ON o.object = ins.object
 ORDER BY ins.id;

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
                   ORDER BY x.next_attempt_at, x.id
                   LIMIT least(coalesce(f.free, pt.max_in_flight, %(default_limit)s), %(batch)s)
                     FOR UPDATE SKIP LOCKED) p
            WHERE pt.enabled AND NOT pt.paused
            LIMIT %(batch)s))
   AND t.id = d.trigger_id AND o.object = d.object
RETURNING d.id, d.event_id, d.object, d.event, d.ids, d.event_created_at, d.status, d.attempts,
          t.id AS trigger_id, t.url, t.timeout_ms, t.max_attempts, t.retry_schedule,
          t.max_in_flight, o.id_params;

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
           lease_until = NULL, worker = NULL, updated_at = now(),
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
                        WHERE status IN ('delivered', 'unrouted', 'cancelled')
                          AND finished_at < now() - %(retention)s::interval
                        ORDER BY finished_at
                        LIMIT %(batch)s));

-- name: idle_lock
-- Taken by a daemon that has drained the outbox and waits: writers that see it NOTIFY.
SELECT pg_advisory_lock(1668441442, 1);

-- name: idle_unlock
-- Released as soon as the daemon is busy again: writers skip NOTIFY while it drains.
SELECT pg_advisory_unlock(1668441442, 1);

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
       CASE WHEN o.events && ARRAY['create', 'delete'] THEN ARRAY['crm_bridge_emit'] ELSE '{}' END
       || CASE WHEN 'edit' = ANY (o.events) THEN ARRAY['crm_bridge_emit_edit'] ELSE '{}' END) AS w(name)
  LEFT JOIN pg_catalog.pg_trigger g ON g.tgrelid = a.table_name AND g.tgname = w.name
 WHERE g.oid IS NULL OR g.tgenabled IN ('D', 'R')
 ORDER BY 1, 3;
