-- crm-bridge schema, version 3: least privilege, signing secrets, richer calls.
--
-- * Nothing in crm_bridge is reachable by PUBLIC.  CRM application roles need no grant at all:
--   emit_v1 is SECURITY DEFINER and fires as a trigger (trigger functions are not EXECUTE-checked
--   when they fire, only when a trigger is created - which is exactly what an app role must not do).
-- * crm_bridge.apply_grants(admin, daemon) creates/grants the two group roles (`crm-bridge migrate
--   --roles`); the names are recorded so that later migrations re-apply the grants.
-- * Signing secrets live in their own table that only the daemon role (and the owner) can read;
--   admins set them through SECURITY DEFINER functions and cannot read them back.
-- * Per-URL call shape: method (GET/POST), static headers, follow_redirects.  See docs/SECURITY.md.

REVOKE ALL ON SCHEMA crm_bridge FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA crm_bridge FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA crm_bridge FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA crm_bridge FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- Richer calls (opt-in per URL).
-- ---------------------------------------------------------------------------------------------
ALTER TABLE crm_bridge.crm_trigger
    ADD COLUMN method           text NOT NULL DEFAULT 'GET' CHECK (method IN ('GET', 'POST')),
    ADD COLUMN headers          jsonb,
    ADD COLUMN follow_redirects boolean,
    ADD COLUMN include_row      boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN crm_bridge.crm_trigger.include_row IS
    'POST only: add the captured row(s) ("new", "old") to the body; the table must capture rows (crm_bridge.capture_rows)';
COMMENT ON COLUMN crm_bridge.crm_trigger.method IS
    'GET: url?AccountID=... (the seed format).  POST: JSON body {"object","event","ids","occurred_at","event_id"}';
COMMENT ON COLUMN crm_bridge.crm_trigger.headers IS
    'Extra static request headers, a JSON object {"Name": "value"}; values are never logged or shown';
COMMENT ON COLUMN crm_bridge.crm_trigger.follow_redirects IS
    'true: follow up to 5 redirects (each hop passes the address policy); NULL: the daemon''s setting (default off)';

CREATE FUNCTION crm_bridge.crm_trigger_validate_call_v1() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, crm_bridge
AS $$
DECLARE
    reserved CONSTANT text[] := ARRAY[
        'host', 'content-length', 'content-type', 'transfer-encoding', 'connection', 'keep-alive',
        'te', 'trailer', 'upgrade', 'expect', 'proxy-authorization', 'proxy-connection',
        'idempotency-key', 'webhook-id', 'webhook-timestamp', 'webhook-signature'];
    port   text;
    host   text;
    ok     boolean;
    k      text;
    v      jsonb;
    n      integer := 0;
