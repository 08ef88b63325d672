-- crm-bridge schema, version 2: read-only views for DBAs, `crm-bridge status` and the metrics.
--
-- `crm-bridge status` and the daemon's STATUS=/metrics read exactly these views, so a DBA in
-- psql sees the same numbers.  Definitions:
--   backlog    events in the outbox (crm_bridge.event) that no daemon has dispatched yet
--   pending    deliveries waiting for an attempt (new, paused or waiting for a retry)
--   retrying   pending deliveries that have failed at least once
--   in_flight  deliveries a daemon is calling right now (claimed under a lease)
--   dead       dead letters: given up, kept until replayed or purged
-- Every count uses a status-specific predicate so that it can use the partial indexes of 0001.
-- Ages are intervals, NULL when there is nothing waiting.

-- now() - ts, never negative (an event created while this statement runs has age 0), NULL for NULL.
CREATE FUNCTION crm_bridge.age_of(ts timestamptz) RETURNS interval
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT CASE WHEN ts IS NOT NULL THEN greatest(now() - ts, interval '0') END $$;
COMMENT ON FUNCTION crm_bridge.age_of(timestamptz) IS 'now() - ts, at least 0; NULL when ts is NULL';

-- ---------------------------------------------------------------------------------------------
-- The outbox per object and event.
-- ---------------------------------------------------------------------------------------------
CREATE VIEW crm_bridge.backlog AS
SELECT e.object, e.event,
       -- a statement-level capture holds several records (2-D ids): count the records
       sum(CASE WHEN array_ndims(e.ids) = 2 THEN array_length(e.ids, 1) ELSE 1 END)::bigint AS events,
       min(e.created_at)                              AS oldest_at,
       crm_bridge.age_of(min(e.created_at))          AS oldest_age
  FROM crm_bridge.event e
 GROUP BY e.object, e.event;
COMMENT ON VIEW crm_bridge.backlog IS
    'Captured events not yet dispatched by a daemon, per object and event';

-- ---------------------------------------------------------------------------------------------
-- Queue counts per URL (cheap: partial indexes only).
-- ---------------------------------------------------------------------------------------------
CREATE VIEW crm_bridge.url_queue AS
SELECT t.id, t.object, t.event, t.url, t.enabled, t.paused,
       CASE WHEN NOT t.enabled THEN 'disabled' WHEN t.paused THEN 'paused' ELSE 'active' END AS state,
       p.pending, p.retrying, i.in_flight, d.dead,
       least(p.oldest_at, i.oldest_at)                                   AS oldest_pending_at,
       crm_bridge.age_of(least(p.oldest_at, i.oldest_at))               AS oldest_pending_age,
       d.last_dead_at
  FROM crm_bridge.crm_trigger t
 CROSS JOIN LATERAL (
       SELECT count(*) AS pending, count(*) FILTER (WHERE x.attempts > 0) AS retrying,
              min(x.event_created_at) AS oldest_at
         FROM crm_bridge.delivery x WHERE x.trigger_id = t.id AND x.status = 'pending') p
 CROSS JOIN LATERAL (
       SELECT count(*) AS in_flight, min(x.event_created_at) AS oldest_at
         FROM crm_bridge.delivery x WHERE x.trigger_id = t.id AND x.status = 'in_flight') i
 CROSS JOIN LATERAL (
       SELECT count(*) AS dead, max(x.finished_at) AS last_dead_at
         FROM crm_bridge.delivery x WHERE x.trigger_id = t.id AND x.status = 'dead') d;
COMMENT ON VIEW crm_bridge.url_queue IS
    'Per configured URL: pending, retrying, in-flight and dead deliveries, oldest undelivered event';

