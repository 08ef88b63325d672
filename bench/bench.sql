-- Every query the bench runs, each under a "-- name: xxx" header with a one-line description
-- (split by bench/sqlq.py, like the daemon's sql/queries.sql).  Writer workloads use
-- bench.case_seq (bench/variants.sql) so that concurrent writers never collide.

-- name: seed_customers
-- The accounts the benchmark cases belong to (the case table has a foreign key to them).
INSERT INTO crm.customer (account_id, name)
SELECT 'acc-' || g, 'Bench customer ' || g FROM generate_series(1, 100) g
ON CONFLICT DO NOTHING;

-- name: crm_bridge_tables
-- Every table of the bridge's schema (partitioned parents, not their partitions): the bench
-- knows no engine's table names; it looks at what the installed schema has.
SELECT c.relname
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'crm_bridge' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
 ORDER BY c.relname;

-- name: relation_sizes
-- Size (with indexes and TOAST) and tuple counts of every table and partition in crm_bridge; dead
-- tuples and vacuums count those of the table's TOAST table too (a table of wide rows, such as
-- batch, keeps most of its bytes there, and autovacuum visits it on its own).  due: the table or
-- its TOAST table holds more dead tuples than autovacuum's threshold for it (its own reloptions,
-- else the server's settings): autovacuum's next round will visit it.
SELECT c.relname, pg_catalog.pg_total_relation_size(c.oid) AS bytes,
       coalesce(s.n_live_tup, 0) AS live, coalesce(s.n_dead_tup, 0) + coalesce(t.n_dead_tup, 0) AS dead,
       coalesce(s.vacuum_count + s.autovacuum_count, 0) + coalesce(t.vacuum_count + t.autovacuum_count, 0) AS vacuums,
       coalesce(d.due, false) AS due
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_catalog.pg_stat_user_tables s ON s.relid = c.oid
  LEFT JOIN pg_catalog.pg_stat_all_tables t ON t.relid = c.reltoastrelid
  LEFT JOIN pg_catalog.pg_class tc ON tc.oid = c.reltoastrelid
  CROSS JOIN LATERAL (
      SELECT pg_catalog.bool_or(x.dead > th.threshold) AS due
        FROM (VALUES (c.reloptions, c.reltuples, s.n_dead_tup),
                     (tc.reloptions, tc.reltuples, t.n_dead_tup)) AS x(opts, tuples, dead)
       CROSS JOIN LATERAL (
           SELECT coalesce((SELECT o.option_value::float8 FROM pg_catalog.pg_options_to_table(x.opts) o
                             WHERE o.option_name = 'autovacuum_vacuum_threshold'),
                           pg_catalog.current_setting('autovacuum_vacuum_threshold')::float8)
                + coalesce((SELECT o.option_value::float8 FROM pg_catalog.pg_options_to_table(x.opts) o
                             WHERE o.option_name = 'autovacuum_vacuum_scale_factor'),
                           pg_catalog.current_setting('autovacuum_vacuum_scale_factor')::float8)
                  * greatest(x.tuples, 0) AS threshold) th
       WHERE x.dead IS NOT NULL) d
 WHERE n.nspname = 'crm_bridge' AND c.relkind IN ('r', 'p')
 ORDER BY c.relname;

-- name: outbox_fill
-- The outbox's size and the tuples it holds that take space: live (not yet claimed) and dead
-- (claimed; their space is reusable only once (auto)vacuum has visited the table).
SELECT pg_catalog.pg_total_relation_size('crm_bridge.event'::pg_catalog.regclass) AS bytes,
       coalesce(s.n_live_tup, 0) + coalesce(s.n_dead_tup, 0) AS tuples,
       coalesce(s.vacuum_count + s.autovacuum_count, 0) AS vacuums
  FROM pg_catalog.pg_stat_user_tables s
 WHERE s.relid = 'crm_bridge.event'::pg_catalog.regclass;

-- name: stop_daemon_backends
-- Server processes the daemon left behind (a statement still running after the daemon was
-- stopped keeps its backend busy until it next talks to the client): end them.
SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity
 WHERE datname = pg_catalog.current_database() AND starts_with(application_name, 'crm-bridge');

-- name: daemon_backend_pids
-- The server processes serving the daemon's connections (goal 4: their CPU is its bookkeeping proper).
SELECT pid FROM pg_catalog.pg_stat_activity
 WHERE datname = pg_catalog.current_database() AND starts_with(application_name, 'crm-bridge');

-- name: background_pids
-- The server's long-lived background processes (WAL writer, checkpointer, background writer,
-- autovacuum launcher...): goal 4's breakdown (autovacuum workers come and go; not here).
SELECT pid FROM pg_catalog.pg_stat_activity
 WHERE backend_type IN ('walwriter', 'checkpointer', 'background writer', 'autovacuum launcher',
                        'logical replication launcher', 'archiver');

-- name: bridge_autovacuums
-- Autovacuum and autoanalyze passes so far over crm_bridge's tables.
SELECT coalesce(sum(s.autovacuum_count + s.autoanalyze_count), 0)::bigint
  FROM pg_catalog.pg_stat_all_tables s WHERE s.schemaname = 'crm_bridge';

