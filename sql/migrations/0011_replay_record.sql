-- 0011: replay by record (issue 13, item 4).
--
--   SELECT * FROM crm_bridge.replay_record('{"AccountID": "acc-1", "CaseID": "case-7"}');
--
-- queues again the dead calls of one record (with p_delivered, also the calls it was delivered
-- that crm_bridge.history still keeps), in call order, with a dry run.  The record is named by its
-- ID parameters (object_type.id_params, as in the URLs called): the set of names given picks the
-- object (AccountID alone: a customer; AccountID and CaseID: a case; ...).  It reuses the two
-- replays that exist: crm_bridge.replay (dead letters, by id) and what replay_delivered queues
-- (now crm_bridge.requeue_delivered_v1, shared by both).

-- ---------------------------------------------------------------------------------------------
-- Queue again calls that were delivered (history rows), for their URL as configured now, under
-- their own call id: webhook-id / Idempotency-Key are the original call's.  A call whose URL was
-- deleted, or that is already in the queue (an overlapping replay), is skipped.  Returns the
-- number queued.  The row payload is the one sent (history keeps it for include_row URLs).
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION crm_bridge.requeue_delivered_v1(p_calls crm_bridge.history[]) RETURNS bigint
LANGUAGE sql
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
    WITH queued AS (
        INSERT INTO crm_bridge.queue (id, event_id, object, event, ids, event_created_at, trigger_id, url, record_key,
                                      "row", ordered, status, next_attempt_at, last_error)
        SELECT p.call_id, p.event_id, p.object, p.event, p.ids, p.event_created_at, t.id, t.url, p.record_key,
               CASE WHEN t.include_row THEN p."row" END, t.ordered, 'pending', pg_catalog.now(),
               pg_catalog.format('replay of the call delivered at %s', p.at)
          FROM pg_catalog.unnest(p_calls) WITH ORDINALITY AS p
          JOIN crm_bridge.crm_trigger t ON t.id = p.trigger_id
         ORDER BY p.ordinality
        ON CONFLICT (id) DO NOTHING
        RETURNING 1)
    SELECT pg_catalog.count(*) FROM queued
$$;
COMMENT ON FUNCTION crm_bridge.requeue_delivered_v1(crm_bridge.history[]) IS
    'Queue again delivered calls (history rows) for their URL as configured now; skips deleted URLs and calls already queued';

-- replay_delivered: as in 0010 (same checks, same pages and cursor); the queueing is the shared one.
CREATE OR REPLACE FUNCTION crm_bridge.replay_delivered(
    p_trigger_id bigint, p_since timestamptz, p_until timestamptz DEFAULT NULL, p_dry_run boolean DEFAULT false,
    p_limit integer DEFAULT NULL, p_after_at timestamptz DEFAULT NULL, p_after_call bigint DEFAULT NULL)
RETURNS TABLE (calls bigint, last_at timestamptz, last_call bigint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
DECLARE
    kept     timestamptz;
    picked   crm_bridge.history[];
    n        integer;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM crm_bridge.crm_trigger x WHERE x.id = p_trigger_id) THEN
        RAISE EXCEPTION 'replay_delivered: there is no URL with crm_trigger id %', p_trigger_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_since IS NULL OR (p_until IS NOT NULL AND p_until <= p_since) THEN
        RAISE EXCEPTION 'replay_delivered: since must be given and before until (got % and %)', p_since, p_until
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_limit IS NOT NULL AND p_limit < 1 THEN
        RAISE EXCEPTION 'replay_delivered: limit must be at least 1 (got %)', p_limit
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT pg_catalog.min(h.lower_bound) INTO kept FROM crm_bridge.history_partition h;
    IF kept IS NULL OR p_since < kept THEN
        RAISE EXCEPTION 'replay_delivered: history only goes back to % (the retention period); since % is older',
            kept, p_since USING ERRCODE = 'invalid_parameter_value',
            HINT = 'replay from the oldest time kept, or choose a later since';
    END IF;
    SELECT pg_catalog.array_agg(x.h ORDER BY (x.h).at, (x.h).call_id) INTO picked
      FROM (SELECT h FROM crm_bridge.history h
             WHERE h.trigger_id = p_trigger_id AND h.outcome = 'delivered'
               AND h.at >= p_since AND h.at < coalesce(p_until, pg_catalog.now())
               AND (p_after_at IS NULL OR (h.at, h.call_id) > (p_after_at, coalesce(p_after_call, 0)))
             ORDER BY h.at, h.call_id
             LIMIT p_limit) x;
    n := coalesce(pg_catalog.cardinality(picked), 0);
    IF n > 0 AND NOT p_dry_run THEN
        PERFORM crm_bridge.requeue_delivered_v1(picked);
    END IF;
    RETURN QUERY SELECT n::bigint, (picked[n]).at, (picked[n]).call_id;
