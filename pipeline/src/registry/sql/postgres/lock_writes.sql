-- Serializes registry writes across processes until the transaction ends, so two instances never
-- hand out the same id or version. SQLite serializes writers by itself.
SELECT pg_advisory_xact_lock($1)
