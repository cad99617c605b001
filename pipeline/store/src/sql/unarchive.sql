-- Back to the inbox. $1 notification, $2 its user (another user's id matches no row).
UPDATE notifications SET archived_at = NULL WHERE id = $1 AND user_id = $2
