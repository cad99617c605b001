-- Moves a member's read position up to $3, never back. No row when $2 is not a member of room $1.
UPDATE room_members SET read_seq = CASE WHEN read_seq < $3 THEN $3 ELSE read_seq END
WHERE room_id = $1 AND user_id = $2
