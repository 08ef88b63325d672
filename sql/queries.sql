-- Every query the daemon and the CLI run.  Each starts with a "-- name: xxx" header line and a
-- one-line description; bridge/sqlfiles.py splits the file at those headers.
-- Parameters use psycopg's %(name)s style.

-- The daemon's writes are functions of migration 0007 (crm_bridge.daemon_*): the daemon role may
-- EXECUTE them and has no INSERT/UPDATE/DELETE on any table.

-- name: claim
-- Claim outbox events (up to %(batch)s one-record events and bulk ones up to about %(bulk_records)s
-- records) as one batch of calls for this worker.  %(only)s: exactly these events.
SELECT * FROM crm_bridge.daemon_claim(%(batch)s, %(bulk_records)s, %(lease)s, %(worker)s, %(only)s);

-- name: record
-- Record the outcomes of one batch in one statement (delivered -> history; failed, dead and
-- still running -> queue).  0 when this worker no longer holds the batch.
SELECT crm_bridge.daemon_record(%(worker)s, %(batch)s, %(ids)s, %(statuses)s, %(attempted)s, %(http_status)s,
                                %(errors)s, %(delays)s, %(durations)s, %(lease)s);

-- name: unbatch
-- A batch that cannot be recorded as a whole: its calls become queue rows this worker holds.
SELECT crm_bridge.daemon_unbatch(%(worker)s, %(batch)s, %(lease)s);

-- name: outbox_head
-- The next %(limit)s outbox event ids (to dispatch one by one after a batch failed as a whole).
SELECT * FROM crm_bridge.daemon_outbox_head(%(limit)s);

-- name: quarantine_event
-- An event that cannot be dispatched even alone becomes a dead letter with the reason.
SELECT crm_bridge.daemon_quarantine_event(%(event_id)s, %(error)s);

-- name: claim_due
-- Claim pending deliveries whose next attempt is due: per enabled, unpaused URL at most its free
-- slots in this worker (busy_ids/busy_free; others get max_in_flight), %(batch)s in all.
-- A URL without max_in_flight gets %(default_limit)s: the URL's own value, else the daemon's
-- default, the rule of Settings.url_max_in_flight (bridge/settings.py).
SELECT * FROM crm_bridge.daemon_claim_due(%(batch)s, %(lease)s, %(worker)s, %(busy_ids)s, %(busy_free)s,
                                          %(default_limit)s);

-- name: complete
-- Record the outcomes of calls held one by one (queue rows) in one statement; delivered ones
-- move to crm_bridge.history, failed attempts get a history row.  Rows whose lease this worker
-- lost are left alone.
SELECT crm_bridge.daemon_complete(%(worker)s, %(ids)s, %(statuses)s, %(attempted)s, %(http_status)s,
                                  %(errors)s, %(delays)s, %(durations)s);

-- name: dead_letter_outcome
-- An outcome that cannot be recorded even alone: the delivery becomes a dead letter with the reason.
SELECT crm_bridge.daemon_dead_letter(%(worker)s, %(id)s, %(error)s);

-- name: heartbeat
-- Extend the leases of exactly the batches and calls this process holds.
SELECT crm_bridge.daemon_heartbeat(%(worker)s, %(batches)s, %(ids)s, %(lease)s);

-- name: release_previous
-- At start-up: give back what an earlier process of the same worker name still holds.
SELECT crm_bridge.daemon_release_previous(%(base)s, %(worker)s);

-- name: recover_expired
-- Put deliveries whose worker stopped heart-beating back in the queue.
SELECT crm_bridge.daemon_recover_expired();

-- name: cancel_orphans
-- Deliveries whose crm_trigger row was deleted are cancelled rather than retried.
SELECT crm_bridge.daemon_cancel_orphans();

-- name: release
-- Give deliveries back to the queue without counting an attempt (shutdown).
SELECT crm_bridge.daemon_release(%(worker)s);

-- name: rotate
-- History partitions: make them ahead of time, drop those older than %(retention)s.
SELECT crm_bridge.daemon_rotate(%(retention)s);

