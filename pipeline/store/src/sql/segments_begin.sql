-- Both backends: a new version of segment $1, created at $2, loading (not yet current). Returns its id.
INSERT INTO segment_versions (segment, created_at) VALUES ($1, $2) RETURNING id
