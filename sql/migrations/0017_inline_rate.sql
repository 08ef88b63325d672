-- 0017: rate_burst and rate_refill inlinable, as migration 0014 made loadable_time.
--
-- daemon_claim_due evaluates them for every rate-limited URL it looks at.  With a SET clause a
-- LANGUAGE sql function is never inlined: each call went through the SQL-function executor
-- instead of being an expression of the statement.  Without it they are inlined into the
-- (search_path-pinned) definer function; they are not SECURITY DEFINER, and every function and
-- operator in them is qualified, so a caller's search_path can only affect that caller.

CREATE OR REPLACE FUNCTION crm_bridge.rate_burst(p_max_per_second pg_catalog.float8) RETURNS pg_catalog.float8
LANGUAGE sql IMMUTABLE
AS $$ SELECT greatest(1, pg_catalog.ceil(p_max_per_second OPERATOR(pg_catalog./) 10)) $$;

CREATE OR REPLACE FUNCTION crm_bridge.rate_refill(p_max_per_second pg_catalog.float8) RETURNS pg_catalog.float8
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE WHEN p_max_per_second OPERATOR(pg_catalog.<) 1 THEN p_max_per_second
                ELSE least(p_max_per_second,
                           pg_catalog.floor(p_max_per_second) OPERATOR(pg_catalog.+) 1
                           OPERATOR(pg_catalog.-) crm_bridge.rate_burst(p_max_per_second)
                           OPERATOR(pg_catalog.-) 0.001)
           END
$$;
