-- Every query the bench runs, each under a "-- name: xxx" header with a one-line description
-- (split by bench/sqlq.py, like the daemon's sql/queries.sql).  Writer workloads use
-- bench.case_seq (bench/variants.sql) so that concurrent writers never collide.

-- name: seed_customers
-- The accounts the benchmark cases belong to (the case table has a foreign key to them).
INSERT INTO crm.customer (account_id, name)
SELECT 'acc-' || g, 'Bench customer ' || g FROM generate_series(1, 100) g
ON CONFLICT DO NOTHING;

-- name: reset
-- Empty everything the workloads fill, so that every measured run starts from the same state.
TRUNCATE crm.case, crm_bridge.event, crm_bridge.delivery, crm_bridge.attempt, bench.hasura_log CASCADE;

-- name: checkpoint
-- Start each run right after a checkpoint: equal full-page-write cost for every variant.
CHECKPOINT;

-- name: detach_all
-- No capture trigger of any kind on crm.case.
SELECT crm_bridge.detach('crm.case');
DROP TRIGGER IF EXISTS bench_capture ON crm.case;

-- name: attach_bridge
-- The bridge as installed by `crm-bridge migrate --reference-crm` (emit_v1, row level).
SELECT crm_bridge.attach('crm.case', 'case', ARRAY['account_id', 'case_id']);

-- name: attach_hasura
-- Hasura-style: the full row as JSON in a log table.
CREATE TRIGGER bench_capture AFTER INSERT OR UPDATE OR DELETE ON crm.case
    FOR EACH ROW EXECUTE FUNCTION bench.hasura_emit();

-- name: attach_notify_always
-- The naive design: outbox row plus NOTIFY on every row.
CREATE TRIGGER bench_capture AFTER INSERT OR DELETE ON crm.case
    FOR EACH ROW EXECUTE FUNCTION bench.emit_notify_always('case', 'account_id', 'case_id');

-- name: attach_static
-- Prototype: emit_v1 with the ID columns compiled in (no to_jsonb of the row).
CREATE TRIGGER bench_capture AFTER INSERT OR DELETE ON crm.case
    FOR EACH ROW EXECUTE FUNCTION bench.emit_case_static();

-- name: attach_statement
-- Prototype: one statement-level trigger with a transition table for INSERT.
CREATE TRIGGER bench_capture AFTER INSERT ON crm.case
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bench.emit_case_stmt_insert();

-- name: attach_statement_qualified
-- Prototype: the statement trigger without the function-level SET search_path (all names qualified).
CREATE TRIGGER bench_capture AFTER INSERT ON crm.case
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bench.emit_case_stmt_insert_q();

-- name: clear_urls
-- Remove every configured URL (the bench configures its own per phase).
DELETE FROM crm_bridge.crm_trigger;

-- name: add_url
-- Call %(url)s for every created case.
INSERT INTO crm_bridge.crm_trigger (object, event, url) VALUES ('case', 'create', %(url)s);

-- name: insert_one
-- One CRM write: a new case (the unit of the writer-throughput goals).
INSERT INTO crm.case (case_id, account_id, subject)
VALUES ('c' || nextval('bench.case_seq'), 'acc-' || (1 + (random() * 99)::int), 'bench');

-- name: insert_many
-- One statement writing %(rows)s cases.
INSERT INTO crm.case (case_id, account_id, subject)
SELECT 'c' || nextval('bench.case_seq'), 'acc-' || (1 + mod(g, 100)), 'bench'
  FROM generate_series(1, %(rows)s) g;

-- name: insert_single_rows
-- %(rows)s cases, each written by its own one-row INSERT (one outbox event each), in one transaction.
DO $$
BEGIN
    FOR g IN 1..%(rows)s LOOP
        INSERT INTO crm.case (case_id, account_id, subject)
        VALUES ('c' || nextval('bench.case_seq'), 'acc-' || (1 + mod(g, 100)), 'bench');
    END LOOP;
END $$;

-- name: insert_named
-- One case with a caller-chosen ID (the latency bench matches arrivals by it).
INSERT INTO crm.case (case_id, account_id, subject) VALUES (%(case_id)s, 'acc-1', 'bench');

-- name: drained
-- True when the daemon has nothing left: no outbox row, no delivery waiting or in flight.
SELECT NOT EXISTS (SELECT 1 FROM crm_bridge.event)
   AND NOT EXISTS (SELECT 1 FROM crm_bridge.delivery WHERE status IN ('pending', 'in_flight'));

-- name: delivery_window
-- Deliveries by status, and the database-side window from the first claim to the last outcome.
SELECT count(*) FILTER (WHERE status = 'delivered') AS delivered,
       count(*) FILTER (WHERE status <> 'delivered') AS other,
       extract(epoch FROM max(finished_at) - min(created_at))::float8 AS seconds
  FROM crm_bridge.delivery;

-- name: server_version
-- The server's version string.
SELECT current_setting('server_version');

-- name: backend_pid
-- This connection's server process (to find the postmaster when the server is local).
SELECT pg_backend_pid();

-- name: daemon_backends
-- The daemon's server processes (its pool and its listener).
SELECT pid FROM pg_stat_activity WHERE starts_with(application_name, 'crm-bridge');
