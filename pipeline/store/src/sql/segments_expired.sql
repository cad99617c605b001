-- Both backends: versions no reader may still use, before $1 (microseconds): replaced or deleted
-- ones retired before it, and loads started before it that never became current (a killed import).
SELECT id FROM segment_versions
WHERE retired_at < $1
   OR (retired_at IS NULL AND created_at < $1 AND id NOT IN (SELECT version FROM segments))
ORDER BY id
