-- Both backends: marks segment $1's current version replaced at $2 (readers that pinned it may
-- finish their pages until the cleanup drops it).
UPDATE segment_versions SET retired_at = $2 WHERE id = (SELECT version FROM segments WHERE name = $1)
