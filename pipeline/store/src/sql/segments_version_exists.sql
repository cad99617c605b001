-- Both backends: 1 if version $1 is still there (a cleanup may have dropped an abandoned load).
SELECT count(*) FROM segment_versions WHERE id = $1
