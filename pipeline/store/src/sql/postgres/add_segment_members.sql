-- The users COPYed into users_staging join segment $1; no row for those in it already.
INSERT INTO audience_segments (segment, user_id) SELECT $1, user_id FROM users_staging ON CONFLICT DO NOTHING
