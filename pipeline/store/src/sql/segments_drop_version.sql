-- Both backends: version $1 itself, once its members are gone.
DELETE FROM segment_versions WHERE id = $1
