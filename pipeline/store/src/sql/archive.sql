-- Keeps the first archive time. $1 notification, $2 its user (another user's id matches no row), $3 now.
UPDATE notifications SET archived_at = COALESCE(archived_at, $3) WHERE id = $1 AND user_id = $2
