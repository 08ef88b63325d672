-- crm-bridge schema, version 9: fixes from the outside review of the issue-10 work (findings 6, 7).
--
-- * A URL's signing secret belongs to its origin (scheme, host, port): when crm_trigger.url moves
--   to another origin the secret is removed (a NOTICE says so), so an admin who may not read the
--   secret cannot point the URL at a host of its own and collect validly signed messages.  A
--   change of path or query keeps it.  Only set_signing_secret() signs the new origin again.
-- * crm_bridge.redact_url(text): the URL with credentials masked, by the rule of bridge/redact.py
--   (userinfo password, secret-looking query parameters, token-looking path segments, the path
--   of well-known webhook hosts).  The status views url_queue, url_status (which reads url_queue)
--   and dead_letter show URLs through it: the monitor role never sees a configured credential.

-- ---------------------------------------------------------------------------------------------
-- The origin of a URL: lower-case scheme and host, explicit port (80/443 when none is given).
-- NULL when the URL does not have the shape crm_trigger accepts: callers treat NULL as "changed".
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION crm_bridge.url_origin_v1(url text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
DECLARE
    m    pg_catalog.text[];
    port pg_catalog.text;
BEGIN
    -- scheme :// [userinfo@] host [:port] then / ? or the end (userinfo holds no @ / ? #).
    m := pg_catalog.regexp_match(url,
        '^([A-Za-z][A-Za-z0-9+.-]*)://(?:[^/?#@\\]*@)?(\[[^]/?#@\\]*\]|[^/?#@:\\\[\]]*)(?::([0-9]*))?(?:[/?]|$)');
    IF m IS NULL OR m[2] OPERATOR(pg_catalog.=) '' THEN
        RETURN NULL;
    END IF;
    m[1] := pg_catalog.lower(m[1]);
    port := pg_catalog.ltrim(coalesce(m[3], ''), '0');
    IF coalesce(m[3], '') OPERATOR(pg_catalog.=) '' THEN
        port := CASE m[1] WHEN 'http' THEN '80' WHEN 'https' THEN '443' END;
    ELSIF port OPERATOR(pg_catalog.=) '' OR pg_catalog.length(port) OPERATOR(pg_catalog.>) 5 THEN
        RETURN NULL;
    END IF;
    RETURN m[1] OPERATOR(pg_catalog.||) '://' OPERATOR(pg_catalog.||) pg_catalog.lower(m[2])
           OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) port;
END
$$;
COMMENT ON FUNCTION crm_bridge.url_origin_v1(text) IS
    'scheme://host:port of a URL, lower-case, default port explicit; NULL if it cannot be parsed';
REVOKE ALL ON FUNCTION crm_bridge.url_origin_v1(text) FROM PUBLIC;

-- Runs as the owner: the admin edits crm_trigger but has no rights on signing_secret.
CREATE FUNCTION crm_bridge.crm_trigger_url_origin_v1() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, crm_bridge, pg_temp
AS $$
DECLARE
    was pg_catalog.text := crm_bridge.url_origin_v1(OLD.url);
    now_ pg_catalog.text := crm_bridge.url_origin_v1(NEW.url);
BEGIN
    IF was IS NULL OR now_ IS NULL OR was OPERATOR(pg_catalog.<>) now_ THEN
        DELETE FROM crm_bridge.signing_secret s WHERE s.trigger_id OPERATOR(pg_catalog.=) OLD.id;
        IF FOUND THEN
            RAISE NOTICE 'crm_trigger id %: the signing secret was removed because the URL now points to another origin (% instead of %); call crm_bridge.set_signing_secret(%) again to sign its calls, and give the receiver the new secret',
                NEW.id, coalesce(now_, 'an unparsable URL'), coalesce(was, 'an unparsable URL'), NEW.id;
        END IF;
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION crm_bridge.crm_trigger_url_origin_v1() FROM PUBLIC;

CREATE TRIGGER crm_trigger_url_origin
    AFTER UPDATE OF url ON crm_bridge.crm_trigger
    FOR EACH ROW WHEN (OLD.url IS DISTINCT FROM NEW.url)
    EXECUTE FUNCTION crm_bridge.crm_trigger_url_origin_v1();

