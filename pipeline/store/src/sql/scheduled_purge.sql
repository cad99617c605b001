-- Deletes at most $2 rows released before $1, oldest first.
DELETE FROM scheduled_releases WHERE release_id IN (
    SELECT release_id FROM scheduled_releases
    WHERE released_at IS NOT NULL AND released_at < $1
    ORDER BY released_at
    LIMIT $2
)
