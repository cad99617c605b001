-- The stored texts of a replayed batch's notifications (a templating backfill compares them with
-- the texts its templates render now).
SELECT id, title, body, link FROM notifications WHERE id IN (/* generated */)