-- name: daemon_session
-- Every pool connection of the daemon.  The claim statements are small but look expensive to the
-- planner (CTEs, window functions, sub-plans): JIT compilation would add ~1 s to each of them, and
-- planning them afresh for every call (a custom plan per parameter set) cost ~1.3 ms of the
-- server's CPU per claim (measured): their generic plans are as good, whatever the batch size.
SELECT pg_catalog.set_config('jit', 'off', false),
       pg_catalog.set_config('plan_cache_mode', 'force_generic_plan', false);

-- name: listener_session
-- The listener connection: the idle lock only ever waits %(lock_timeout)s for writers.
SELECT pg_catalog.set_config('lock_timeout', %(lock_timeout)s, false);

-- name: listen
-- Wake-ups: {channel} is filled in with psycopg.sql.Identifier (listen.CHANNEL).
LISTEN {channel};

-- name: idle_lock
-- Taken by a daemon that has drained the outbox and waits: writers that see it NOTIFY.
SELECT pg_advisory_lock(1668441442, 1);

-- name: idle_mark
-- While holding the idle lock: ask writers to NOTIFY for the next %(seconds)s seconds (at most 60).
-- Only the daemon role may call it; a foreign session holding the lock makes nobody NOTIFY.
SELECT crm_bridge.daemon_enter_idle(%(seconds)s);

-- name: idle_unlock
-- Released when the daemon drains a backlog or is full: writers skip NOTIFY meanwhile.
SELECT pg_advisory_unlock(1668441442, 1);

-- name: idle_clear_unlock
-- Writers stop notifying, then the idle lock is released, in one round trip (the select list is
-- evaluated left to right): it stands between a wake-up and the claim, so every round trip here
-- is latency of every live event.
SELECT crm_bridge.daemon_leave_idle(), pg_advisory_unlock(1668441442, 1);

-- name: dead_letter_count
-- How many dead letters match the replay/purge filters.
SELECT count(*) FROM crm_bridge.dead_letters(%(trigger_id)s, %(url)s, %(object)s, %(since)s, %(until)s, %(ids)s);

-- name: call_sample
-- A few of the calls a command would take, for --dry-run: with %(dead)s the dead letters that
-- match the replay/purge filters, else the pending calls retry-now would make due (the predicate
-- of pending_count).  The record as AccountID=…&CaseID=…, the current URL.
SELECT x.id, x.object, x.event,
       array_to_string(ARRAY(SELECT p || '=' || coalesce(v, 'NULL')
                               FROM unnest(o.id_params, x.ids) AS u(p, v)), '&') AS record,
       coalesce(t.url, x.url) AS url, x.attempts, x.last_status, x.last_error, x.finished_at, x.next_attempt_at
  FROM (SELECT * FROM crm_bridge.dead_letters(%(trigger_id)s, %(url)s, %(object)s, %(since)s, %(until)s, %(ids)s)
         WHERE %(dead)s
        UNION ALL
        SELECT * FROM crm_bridge.queue d
         WHERE NOT %(dead)s AND d.status = 'pending' AND d.next_attempt_at > now()
           AND (%(trigger_id)s::bigint IS NULL OR d.trigger_id = %(trigger_id)s)
           AND (%(url)s::text IS NULL OR d.url = %(url)s
                OR d.trigger_id IN (SELECT t.id FROM crm_bridge.crm_trigger t WHERE t.url = %(url)s))
           AND (%(object)s::text IS NULL OR d.object = %(object)s)
           AND (%(ids)s::bigint[] IS NULL OR d.id = ANY (%(ids)s))
           AND (%(record)s::text[] IS NULL OR d.ids = %(record)s)) x
  JOIN crm_bridge.object_type o ON o.object = x.object
  LEFT JOIN crm_bridge.crm_trigger t ON t.id = x.trigger_id
 ORDER BY CASE WHEN NOT %(dead)s THEN x.next_attempt_at END, x.id LIMIT %(limit)s;

-- name: replay_batch
-- Queue up to %(limit)s matching dead letters again.
SELECT crm_bridge.replay(%(trigger_id)s, %(url)s, %(object)s, %(since)s, %(until)s, %(ids)s, %(limit)s);

