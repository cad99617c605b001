-- Both backends: forgets segment $1; returns the version it pointed to, which the caller retires.
DELETE FROM segments WHERE name = $1 RETURNING version
