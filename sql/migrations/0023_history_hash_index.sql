-- 0023: history's one index, history_record_idx (record_key), becomes a hash index.
--
-- Every delivered call writes a history row, and its record_key entry was the dearest part of the
-- daemon's record statement: a B-tree insert at a random place (record_key is an md5 of the IDs)
-- comparing 33-character texts under the database's collation.  Measured with pgbench on a
-- history of 1,000,000 rows, 128-row INSERTs with commit: no index 1.1-1.5 ms, B-tree 2.2-3.2 ms,
-- hash 1.7-1.9 ms: the index's share about halves.  The index only ever answers "the calls of this
-- record" (record_key = ..., docs/DBA.md, replay_record), which a hash index does as well; it
-- stores a 4-byte hash per row instead of the key.
--
-- The index keeps its name; the partitions get theirs as before.  Building it locks history (not
-- the CRM's tables): the daemon's records wait for it, a few seconds per million rows kept.

SET LOCAL lock_timeout = '10s';

DROP INDEX crm_bridge.history_record_idx;
CREATE INDEX history_record_idx ON crm_bridge.history USING hash (record_key);
COMMENT ON INDEX crm_bridge.history_record_idx IS
    'The calls of one record: WHERE record_key = crm_bridge.record_key(ARRAY[...]) (hash: equality only)';
