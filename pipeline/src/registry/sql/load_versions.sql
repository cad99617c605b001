SELECT subject, version, schema_id, deleted FROM registry_versions ORDER BY subject, version
