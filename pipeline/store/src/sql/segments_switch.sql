-- Both backends: makes version $2 (size $3) segment $1's current one, at $4.
INSERT INTO segments (name, version, size, updated_at) VALUES ($1, $2, $3, $4)
ON CONFLICT (name) DO UPDATE SET version = excluded.version, size = excluded.size, updated_at = excluded.updated_at
