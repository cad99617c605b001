DELETE FROM registry_versions WHERE subject = $1 AND version = $2