-- ---------------------------------------------------------------------------------------------
-- url_queue plus the last success and the last failed attempt per URL.  These read the URL's
-- delivery history (kept for retention_days), so this view costs more on large tables.
-- ---------------------------------------------------------------------------------------------
CREATE VIEW crm_bridge.url_status AS
SELECT q.*,
       s.last_success_at,
       f.at     AS last_failure_at,
       f.status AS last_failure_status,
       f.error  AS last_failure_error
  FROM crm_bridge.url_queue q
  LEFT JOIN LATERAL (
       SELECT x.finished_at AS last_success_at
         FROM crm_bridge.delivery x
        WHERE x.trigger_id = q.id AND x.status = 'delivered'
        ORDER BY x.finished_at DESC LIMIT 1) s ON true
  LEFT JOIN LATERAL (
       SELECT a.at, a.status, a.error
         FROM crm_bridge.attempt a
         JOIN crm_bridge.delivery x ON x.id = a.delivery_id
        WHERE x.trigger_id = q.id
        ORDER BY a.at DESC LIMIT 1) f ON true;
COMMENT ON VIEW crm_bridge.url_status IS
    'url_queue plus last success (within the retention period) and last failed attempt per URL';

-- ---------------------------------------------------------------------------------------------
-- One row for dashboards and alerts.  oldest_pending_age is the age of the oldest CRM change
-- still waiting to be delivered -- in the outbox, or as a pending/in-flight delivery to an
-- active URL.  Disabled and paused URLs are left out of it on purpose: holding their
-- deliveries is the operator's decision, not a fault (url_queue shows them per URL).
-- ---------------------------------------------------------------------------------------------
CREATE VIEW crm_bridge.summary AS
WITH outbox AS (
    SELECT coalesce(sum(CASE WHEN array_ndims(ids) = 2 THEN array_length(ids, 1) ELSE 1 END), 0)::bigint AS backlog,
           (SELECT e.created_at FROM crm_bridge.event e ORDER BY e.id LIMIT 1) AS oldest_at
      FROM crm_bridge.event
), counts AS (
    SELECT (SELECT count(*) FROM crm_bridge.delivery WHERE status = 'pending')   AS pending,
           (SELECT count(*) FROM crm_bridge.delivery WHERE status = 'pending' AND attempts > 0) AS retrying,
           (SELECT count(*) FROM crm_bridge.delivery WHERE status = 'in_flight') AS in_flight,
           (SELECT count(*) FROM crm_bridge.delivery WHERE status = 'dead')      AS dead
), waiting AS (
    SELECT min(x.event_created_at) AS oldest_at
      FROM crm_bridge.delivery x
      JOIN crm_bridge.crm_trigger t ON t.id = x.trigger_id AND t.enabled AND NOT t.paused
     WHERE x.status IN ('pending', 'in_flight')
)
SELECT o.backlog,
       crm_bridge.age_of(o.oldest_at)                                      AS oldest_event_age,
       c.pending, c.retrying, c.in_flight, c.dead,
       crm_bridge.age_of(least(o.oldest_at, w.oldest_at))                  AS oldest_pending_age,
       (SELECT count(*) FROM crm_bridge.crm_trigger WHERE enabled AND NOT paused) AS active_urls,
       (SELECT count(*) FROM pg_catalog.pg_stat_activity
         WHERE datname = current_database() AND application_name = 'crm-bridge listener') AS daemons,
       now() AS at
  FROM outbox o, counts c, waiting w;
COMMENT ON VIEW crm_bridge.summary IS
    'One row: backlog, pending/retrying/in-flight/dead deliveries, oldest pending age, daemons connected';

-- ---------------------------------------------------------------------------------------------
-- Dead letters, readable: which call, where to, why.
-- ---------------------------------------------------------------------------------------------
CREATE VIEW crm_bridge.dead_letter AS
SELECT d.id AS delivery_id, d.trigger_id, d.object, d.event,
       array_to_string(ARRAY(SELECT p || '=' || coalesce(v, 'NULL')
                               FROM unnest(o.id_params, d.ids) AS x(p, v)), '&') AS ids,
       coalesce(t.url, d.url) AS url,
       d.attempts, d.last_status, d.last_error,
       d.event_created_at, d.finished_at AS died_at
  FROM crm_bridge.delivery d
  JOIN crm_bridge.object_type o ON o.object = d.object
  LEFT JOIN crm_bridge.crm_trigger t ON t.id = d.trigger_id
 WHERE d.status = 'dead';
COMMENT ON VIEW crm_bridge.dead_letter IS
    'Deliveries that were given up: the call''s IDs, its URL, attempts and the last error';
