-- crm-bridge schema, version 6: three group roles, each with exactly what its job needs.
--
-- * crm_bridge.apply_grants(admin, daemon, monitor) creates the NOLOGIN group roles if missing
--   and (re)grants them from scratch (`crm-bridge migrate --roles`, or psql).  The names are
--   recorded in crm_bridge.role_name; `crm-bridge migrate` re-applies them after every migration.
--     admin    edits the configuration (crm_trigger, attach/detach, signing secrets), reads
--              everything but the signing secrets, replays/purges dead letters, retry_now().
--              It writes crm_bridge.attachment only through attach/detach/capture_rows, and may
--              execute no trigger function (CREATE TRIGGER with emit_v1 would forge events).
--     daemon   what `crm-bridge run` needs: config and secrets, the queue tables, the status views
--              (STATUS= line, metrics gauges) and every crm_bridge.daemon_* function
--     monitor  read-only: the status views and the schema version (`crm-bridge status`,
--              dashboards).  Never crm_trigger itself (its headers may hold credentials), never
--              signing_secret.
-- * crm_bridge.retry_now(...): make queued (pending) deliveries due now (after a receiver is back).
-- Objects are granted by name (every overload), so a later migration that changes a signature
-- keeps its grants when `migrate` re-applies them.

ALTER TABLE crm_bridge.role_name DROP CONSTRAINT IF EXISTS role_name_kind_check;
ALTER TABLE crm_bridge.role_name ADD CONSTRAINT role_name_kind_check
    CHECK (kind IN ('admin', 'daemon', 'monitor'));

-- ---------------------------------------------------------------------------------------------
-- retry_now: queued deliveries (pending, waiting out a backoff) become due at once.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION crm_bridge.retry_now(
    p_trigger_id bigint DEFAULT NULL, p_url text DEFAULT NULL, p_object text DEFAULT NULL,
    p_ids bigint[] DEFAULT NULL, p_record text[] DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    UPDATE crm_bridge.delivery d
       SET next_attempt_at = pg_catalog.now(), updated_at = pg_catalog.now()
     WHERE d.status = 'pending'
       AND d.next_attempt_at > pg_catalog.now()
       AND (p_trigger_id IS NULL OR d.trigger_id = p_trigger_id)
       AND (p_url IS NULL OR d.url = p_url
            OR d.trigger_id IN (SELECT t.id FROM crm_bridge.crm_trigger t WHERE t.url = p_url))
       AND (p_object IS NULL OR d.object = p_object)
       AND (p_ids IS NULL OR d.id = ANY (p_ids))
       AND (p_record IS NULL OR d.ids = p_record);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
COMMENT ON FUNCTION crm_bridge.retry_now(bigint, text, text, bigint[], text[]) IS
    'Make matching pending deliveries due now (NULL filter = any; p_record: the record''s IDs in id_params order); '
    'a daemon picks them up within its poll interval.  Returns how many were made due';
REVOKE ALL ON FUNCTION crm_bridge.retry_now(bigint, text, text, bigint[], text[]) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- apply_grants, now with the monitor role.  Everything is revoked from the three roles first,
-- so re-applying also removes what an earlier version granted and no longer should.
-- ---------------------------------------------------------------------------------------------
DROP FUNCTION crm_bridge.apply_grants(name, name);

CREATE FUNCTION crm_bridge.apply_grants(admin_role   name DEFAULT 'crm_bridge_admin',
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
        'capture_rows', 'dead_letters', 'replay', 'purge', 'retry_now', 'age_of', 'redact_url'];
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
    EXECUTE pg_catalog.format('GRANT UPDATE, DELETE ON crm_bridge.delivery TO %I', admin_role);
    EXECUTE pg_catalog.format('GRANT DELETE ON crm_bridge.attempt TO %I', admin_role);
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