-- name: daemon_backends_left
-- How many of them are still there.
SELECT count(*) FROM pg_catalog.pg_stat_activity
 WHERE datname = pg_catalog.current_database() AND starts_with(application_name, 'crm-bridge');

-- name: cases
-- Cases written since the last reset: one call each for the bench's URL (case/create).
SELECT count(*) FROM crm.case;

-- name: autovacuum_workers
-- Autovacuum workers running on the bench's server (settle: a latency run waits for them).
SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE backend_type = 'autovacuum worker';

-- name: checkpoint
-- Start each run right after a checkpoint: equal full-page-write cost for every variant.
CHECKPOINT;

-- name: detach_all
-- No capture trigger of any kind on crm.case.
SELECT crm_bridge.detach('crm.case');
DROP TRIGGER IF EXISTS bench_capture ON crm.case;

-- name: attach_bridge
-- The bridge's capture as crm_bridge.attach installs it (`crm-bridge migrate --reference-crm` does).
SELECT crm_bridge.attach('crm.case', 'case', ARRAY['account_id', 'case_id']);

-- name: pgq_install
-- PgQ, where the server has it (Debian/Ubuntu: postgresql-NN-pgq3).
CREATE EXTENSION IF NOT EXISTS pgq;

-- name: attach_pgq
-- PgQ's standard capture: a fresh queue (its event tables empty) and pgq.logutriga on every row.
SELECT pgq.drop_queue(queue_name, true) FROM pgq.queue WHERE queue_name = 'bench';
SELECT pgq.create_queue('bench');
CREATE TRIGGER bench_capture AFTER INSERT OR UPDATE OR DELETE ON crm.case
    FOR EACH ROW EXECUTE FUNCTION pgq.logutriga('bench');

-- name: attach_hasura
-- Hasura-style: the full row as JSON in a log table.
CREATE TRIGGER bench_capture AFTER INSERT OR UPDATE OR DELETE ON crm.case
    FOR EACH ROW EXECUTE FUNCTION bench.hasura_emit();

-- name: attach_floor_nothing
-- Floor: a statement-level PL/pgSQL trigger with a transition table that does nothing.
CREATE TRIGGER bench_capture AFTER INSERT ON crm.case REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bench.floor_nothing();

-- name: attach_floor_heap
-- Floor: the same, writing one row per statement into a table without an index.
CREATE TRIGGER bench_capture AFTER INSERT ON crm.case REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bench.floor_heap();

-- name: attach_floor_outbox
-- Floor: the same, into an outbox with an identity key (claimable in order).
CREATE TRIGGER bench_capture AFTER INSERT ON crm.case REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bench.floor_outbox();

-- name: clear_urls
-- Remove every configured URL (the bench configures its own, through the config table only).
DELETE FROM crm_bridge.crm_trigger;

-- name: add_url
-- Call %(url)s for every created case (defaults: GET with the IDs, no row payload).
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

-- name: insert_paced
-- The same for pgbench's paced writer (a pgbench script line: :prefix is set with --define,
-- :client_id is pgbench's, :n the client's transaction number).
INSERT INTO crm.case (case_id, account_id, subject) VALUES (:prefix || '-' || :client_id || '-' || :n, 'acc-1', 'bench');

-- name: server_version
-- The server's version string.
SELECT current_setting('server_version');

-- name: backend_pid
-- This connection's server process (to find the postmaster when the server is local).
SELECT pg_backend_pid();

-- name: daemon_backends
-- The daemon's server processes (its pool and its listener).
SELECT pid FROM pg_stat_activity WHERE starts_with(application_name, 'crm-bridge');

-- name: statements_install
-- Server-side time per statement (goal 4's breakdown), where the server preloads it.
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;

-- name: statements_reset
SELECT pg_stat_statements_reset();

-- name: daemon_statement_time
-- Time the server spent in the daemon's statements of this database since the last reset, by
-- kind: the claim of new events, the record of outcomes, everything else it ran (milliseconds;
-- wall time inside the server, waiting for a CPU included).
SELECT CASE WHEN s.query LIKE '%daemon\_claim(%' THEN 'claim'
            WHEN s.query LIKE '%daemon\_record(%' OR s.query LIKE '%daemon\_complete(%' THEN 'record'
            ELSE 'other' END AS kind,
       sum(s.calls)::bigint AS calls, sum(s.total_exec_time) AS ms
  FROM pg_stat_statements s
  JOIN pg_database d ON d.oid = s.dbid
 WHERE d.datname = current_database() AND s.toplevel
   AND s.query LIKE '%crm\_bridge.daemon\_%'
 GROUP BY 1;

-- name: autovacuum_naptime
-- Seconds between autovacuum's visits of a database.
SELECT setting::float8 FROM pg_catalog.pg_settings WHERE name = 'autovacuum_naptime';

-- name: batch_urls
-- The bench's URLs as POST calls, %(batch_max)s calls per request (NULL: one call per request).
UPDATE crm_bridge.crm_trigger SET method = 'POST', batch_max = %(batch_max)s;
