-- A room or membership change's event, written in the change's transaction so that it is produced
-- even if the first produce fails (the gateway's chat outbox). $1 room, $2 event JSON, $3 when.
INSERT INTO chat_outbox (room_id, event, created_at) VALUES ($1, $2, $3)
