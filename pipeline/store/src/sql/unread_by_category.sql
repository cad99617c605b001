-- A user's unread inbox notifications per category (archived ones left out), in the rows of the
-- unread index (notifications_user_unread). $1 user.
SELECT category, count(*) FROM notifications
WHERE user_id = $1 AND read_at IS NULL AND archived_at IS NULL
GROUP BY category
ORDER BY category