-- ---------------------------------------------------------------------------------------------
-- redact_url: bridge/redact.py's redact_url() in SQL (urllib.parse.urlsplit's reading of a URL).
-- The fragment is dropped; an unbalanced [ ] host gives '***'.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION crm_bridge.redact_url(url text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    mask     CONSTANT pg_catalog.text := '***';
    s        pg_catalog.text;
    scheme   pg_catalog.text := '';
    netloc   pg_catalog.text := '';
    hostport pg_catalog.text;
    host     pg_catalog.text;
    userinfo pg_catalog.text;
    query    pg_catalog.text := '';
    m        pg_catalog.text[];
    segs     pg_catalog.text[];
BEGIN
    -- As urlsplit: leading controls/spaces and every tab, CR and LF are dropped.
    s := pg_catalog.regexp_replace(pg_catalog.translate(url, E'\t\r\n', ''), '^[\x01-\x20]+', '');
    m := pg_catalog.regexp_match(s, '^([A-Za-z][A-Za-z0-9+.-]*):(.*)$');
    IF m IS NOT NULL THEN
        scheme := pg_catalog.lower(m[1]);
        s := m[2];
    END IF;
    IF pg_catalog.left(s, 2) = '//' THEN
        m := pg_catalog.regexp_match(s, '^//([^/?#]*)(.*)$');
        netloc := m[1];
        s := m[2];
    END IF;
    s := pg_catalog.split_part(s, '#', 1);
    IF pg_catalog.strpos(s, '?') > 0 THEN
        query := pg_catalog.substr(s, pg_catalog.strpos(s, '?') + 1);
        s := pg_catalog.substr(s, 1, pg_catalog.strpos(s, '?') - 1);
    END IF;

    -- The host, as urlsplit's hostname (lower case, no userinfo, port or brackets).
    hostport := pg_catalog.regexp_replace(netloc, '^.*@', '');
    IF (pg_catalog.strpos(netloc, '[') > 0) <> (pg_catalog.strpos(netloc, ']') > 0) THEN
        RETURN mask;   -- urlsplit: "Invalid IPv6 URL"
    END IF;
    -- urlsplit wants an IPv6 (or IPvFuture) address between the first [ and the next ].
    IF pg_catalog.strpos(netloc, '[') > 0 THEN
        host := pg_catalog.split_part(pg_catalog.substr(netloc, pg_catalog.strpos(netloc, '[') + 1), ']', 1);
        IF host ~ '^v' THEN
            IF host !~ '^v[a-fA-F0-9]+\..+$' THEN
                RETURN mask;
            END IF;
        ELSE
            BEGIN
                IF host ~ '[/]' OR pg_catalog.family(pg_catalog.split_part(host, '%', 1)::pg_catalog.inet) <> 6 THEN
                    RETURN mask;
                END IF;
            EXCEPTION WHEN invalid_text_representation THEN
                RETURN mask;
            END;
        END IF;
    END IF;
    IF pg_catalog.strpos(hostport, '[') > 0 THEN
        host := pg_catalog.split_part(pg_catalog.substr(hostport, pg_catalog.strpos(hostport, '[') + 1), ']', 1);
    ELSE
        host := pg_catalog.split_part(hostport, ':', 1);
    END IF;
    host := pg_catalog.lower(host);

    -- user:password@ -> user:***@; a lone user name may be a token: ***@.
    IF pg_catalog.strpos(netloc, '@') > 0 THEN
        userinfo := pg_catalog.left(netloc, pg_catalog.length(netloc) - pg_catalog.length(hostport) - 1);
        netloc := CASE WHEN pg_catalog.strpos(userinfo, ':') > 0
                       THEN pg_catalog.split_part(userinfo, ':', 1) || ':' || mask
                       ELSE mask END || '@' || hostport;
    END IF;

    -- Values of parameters whose name looks secret (redact.SECRET_PARAMS).
    IF query <> '' THEN
        query := pg_catalog.array_to_string(ARRAY(
            SELECT CASE WHEN pg_catalog.strpos(q.pair, '=') > 0
                         AND pg_catalog.split_part(q.pair, '=', 1)
                             ~* '^(.*(token|secret|password|passwd|pwd|signature|sig|apikey|api_key|key|auth).*|code)$'
                        THEN pg_catalog.split_part(q.pair, '=', 1) || '=' || mask
                        ELSE q.pair END
              FROM pg_catalog.unnest(pg_catalog.string_to_array(query, '&')) WITH ORDINALITY AS q(pair, n)
             ORDER BY q.n), '&');
    END IF;

    -- Path: on webhook hosts everything after the first segment is the credential; elsewhere a
    -- segment of 16+ characters mixing two of lower case, upper case and digits (redact.is_token).
    IF s <> '' THEN
        segs := pg_catalog.string_to_array(s, '/');
        IF host ~ '^(hooks\.slack\.com|([a-z0-9-]+\.)*discord(app)?\.com|([a-z0-9-]+\.)*webhook\.office\.com|outlook\.office(365)?\.com|hooks\.zapier\.com|maker\.ifttt\.com)$' THEN
            s := pg_catalog.array_to_string(segs[1:2], '/')
                 || CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.unnest(segs[3:]) AS x(seg) WHERE x.seg <> '')
                         THEN '/' || mask ELSE '' END;
        ELSE
            s := pg_catalog.array_to_string(ARRAY(
                SELECT CASE WHEN pg_catalog.char_length(x.seg) >= 16
                             AND (x.seg ~ '[a-z]')::pg_catalog.int4 + (x.seg ~ '[A-Z]')::pg_catalog.int4
                                 + (x.seg ~ '[0-9]')::pg_catalog.int4 >= 2
                            THEN mask ELSE x.seg END
                  FROM pg_catalog.unnest(segs) WITH ORDINALITY AS x(seg, n)
                 ORDER BY x.n), '/');
        END IF;
    END IF;

    IF scheme <> '' OR netloc <> '' THEN
        s := scheme || '://' || netloc || s;
    END IF;
    IF query <> '' THEN
        s := s || '?' || query;
    END IF;
    RETURN s;
