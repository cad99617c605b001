-- Both backends: the members of version $1 (an abandoned load, a merged one or an old one).
DELETE FROM segment_members WHERE version = $1
