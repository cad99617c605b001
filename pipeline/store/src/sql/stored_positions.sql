-- The stream positions (notifications partition, offset) with at least one stored row, in an offset
-- range (`tidings audit`): a group record's rows share one position. $1 first offset, $2 end (exclusive).
SELECT DISTINCT stream_partition, stream_offset FROM notifications WHERE stream_offset >= $1 AND stream_offset < $2