BEGIN
    -- The host/port shape was checked by crm_trigger_validate_v1 (it fires first: name order).
    port := substring(NEW.url FROM '^[A-Za-z]+://(?:[^/?#@]*@)?(?:\[[0-9A-Fa-f:.]+\]|[^/?#@:\[\]]+):([0-9]{1,5})(?:[/?]|$)');
    IF port IS NOT NULL AND (port::integer < 1 OR port::integer > 65535) THEN
        RAISE EXCEPTION 'url "%" has port %, outside 1-65535', NEW.url, port
            USING ERRCODE = 'check_violation';
    END IF;
    host := substring(NEW.url FROM '^[A-Za-z]+://(?:[^/?#@]*@)?(\[[^\]]*\])');
    IF host IS NOT NULL THEN
        BEGIN  -- config validation only, never on the CRM write path
            ok := family(substr(host, 2, length(host) - 2)::inet) = 6;
        EXCEPTION WHEN invalid_text_representation THEN
            ok := false;
        END;
        IF NOT ok THEN
            RAISE EXCEPTION 'url "%" has an invalid IPv6 address %', NEW.url, host
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    -- A host shaped like a dotted quad must be a valid one (the HTTP client refuses 256.1.1.1).
    host := substring(NEW.url FROM '^[A-Za-z]+://(?:[^/?#@]*@)?([^/?#@:\[\]]+)');
    IF host ~ '^[0-9]+.[0-9]+.[0-9]+.[0-9]+$'
       AND host !~ '^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$' THEN
        RAISE EXCEPTION 'url "%" has an invalid IPv4 address %', NEW.url, host
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.url ~ '[^\x21-\x7e]' THEN
        RAISE EXCEPTION 'url "%" contains non-ASCII characters (percent-encode them; IDN hosts in punycode)', NEW.url
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.url ~ '%([^0-9A-Fa-f]|[0-9A-Fa-f][^0-9A-Fa-f]|[0-9A-Fa-f]?$)' THEN
        RAISE EXCEPTION 'url "%" has a %% that does not start a %%XX escape', NEW.url
            USING ERRCODE = 'check_violation';
    END IF;

    NEW.method := upper(btrim(coalesce(NEW.method, 'GET')));
    IF NEW.method NOT IN ('GET', 'POST') THEN
        RAISE EXCEPTION 'method "%" is not supported (expected GET or POST)', NEW.method
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.include_row AND NEW.method <> 'POST' THEN
        RAISE EXCEPTION 'include_row needs method = ''POST'' (a GET call has no body for the row)'
            USING ERRCODE = 'check_violation';
    END IF;

    IF NEW.headers IS NOT NULL THEN
        IF jsonb_typeof(NEW.headers) <> 'object' THEN
            RAISE EXCEPTION 'headers must be a JSON object like {"X-Name": "value"} (got a JSON %)',
                jsonb_typeof(NEW.headers) USING ERRCODE = 'check_violation';
        END IF;
        -- Header values may be credentials: messages name the header, never print its value.
        FOR k, v IN SELECT e.key, e.value FROM jsonb_each(NEW.headers) e LOOP
            n := n + 1;
            IF k !~ '^[!#$%&''*+.^_`|~0-9A-Za-z-]{1,100}$' THEN
                RAISE EXCEPTION 'header name % is not a valid HTTP header name (letters, digits, -, at most 100)',
                    to_jsonb(left(k, 100))::text USING ERRCODE = 'check_violation';
            END IF;
            IF lower(k) = ANY (reserved) THEN
                RAISE EXCEPTION 'header "%" is set by crm-bridge itself and cannot be configured', k
                    USING ERRCODE = 'check_violation';
            END IF;
            IF jsonb_typeof(v) <> 'string' THEN
                RAISE EXCEPTION 'header "%" must have a string value (got a JSON %)', k, jsonb_typeof(v)
                    USING ERRCODE = 'check_violation';
            END IF;
            IF (v #>> '{}') !~ '^[\x20-\x7e]*$' THEN
                RAISE EXCEPTION 'header "%": the value must be printable ASCII (no CR, LF or other control characters)', k
                    USING ERRCODE = 'check_violation';
            END IF;
            IF length(v #>> '{}') > 4000 THEN
                RAISE EXCEPTION 'header "%": the value is % characters long (at most 4000)', k, length(v #>> '{}')
                    USING ERRCODE = 'check_violation';
            END IF;
        END LOOP;
        IF n > 50 THEN
            RAISE EXCEPTION 'at most 50 headers per URL (got %)', n USING ERRCODE = 'check_violation';
        END IF;
        IF NEW.url ~ '^[A-Za-z]+://[^/?#]*@'
           AND EXISTS (SELECT 1 FROM jsonb_object_keys(NEW.headers) h WHERE lower(h) = 'authorization') THEN
            RAISE EXCEPTION 'url has credentials (user:password@) and headers set Authorization: use one or the other'
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    RETURN NEW;
END
$$;

-- Fires after crm_trigger_validate (BEFORE triggers fire in name order).
CREATE TRIGGER crm_trigger_validate_call
    BEFORE INSERT OR UPDATE ON crm_bridge.crm_trigger
    FOR EACH ROW EXECUTE FUNCTION crm_bridge.crm_trigger_validate_call_v1();

-- ---------------------------------------------------------------------------------------------
-- Signing secrets (Standard Webhooks).  A URL with a secret gets webhook-timestamp and
-- webhook-signature headers.  Readable only by the owner and the daemon role.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE crm_bridge.signing_secret (
    trigger_id bigint PRIMARY KEY REFERENCES crm_bridge.crm_trigger (id) ON DELETE CASCADE,
    secret     text NOT NULL CHECK (secret ~ '^whsec_[A-Za-z0-9+/]+={0,2}$'),
    created_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE crm_bridge.signing_secret IS
    'Standard Webhooks signing secret per URL; set with crm_bridge.set_signing_secret(); only the daemon role may read it';

CREATE FUNCTION crm_bridge.set_signing_secret(url_id bigint, secret text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge
AS $$
DECLARE
    raw bytea;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM crm_bridge.crm_trigger t WHERE t.id = url_id) THEN
        RAISE EXCEPTION 'no crm_trigger row with id %', url_id USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF secret IS NULL THEN
        -- 2 x 122 random bits from the core CSPRNG (pgcrypto is not required).
        raw := decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex');
        secret := 'whsec_' || encode(raw, 'base64');
    ELSE
        -- Messages below never echo the secret.
        IF secret !~ '^whsec_[A-Za-z0-9+/]+={0,2}$' THEN
            RAISE EXCEPTION 'a signing secret looks like whsec_<base64> (the secret given does not)'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF length(secret) - 6 NOT BETWEEN 32 AND 88 OR (length(secret) - 6) % 4 <> 0 THEN
            RAISE EXCEPTION 'a signing secret must be whsec_ + padded base64 of 24 to 64 bytes'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
    INSERT INTO crm_bridge.signing_secret AS s (trigger_id, secret) VALUES (url_id, secret)
    ON CONFLICT (trigger_id) DO UPDATE SET secret = EXCLUDED.secret, created_at = now();
    RETURN secret;
END
$$;
COMMENT ON FUNCTION crm_bridge.set_signing_secret(bigint, text) IS
    'Sign calls to a URL (crm_trigger id); without a secret one is generated.  Returns the secret to give the receiver';

CREATE FUNCTION crm_bridge.clear_signing_secret(url_id bigint) RETURNS boolean
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge
AS $$
    WITH d AS (DELETE FROM crm_bridge.signing_secret s WHERE s.trigger_id = url_id RETURNING 1)
    SELECT count(*) > 0 FROM d;
$$;
COMMENT ON FUNCTION crm_bridge.clear_signing_secret(bigint) IS 'Stop signing calls to a URL';

-- Which URLs are signed, without the secrets (for admins and `status`).
CREATE FUNCTION crm_bridge.signed_urls() RETURNS TABLE (trigger_id bigint, since timestamptz)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge
AS $$ SELECT s.trigger_id, s.created_at FROM crm_bridge.signing_secret s ORDER BY 1 $$;

REVOKE ALL ON FUNCTION crm_bridge.set_signing_secret(bigint, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION crm_bridge.clear_signing_secret(bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION crm_bridge.signed_urls() FROM PUBLIC;
REVOKE ALL ON FUNCTION crm_bridge.crm_trigger_validate_call_v1() FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- Roles.  Two NOLOGIN group roles, granted by the DBA to login roles:
--   admin   edits crm_trigger, sets signing secrets, reads delivery state, replays/purges
--   daemon  reads config (and secrets), claims events, writes deliveries/attempts
-- Neither gets anything on CRM tables; CRM application roles get nothing on crm_bridge.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE crm_bridge.role_name (
    kind text PRIMARY KEY CHECK (kind IN ('admin', 'daemon')),
    role name NOT NULL
);
COMMENT ON TABLE crm_bridge.role_name IS 'The group roles apply_grants() set up; migrate re-applies their grants';

CREATE FUNCTION crm_bridge.apply_grants(admin_role name DEFAULT 'crm_bridge_admin',
                                        daemon_role name DEFAULT 'crm_bridge_daemon')
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, crm_bridge
AS $$
DECLARE
    r name;
BEGIN
    IF admin_role IS NULL OR daemon_role IS NULL OR admin_role = daemon_role THEN
        RAISE EXCEPTION 'apply_grants needs two different role names (got % and %)', admin_role, daemon_role
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH r IN ARRAY ARRAY[admin_role, daemon_role] LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r AND (rolsuper OR rolbypassrls)) THEN
            RAISE EXCEPTION 'role "%" is a superuser: pick a dedicated role for crm-bridge', r
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
        END IF;
    END LOOP;

    -- Objects added by later migrations start with the default PUBLIC grants: take them away.
    REVOKE ALL ON SCHEMA crm_bridge FROM PUBLIC;
    REVOKE ALL ON ALL TABLES IN SCHEMA crm_bridge FROM PUBLIC;
    REVOKE ALL ON ALL SEQUENCES IN SCHEMA crm_bridge FROM PUBLIC;
    REVOKE ALL ON ALL FUNCTIONS IN SCHEMA crm_bridge FROM PUBLIC;

    EXECUTE format('GRANT USAGE ON SCHEMA crm_bridge TO %I, %I', admin_role, daemon_role);

    -- admin: read everything but the secrets; edit config; replay/purge deliveries; attach.
    EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA crm_bridge TO %I', admin_role);
    EXECUTE format('REVOKE ALL ON crm_bridge.signing_secret FROM %I', admin_role);
    EXECUTE format('GRANT INSERT, UPDATE, DELETE ON crm_bridge.crm_trigger TO %I', admin_role);
    EXECUTE format('GRANT UPDATE, DELETE ON crm_bridge.delivery TO %I', admin_role);
    EXECUTE format('GRANT DELETE ON crm_bridge.attempt TO %I', admin_role);
    EXECUTE format('GRANT INSERT, DELETE ON crm_bridge.attachment TO %I', admin_role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION crm_bridge.set_signing_secret(bigint, text), '
                   'crm_bridge.clear_signing_secret(bigint), crm_bridge.signed_urls(), '
                   'crm_bridge.attach(regclass, text, text[]), crm_bridge.detach(regclass), '
                   'crm_bridge.capture_rows(regclass, boolean), '
                   'crm_bridge.emit_v1(), crm_bridge.crm_trigger_validate_v1(), '
                   'crm_bridge.crm_trigger_validate_call_v1() TO %I', admin_role);

    -- daemon: read config and secrets; move events into deliveries; record outcomes.
    EXECUTE format('GRANT SELECT ON crm_bridge.crm_trigger, crm_bridge.object_type, crm_bridge.signing_secret, '
                   'crm_bridge.schema_version, crm_bridge.attachment TO %I', daemon_role);
    EXECUTE format('GRANT SELECT, UPDATE, DELETE ON crm_bridge.event TO %I', daemon_role);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON crm_bridge.delivery TO %I', daemon_role);
    EXECUTE format('GRANT SELECT, INSERT, DELETE ON crm_bridge.attempt TO %I', daemon_role);

    DELETE FROM crm_bridge.role_name;
    INSERT INTO crm_bridge.role_name (kind, role) VALUES ('admin', admin_role), ('daemon', daemon_role);
END
$$;
COMMENT ON FUNCTION crm_bridge.apply_grants(name, name) IS
    'Create (NOLOGIN) and grant the crm-bridge admin and daemon group roles; idempotent';
REVOKE ALL ON FUNCTION crm_bridge.apply_grants(name, name) FROM PUBLIC;
