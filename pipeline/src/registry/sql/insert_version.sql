INSERT INTO registry_versions (subject, version, schema_id, deleted) VALUES ($1, $2, $3, $4)
