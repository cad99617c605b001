-- Both backends: segment $1's current version, size and last change (microseconds).
SELECT name, version, size, updated_at FROM segments WHERE name = $1
