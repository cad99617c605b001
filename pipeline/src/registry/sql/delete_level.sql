DELETE FROM registry_config WHERE subject = $1
