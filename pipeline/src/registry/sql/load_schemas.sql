SELECT id, schema_type, schema FROM registry_schemas ORDER BY id
