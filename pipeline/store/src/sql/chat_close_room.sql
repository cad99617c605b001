-- No row when the room is closed already, so its close event is written once.
UPDATE chat_rooms SET closed = true WHERE room_id = $1 AND NOT closed
