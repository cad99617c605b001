-- Both backends: locks segment $1's row for the rest of the transaction (a row lock on PostgreSQL,
-- SQLite has one writer) and returns its current version, so a concurrent replace cannot switch
-- the version between reading it and changing its members.
UPDATE segments SET updated_at = $2 WHERE name = $1 RETURNING version
