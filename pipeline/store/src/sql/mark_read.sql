-- Keeps the first read time. $1 notification, $2 its user (another user's id matches no row), $3 now.
UPDATE notifications SET read_at = COALESCE(read_at, $3) WHERE id = $1 AND user_id = $2
