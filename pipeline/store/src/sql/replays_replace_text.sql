-- A templating backfill replaces a stored notification's texts in place (same id, no new row);
-- a row whose texts are already these is left alone.
UPDATE notifications SET title = $2, body = $3, link = $4
WHERE id = $1 AND (title <> $2 OR body <> $3 OR link IS DISTINCT FROM $4)
