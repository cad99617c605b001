-- Archived notifications leave the inbox list and the unread counts but stay listable
-- (`GET /v1/notifications?archived=true`). Adding a nullable column without a default rewrites nothing.
ALTER TABLE notifications ADD COLUMN archived_at timestamptz;
-- The archived list pages this like the inbox pages notifications_user_inbox; new rows are never
-- archived, so inserts do not touch it.
CREATE INDEX notifications_user_archived ON notifications (user_id, stream_partition, stream_offset)
    WHERE archived_at IS NOT NULL;
-- Unread counts and mark-all-read visit only a user's unread inbox rows instead of every row they
-- ever got (and their table pages to check read_at): one more index entry per insert.
CREATE INDEX notifications_user_unread ON notifications (user_id, stream_partition, stream_offset)
    WHERE read_at IS NULL AND archived_at IS NULL;
