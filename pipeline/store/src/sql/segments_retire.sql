-- Both backends: marks version $1 no longer current, at $2.
UPDATE segment_versions SET retired_at = $2 WHERE id = $1