-- name: replay_delivered
-- Queue again up to %(limit)s calls URL %(trigger_id)s was delivered in [since, until), after the
-- cursor (after_at, after_call); dry_run: count only.  Returns calls, last_at, last_call.
SELECT * FROM crm_bridge.replay_delivered(%(trigger_id)s, %(since)s, %(until)s, %(dry_run)s, %(limit)s,
                                          %(after_at)s, %(after_call)s);

-- name: replay_record
-- The dead (with %(delivered)s, also the delivered) calls of one record, named by its ID parameters
-- (a JSON object), queued again in call order; dry_run: listed only.  One row per call.
SELECT * FROM crm_bridge.replay_record(%(record)s, %(object)s, %(delivered)s, %(dry_run)s, %(trigger_id)s);

-- name: purge_batch
-- Delete up to %(limit)s matching dead letters.
SELECT crm_bridge.purge(%(trigger_id)s, %(url)s, %(object)s, %(since)s, %(until)s, %(ids)s, %(limit)s);

-- name: pending_count
-- How many pending deliveries retry-now would make due (the predicate of crm_bridge.retry_now;
-- call_sample lists a few of them with the same predicate).
SELECT count(*) FROM crm_bridge.queue d
 WHERE d.status = 'pending' AND d.next_attempt_at > now()
   AND (%(trigger_id)s::bigint IS NULL OR d.trigger_id = %(trigger_id)s)
   AND (%(url)s::text IS NULL OR d.url = %(url)s
        OR d.trigger_id IN (SELECT t.id FROM crm_bridge.crm_trigger t WHERE t.url = %(url)s))
   AND (%(object)s::text IS NULL OR d.object = %(object)s)
   AND (%(ids)s::bigint[] IS NULL OR d.id = ANY (%(ids)s))
   AND (%(record)s::text[] IS NULL OR d.ids = %(record)s);

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
       last_dead_at, last_success_at, last_failure_at, last_failure_status, last_failure_error,
       breaker, breaker_since, breaker_failures
  FROM crm_bridge.url_status
 ORDER BY id;

-- name: probe_state
-- The schema version (readiness: /readyz) and how full the server's NOTIFY queue is (a metric).
SELECT (SELECT max(version) FROM crm_bridge.schema_version) AS schema_version,
       pg_notification_queue_usage() AS notify_queue_usage;

-- name: metrics_urls
-- Per URL queue counts and circuit breaker for the metrics (cheap view; at most %(limit)s URLs).
SELECT id, object, event, url, state, pending, retrying, in_flight, dead, breaker
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

-- name: check_capture_code
-- What capture cannot guarantee (see docs/SECURITY.md, the capture role):
--   cast      a column type of an attached table has a user-defined cast to json, jsonb or text;
--             its function runs inside the capture (as crm_bridge_capture) on every write
--   function  a capture function is no longer SECURITY DEFINER owned by crm_bridge_capture with
--             its own settings (only that role, or the schema owner, can have changed it)
SELECT a.table_name::text AS table_name, a.object, 'cast' AS problem,
       pg_catalog.format('column %I has type %s, which has a user-defined cast to %s (%s)', att.attname,
              pg_catalog.format_type(att.atttypid, NULL), pg_catalog.format_type(k.casttarget, NULL),
              k.castfunc::pg_catalog.regprocedure) AS detail
  FROM crm_bridge.attachment a
  JOIN pg_catalog.pg_attribute att ON att.attrelid = a.table_name AND att.attnum > 0 AND NOT att.attisdropped
  JOIN pg_catalog.pg_type t ON t.oid = att.atttypid
  JOIN pg_catalog.pg_cast k ON k.castsource IN (t.oid, t.typbasetype, t.typelem) AND k.castmethod = 'f'
                            AND k.casttarget IN ('pg_catalog.json'::pg_catalog.regtype, 'pg_catalog.jsonb'::pg_catalog.regtype,
                                                 'pg_catalog.text'::pg_catalog.regtype)
  JOIN pg_catalog.pg_proc f ON f.oid = k.castfunc
 WHERE f.pronamespace <> 'pg_catalog'::pg_catalog.regnamespace