END
$$;
REVOKE ALL ON FUNCTION crm_bridge.replay_delivered(bigint, timestamptz, timestamptz, boolean, integer, timestamptz, bigint) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- Which record a set of ID parameters names: {"AccountID": "acc-1", "CaseID": "case-7"} -> the
-- object whose id_params are exactly those names (p_object: only that one), and the IDs in
-- id_params order.  Every wrong input is an error that names the problem and the expected names.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION crm_bridge.record_of_v1(p_record jsonb, p_object text DEFAULT NULL)
RETURNS TABLE (object text, ids text[])
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
DECLARE
    given    text[];
    known    text[];
    bad      text;
    guess    text;
    shapes   text;
    wanted   text[];
    matched  bigint;
BEGIN
    IF p_record IS NULL OR pg_catalog.jsonb_typeof(p_record) <> 'object' OR p_record = '{}'::jsonb THEN
        RAISE EXCEPTION 'replay_record: name the record by its ID parameters, e.g. {"AccountID": "acc-1", "CaseID": "case-7"} (got %)',
            coalesce(p_record::text, 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT k.key INTO bad FROM pg_catalog.jsonb_each(p_record) k
     WHERE pg_catalog.jsonb_typeof(k.value) NOT IN ('string', 'number') ORDER BY k.key LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'replay_record: the value of % must be a string (got %)', bad, p_record -> bad
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT pg_catalog.array_agg(k ORDER BY k) INTO given FROM pg_catalog.jsonb_object_keys(p_record) k;
    SELECT pg_catalog.array_agg(DISTINCT p ORDER BY p) INTO known
      FROM crm_bridge.object_type o CROSS JOIN LATERAL pg_catalog.unnest(o.id_params) p;
    SELECT g INTO bad FROM pg_catalog.unnest(given) g WHERE NOT g = ANY (known) ORDER BY g LIMIT 1;
    IF bad IS NOT NULL THEN
        SELECT k INTO guess FROM pg_catalog.unnest(known) k WHERE pg_catalog.lower(k) = pg_catalog.lower(bad) LIMIT 1;
        RAISE EXCEPTION 'replay_record: unknown ID parameter "%" (known: %)', bad, pg_catalog.array_to_string(known, ', ')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = CASE WHEN guess IS NOT NULL THEN pg_catalog.format('did you mean %s? (names are case-sensitive)', guess)
                              ELSE 'the names are those of the URLs'' query strings (crm_bridge.object_type.id_params)' END;
    END IF;
    SELECT pg_catalog.string_agg(pg_catalog.format('%s: %s', o.object, pg_catalog.array_to_string(o.id_params, ', ')),
                                 '; ' ORDER BY o.object)
      INTO shapes FROM crm_bridge.object_type o;
    IF p_object IS NOT NULL THEN
        SELECT o.id_params INTO wanted FROM crm_bridge.object_type o WHERE o.object = p_object;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'replay_record: unknown CRM object "%" (expected one of: %)', p_object,
                (SELECT pg_catalog.string_agg(o.object, ', ' ORDER BY o.object) FROM crm_bridge.object_type o)
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF NOT (wanted @> given AND wanted <@ given) THEN
            RAISE EXCEPTION 'replay_record: a % is named by %; got %', p_object, pg_catalog.array_to_string(wanted, ', '),
                pg_catalog.array_to_string(given, ', ')
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = CASE WHEN wanted @> given
                                  THEN 'missing: ' || pg_catalog.array_to_string(ARRAY(
                                           SELECT f FROM pg_catalog.unnest(wanted) f WHERE NOT f = ANY (given)), ', ')
                                  ELSE 'not one of them: ' || pg_catalog.array_to_string(ARRAY(
                                           SELECT g FROM pg_catalog.unnest(given) g WHERE NOT g = ANY (wanted)), ', ') END;
        END IF;
    END IF;
    RETURN QUERY
    SELECT o.object, ARRAY(SELECT p_record ->> p FROM pg_catalog.unnest(o.id_params) WITH ORDINALITY AS u(p, n) ORDER BY u.n)
      FROM crm_bridge.object_type o
     WHERE o.id_params @> given AND o.id_params <@ given AND (p_object IS NULL OR o.object = p_object);
    GET DIAGNOSTICS matched = ROW_COUNT;
    IF matched = 0 THEN
        RAISE EXCEPTION 'replay_record: no CRM object is named by exactly % (the ID parameters of each: %)',
            pg_catalog.array_to_string(given, ', '), shapes
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'give every ID parameter of the record, e.g. AccountID and CaseID for a case';
    ELSIF matched > 1 THEN
        RAISE EXCEPTION 'replay_record: several CRM objects are named by % (%): say which (p_object, --object)',
            pg_catalog.array_to_string(given, ', '), shapes USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;
COMMENT ON FUNCTION crm_bridge.record_of_v1(jsonb, text) IS
    'The object and IDs (id_params order) named by {"AccountID": ..., "CaseID": ...}; a clear error for unknown or missing names';

-- ---------------------------------------------------------------------------------------------
-- replay_record: the calls of one record, queued again in call order (a URL's calls of a record
-- are claimed by call id; ordered URLs send them one by one): its dead letters (crm_bridge.replay)
-- and, with p_delivered, the calls it was delivered that history still keeps
-- (requeue_delivered_v1; the latest delivery of each call, not those dead or queued now).
-- p_trigger_id: only the calls of that URL.  One row per call: what it was (dead | delivered),
-- when it died or was delivered, and whether it is queued now (queued false and a note: dry run,
-- URL deleted, already queued).  p_dry_run: the same rows, nothing queued.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION crm_bridge.replay_record(
    p_record jsonb, p_object text DEFAULT NULL, p_delivered boolean DEFAULT false, p_dry_run boolean DEFAULT false,
    p_trigger_id bigint DEFAULT NULL)
RETURNS TABLE (call_id bigint, object text, event text, trigger_id bigint, url text, was text,
               at timestamptz, queued boolean, note text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
DECLARE
    v_object  text;
    v_ids     text[];
    v_dead    bigint[];
    v_calls   crm_bridge.history[];
BEGIN
    SELECT r.object, r.ids INTO v_object, v_ids FROM crm_bridge.record_of_v1(p_record, p_object) r;
    IF p_trigger_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM crm_bridge.crm_trigger x WHERE x.id = p_trigger_id) THEN
        RAISE EXCEPTION 'replay_record: there is no URL with crm_trigger id %', p_trigger_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_dead := ARRAY(SELECT d.id FROM crm_bridge.queue d
                     WHERE d.status = 'dead' AND d.object = v_object AND d.ids = v_ids
                       AND (p_trigger_id IS NULL OR d.trigger_id = p_trigger_id)
                     ORDER BY d.id);
    IF p_delivered THEN
        -- history_record_idx; a call delivered twice (replayed before) counts once, its latest delivery
        SELECT pg_catalog.array_agg(x.h ORDER BY (x.h).call_id) INTO v_calls
          FROM (SELECT DISTINCT ON (h.call_id) h FROM crm_bridge.history h
                 WHERE h.record_key = crm_bridge.record_key(v_ids) AND h.object = v_object AND h.ids = v_ids
                   AND h.outcome = 'delivered' AND (p_trigger_id IS NULL OR h.trigger_id = p_trigger_id)
                   AND NOT h.call_id = ANY (v_dead)
                 ORDER BY h.call_id, h.at DESC) x;
    END IF;

    RETURN QUERY
    WITH calls AS (
        SELECT d.id AS call_id, d.object, d.event, d.trigger_id, 'dead'::text AS was, d.finished_at AS at,
               CASE WHEN d.trigger_id IS NULL THEN 'URL deleted: purge it' END AS skip
          FROM crm_bridge.queue d WHERE d.id = ANY (v_dead)
        UNION ALL
        SELECT c.call_id, c.object, c.event, c.trigger_id, 'delivered', c.at,
               CASE WHEN NOT EXISTS (SELECT 1 FROM crm_bridge.crm_trigger t WHERE t.id = c.trigger_id) THEN 'URL deleted'
                    WHEN EXISTS (SELECT 1 FROM crm_bridge.queue q WHERE q.id = c.call_id)
                    THEN 'already queued (' || (SELECT q.status FROM crm_bridge.queue q WHERE q.id = c.call_id) || ')' END
          FROM pg_catalog.unnest(v_calls) c)
    SELECT c.call_id, c.object, c.event, c.trigger_id, crm_bridge.redact_url(t.url), c.was, c.at,
           NOT p_dry_run AND c.skip IS NULL, coalesce(c.skip, CASE WHEN p_dry_run THEN 'dry run' END)
      FROM calls c LEFT JOIN crm_bridge.crm_trigger t ON t.id = c.trigger_id
     ORDER BY c.call_id;

    IF NOT p_dry_run THEN
        -- One transaction, one now(): the queue hands them out by (next_attempt_at, id).
        PERFORM crm_bridge.replay(p_ids => v_dead) WHERE pg_catalog.cardinality(v_dead) > 0;
        PERFORM crm_bridge.requeue_delivered_v1(v_calls) WHERE v_calls IS NOT NULL;
    END IF;
END
$$;
COMMENT ON FUNCTION crm_bridge.replay_record(jsonb, text, boolean, boolean, bigint) IS
    'Queue again the dead calls of one record (p_delivered: also those delivered, within retention), in call order; p_dry_run: list only';

REVOKE ALL ON FUNCTION crm_bridge.requeue_delivered_v1(crm_bridge.history[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION crm_bridge.record_of_v1(jsonb, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION crm_bridge.replay_record(jsonb, text, boolean, boolean, bigint) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- apply_grants: as in 0010, with replay_record for the admin.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION crm_bridge.apply_grants(admin_role   name DEFAULT 'crm_bridge_admin',
                                        daemon_role  name DEFAULT 'crm_bridge_daemon',
                                        monitor_role name DEFAULT 'crm_bridge_monitor')
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
DECLARE
    r      name;
    f      pg_catalog.regprocedure;
    -- Only what an admin calls.  Never a trigger function (emit_v1, crm_trigger_validate_v1, ...):
    -- a trigger fires without EXECUTE, and EXECUTE is exactly what CREATE TRIGGER needs, so with it
    -- an admin could put emit_v1 on a table of its own and forge events.  redact_url: the views.
    admin_functions CONSTANT text[] := ARRAY[
        'set_signing_secret', 'clear_signing_secret', 'signed_urls', 'attach', 'detach',
        'capture_rows', 'dead_letters', 'replay', 'purge', 'retry_now', 'age_of', 'redact_url',
        'replay_delivered', 'record_key', 'replay_record'];
    status_views CONSTANT text[] := ARRAY['summary', 'backlog', 'url_queue', 'url_status', 'dead_letter'];
    daemon_views CONSTANT text[] := ARRAY['summary', 'backlog', 'url_queue'];
BEGIN
    IF admin_role IS NULL OR daemon_role IS NULL OR monitor_role IS NULL
       OR admin_role = daemon_role OR admin_role = monitor_role OR daemon_role = monitor_role THEN
        RAISE EXCEPTION 'apply_grants needs three different role names (got %, % and %)',
            admin_role, daemon_role, monitor_role
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH r IN ARRAY ARRAY[admin_role, daemon_role, monitor_role] LOOP
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r AND (rolsuper OR rolbypassrls)) THEN
            RAISE EXCEPTION 'role "%" is a superuser: pick a dedicated role for crm-bridge', r
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
        END IF;
        -- Start from nothing: what a role holds is exactly what is granted below.
        EXECUTE pg_catalog.format('REVOKE ALL ON ALL TABLES IN SCHEMA crm_bridge FROM %I', r);
        EXECUTE pg_catalog.format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA crm_bridge FROM %I', r);
        EXECUTE pg_catalog.format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA crm_bridge FROM %I', r);
    END LOOP;

    -- Objects added by later migrations start with the default PUBLIC grants: take them away.
    REVOKE ALL ON SCHEMA crm_bridge FROM PUBLIC;
    REVOKE ALL ON ALL TABLES IN SCHEMA crm_bridge FROM PUBLIC;
    REVOKE ALL ON ALL SEQUENCES IN SCHEMA crm_bridge FROM PUBLIC;
    REVOKE ALL ON ALL FUNCTIONS IN SCHEMA crm_bridge FROM PUBLIC;

    EXECUTE pg_catalog.format('GRANT USAGE ON SCHEMA crm_bridge TO %I, %I, %I',
                              admin_role, daemon_role, monitor_role);

    -- admin: read everything but the secrets; edit config; replay/purge/retry deliveries; attach.
    EXECUTE pg_catalog.format('GRANT SELECT ON ALL TABLES IN SCHEMA crm_bridge TO %I', admin_role);
    EXECUTE pg_catalog.format('REVOKE ALL ON crm_bridge.signing_secret FROM %I', admin_role);
    -- The wake-up mark is the daemon's alone (written through daemon_enter_idle/leave_idle).
    EXECUTE pg_catalog.format('REVOKE ALL ON crm_bridge.wake_state FROM %I', admin_role);
    EXECUTE pg_catalog.format('GRANT INSERT, UPDATE, DELETE ON crm_bridge.crm_trigger TO %I', admin_role);
    -- The delivery view writes through to the queue with the caller's rights (migration 0010).
    EXECUTE pg_catalog.format('GRANT UPDATE, DELETE ON crm_bridge.delivery, crm_bridge.queue TO %I', admin_role);
    -- No INSERT/DELETE on attachment: attach/detach/capture_rows write it as the owner after
    -- checking the caller's TRIGGER privilege; a row written by hand would make a later re-attach
    -- capture a table the admin has no rights on.
    FOR f IN SELECT p.oid::pg_catalog.regprocedure FROM pg_catalog.pg_proc p
              WHERE p.pronamespace = 'crm_bridge'::pg_catalog.regnamespace
                AND p.proname::text = ANY (admin_functions)
                AND p.prorettype <> 'pg_catalog.trigger'::pg_catalog.regtype LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I', f, admin_role);
    END LOOP;

    -- daemon: read config and secrets; the status views for its STATUS= line and metrics.  It
    -- writes nothing directly: every write is a crm_bridge.daemon_* function (migration 0007),
    -- so it cannot LOCK the outbox in a mode that stops CRM writers, nor forge deliveries.
    EXECUTE pg_catalog.format('GRANT SELECT ON crm_bridge.crm_trigger, crm_bridge.object_type, '
                              'crm_bridge.signing_secret, crm_bridge.schema_version, crm_bridge.attachment TO %I',
                              daemon_role);
    FOREACH r IN ARRAY daemon_views LOOP
        EXECUTE pg_catalog.format('GRANT SELECT ON crm_bridge.%I TO %I', r, daemon_role);
    END LOOP;
    FOR f IN SELECT p.oid::pg_catalog.regprocedure FROM pg_catalog.pg_proc p
              WHERE p.pronamespace = 'crm_bridge'::pg_catalog.regnamespace
                AND (p.proname::text LIKE 'daemon\_%' OR p.proname IN ('age_of', 'redact_url'))
                AND p.prorettype <> 'pg_catalog.trigger'::pg_catalog.regtype LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I', f, daemon_role);
    END LOOP;

    -- monitor: the status views (they run with their owner's rights on the tables; functions
    -- they call are checked against the caller, hence age_of and redact_url, migration 0009)
    -- and the schema version.
    FOREACH r IN ARRAY status_views LOOP
        EXECUTE pg_catalog.format('GRANT SELECT ON crm_bridge.%I TO %I', r, monitor_role);
    END LOOP;
    EXECUTE pg_catalog.format('GRANT SELECT ON crm_bridge.schema_version TO %I', monitor_role);
    FOR f IN SELECT p.oid::pg_catalog.regprocedure FROM pg_catalog.pg_proc p
              WHERE p.pronamespace = 'crm_bridge'::pg_catalog.regnamespace
                AND p.proname IN ('age_of', 'redact_url') LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I', f, monitor_role);
    END LOOP;

    DELETE FROM crm_bridge.role_name;
    INSERT INTO crm_bridge.role_name (kind, role)
    VALUES ('admin', admin_role), ('daemon', daemon_role), ('monitor', monitor_role);
END
$$;
COMMENT ON FUNCTION crm_bridge.apply_grants(name, name, name) IS
    'Create (NOLOGIN) and grant the crm-bridge admin, daemon and monitor group roles; idempotent';
REVOKE ALL ON FUNCTION crm_bridge.apply_grants(name, name, name) FROM PUBLIC;
