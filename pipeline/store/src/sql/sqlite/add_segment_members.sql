-- Head of a multi-row insert: sqlite.rs appends the VALUES rows, (segment, user) each, a chunk per
-- statement.
INSERT OR IGNORE INTO audience_segments (segment, user_id)