UNION ALL
SELECT NULL, NULL, 'function',
       pg_catalog.format('capture function %s is %s', p.oid::pg_catalog.regprocedure,
              CASE WHEN NOT p.prosecdef THEN 'no longer SECURITY DEFINER (CRM writes to attached tables fail)'
                   WHEN pg_catalog.pg_get_userbyid(p.proowner) <> 'crm_bridge_capture'
                   THEN pg_catalog.format('owned by %I, not crm_bridge_capture', pg_catalog.pg_get_userbyid(p.proowner))
                   ELSE pg_catalog.format('running with changed settings %s', p.proconfig) END)
  FROM pg_catalog.pg_proc p
 WHERE p.pronamespace = 'crm_bridge'::pg_catalog.regnamespace
   AND (p.proname = 'emit_v1' OR p.proname ~ '^emit_rows_[0-9]+_v1$')
   AND (NOT p.prosecdef OR pg_catalog.pg_get_userbyid(p.proowner) <> 'crm_bridge_capture'
        OR p.proconfig IS DISTINCT FROM CASE WHEN p.proname = 'emit_v1'
                                             THEN ARRAY['search_path=pg_catalog, crm_bridge, pg_temp'] END)
 ORDER BY 3, 1, 4;

-- name: check_capture_form
-- Attached tables whose capture triggers predate migration 0004 (a re-attach fixes them):
--   old-comparison  the edit trigger's WHEN needs an equality operator for every column type, so
--                   an UPDATE fails on json, point, xml ... columns
--   statement-level a partitioned table (or partition) with statement-level triggers: statements
--                   aimed at a partition (or at the parent) are not captured
SELECT a.table_name::text AS table_name, a.object, g.tgname AS trigger_name,
       CASE WHEN g.tgname = 'crm_bridge_emit_edit' THEN 'old-comparison' ELSE 'statement-level' END AS problem,
       pg_catalog.format('SELECT crm_bridge.attach(%L, %L, ARRAY[%s])', a.table_name::text, a.object,
              (SELECT pg_catalog.string_agg(pg_catalog.quote_literal(c), ', ') FROM pg_catalog.unnest(a.id_columns) c)) AS fix
  FROM crm_bridge.attachment a
  JOIN pg_catalog.pg_class c ON c.oid = a.table_name
  JOIN pg_catalog.pg_trigger g ON g.tgrelid = a.table_name AND g.tgparentid = 0
 WHERE (g.tgname = 'crm_bridge_emit_edit' AND pg_catalog.pg_get_triggerdef(g.oid) !~ '[*]=')
    OR (g.tgname IN ('crm_bridge_emit_create', 'crm_bridge_emit_delete')
        AND (c.relkind = 'p' OR c.relispartition) AND g.tgtype::integer & 1 = 0)
 ORDER BY 1, 3;

-- Schema versions and roles (bridge/migrate.py, bridge/roles.py).

-- name: relation_exists
-- Whether a table or view of crm_bridge exists yet (a database older than it has none).
SELECT pg_catalog.to_regclass(%(name)s) IS NOT NULL;

-- name: schema_bootstrap
-- The schema and its version table, before any migration runs.
CREATE SCHEMA IF NOT EXISTS crm_bridge;
CREATE TABLE IF NOT EXISTS crm_bridge.schema_version (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: migrate_lock
-- Serialises concurrent `crm-bridge migrate` runs (until the transaction ends).
SELECT pg_catalog.pg_advisory_xact_lock(%(key)s, %(sub)s);

-- name: schema_versions
-- The migrations applied so far.
SELECT version FROM crm_bridge.schema_version;

-- name: schema_version_record
-- Record one applied migration.
INSERT INTO crm_bridge.schema_version (version, name) VALUES (%(version)s, %(name)s);

-- name: role_names
-- The roles crm_bridge.apply_grants() last set up: (kind, role) rows.
SELECT kind, role FROM crm_bridge.role_name;

-- name: role_grants
-- Create the NOLOGIN group roles if missing and (re)grant their privileges.
SELECT crm_bridge.apply_grants(%(admin)s, %(daemon)s, %(monitor)s);
