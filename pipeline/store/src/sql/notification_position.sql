-- The stream position of notification $1 if it is user $2's (another user's id matches no row).
SELECT stream_partition, stream_offset FROM notifications WHERE id = $1 AND user_id = $2
