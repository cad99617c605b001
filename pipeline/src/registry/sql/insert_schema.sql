INSERT INTO registry_schemas (id, schema_type, schema, canonical) VALUES ($1, $2, $3, $4)
