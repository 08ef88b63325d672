-- crm-bridge schema, version 5: outbound safety (issue 10, item 12).
--
-- crm_trigger_validate_call_v1 also refuses URLs whose host is an unspecified address (0.0.0.0/8,
-- ::) in any spelling the HTTP client accepts, with a message naming the host.  The daemon's
-- address policy refuses them as well, after DNS resolution and before connecting (rows stored
-- with validation switched off, or host names that resolve to 0.0.0.0): see docs/SECURITY.md.
-- The function keeps its name, trigger and grants; its search_path now ends with pg_temp.

CREATE OR REPLACE FUNCTION crm_bridge.crm_trigger_validate_call_v1() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, crm_bridge, pg_temp
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
    shown  text;
    addr   inet;
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
    -- Unspecified addresses (0.0.0.0/8, ::) are never a destination: connecting to them reaches the
    -- daemon's own host.  Every spelling the HTTP client accepts is refused here (the daemon
    -- refuses them too, after DNS resolution): 0.0.0.0, 0, 0x0, 0.0, 000.0.0.0, 0.0.0.0. (a
    -- trailing dot), [::], [0:0::0], [::ffff:0.0.0.0], and 0.x.y.z ("this network").
    shown := substring(NEW.url FROM '^[A-Za-z]+://(?:[^/?#@]*@)?(\[[^\]]*\]|[^/?#@:\[\]]+)');
    IF shown LIKE '[%]' THEN
        addr := substr(shown, 2, length(shown) - 2)::pg_catalog.inet;  -- valid: checked just above
        IF addr = '::'::pg_catalog.inet OR addr = '::ffff:0.0.0.0'::pg_catalog.inet THEN
            RAISE EXCEPTION 'url has host %, the unspecified address (0.0.0.0 / ::): it is never a valid destination '
                '(connecting to it reaches the local host); use the receiver''s own address or name', shown
                USING ERRCODE = 'check_violation';
        ELSIF addr << '::ffff:0.0.0.0/104'::pg_catalog.inet THEN
            RAISE EXCEPTION 'url has host %, an IPv4-mapped address in 0.0.0.0/8 ("this network"): it is never a '
                'valid destination; use the receiver''s own address or name', shown
                USING ERRCODE = 'check_violation';
        END IF;
    ELSIF rtrim(lower(shown), '.') ~ '^(0+|0x0*)(\.(0+|0x0*)){0,3}$' THEN
        RAISE EXCEPTION 'url has host %, a spelling of the unspecified address 0.0.0.0: it is never a valid '
            'destination (connecting to it reaches the local host); use the receiver''s own address or name', shown
            USING ERRCODE = 'check_violation';
    ELSIF rtrim(lower(shown), '.') ~ '^(0+|0x0*)(\.(0x[0-9a-f]*|[0-9]+)){1,3}$' THEN
        RAISE EXCEPTION 'url has host %, in 0.0.0.0/8 ("this network"): it is never a valid destination; '
            'use the receiver''s own address or name', shown
            USING ERRCODE = 'check_violation';
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

COMMENT ON FUNCTION crm_bridge.crm_trigger_validate_call_v1() IS
    'crm_trigger validation: URL host/port shape (no unspecified addresses), method, include_row, static headers';
