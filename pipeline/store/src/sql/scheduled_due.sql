-- Rows due at $1 (release_at <= $1, not released) of the partitions bound in place of the generated
-- part, oldest first, at most $2.
SELECT release_id, source_partition, source_offset, release_at, release_to, record_key, record_value, headers
FROM scheduled_releases
WHERE released_at IS NULL AND release_at <= $1 AND source_partition IN (/* generated */)
ORDER BY release_at, release_id
LIMIT $2
