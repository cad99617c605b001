-- Marks read a user's unread inbox notifications at or before stream position ($2, $3), the newest
-- the client showed: one stored after it (a later offset) stays unread. $1 user, $4 now.
UPDATE notifications SET read_at = $4
WHERE user_id = $1 AND read_at IS NULL AND archived_at IS NULL
  AND (stream_partition, stream_offset) <= ($2, $3)