END
$$;
COMMENT ON FUNCTION crm_bridge.redact_url(text) IS
    'The URL with credentials masked as ***: userinfo password (a lone user name), secret-looking query '
    'values, token-looking path segments, webhook hosts'' paths after the first segment (as bridge/redact.py)';
REVOKE ALL ON FUNCTION crm_bridge.redact_url(text) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- The status views with redacted URLs; columns, order and types as in 0002.  url_status reads
-- url_queue's url, so it shows the redacted URL without being redefined.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE VIEW crm_bridge.url_queue AS
SELECT t.id, t.object, t.event, crm_bridge.redact_url(t.url) AS url, t.enabled, t.paused,
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
    'Per configured URL (redacted): pending, retrying, in-flight and dead deliveries, oldest undelivered event';

CREATE OR REPLACE VIEW crm_bridge.dead_letter AS
SELECT d.id AS delivery_id, d.trigger_id, d.object, d.event,
       array_to_string(ARRAY(SELECT p || '=' || coalesce(v, 'NULL')
                               FROM unnest(o.id_params, d.ids) AS x(p, v)), '&') AS ids,
       crm_bridge.redact_url(coalesce(t.url, d.url)) AS url,
       d.attempts, d.last_status, d.last_error,
       d.event_created_at, d.finished_at AS died_at
  FROM crm_bridge.delivery d
  JOIN crm_bridge.object_type o ON o.object = d.object
  LEFT JOIN crm_bridge.crm_trigger t ON t.id = d.trigger_id
 WHERE d.status = 'dead';
COMMENT ON VIEW crm_bridge.dead_letter IS
    'Deliveries that were given up: the call''s IDs, its URL (redacted), attempts and the last error';

-- The views call redact_url with the reader's rights: the recorded roles need EXECUTE before the
-- next apply_grants() (which grants it from now on), or a psql-only upgrade breaks their status.
DO $$
DECLARE
    r pg_catalog.name;
BEGIN
    FOR r IN SELECT n.role FROM crm_bridge.role_name n
              WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_roles x WHERE x.rolname OPERATOR(pg_catalog.=) n.role) LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION crm_bridge.redact_url(text) TO %I', r);
    END LOOP;
END
$$;
