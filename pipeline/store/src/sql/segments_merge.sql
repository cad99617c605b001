-- Both backends: adds the members loaded into version $2 to version $1; one row per new member.
INSERT INTO segment_members (version, user_id) SELECT $1, user_id FROM segment_members WHERE version = $2
ON CONFLICT DO NOTHING
