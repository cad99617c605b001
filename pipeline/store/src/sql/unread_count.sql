-- Archived notifications are out of the inbox, so they do not count as unread.
SELECT count(*) FROM notifications WHERE user_id = $1 AND read_at IS NULL AND archived_at IS NULL
