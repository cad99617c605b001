-- Both backends: segments after name $1 (empty: from the start), by name, at most $2.
SELECT name, version, size, updated_at FROM segments WHERE name > $1 ORDER BY name LIMIT $2
