UPDATE registry_versions SET deleted = $1 WHERE subject = $2 AND version = $3
