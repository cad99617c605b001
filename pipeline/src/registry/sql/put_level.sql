-- A subject's compatibility level (subject '' is the global one), replacing the one it had.
INSERT INTO registry_config (subject, compatibility) VALUES ($1, $2)
ON CONFLICT (subject) DO UPDATE SET compatibility = EXCLUDED.compatibility
