-- The users COPYed into users_staging join segment version $1; no row for those in it already.
INSERT INTO segment_members (version, user_id) SELECT $1, user_id FROM users_staging ON CONFLICT DO NOTHING
