-- Head of a multi-row insert: sqlite.rs appends the VALUES rows, (version, user) each, a chunk per
-- statement.
INSERT OR IGNORE INTO segment_members (version, user_id)
