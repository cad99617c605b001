-- Which of a replayed batch's notification ids are stored already (a dry run's "already present").
SELECT id FROM notifications WHERE id IN (/* generated */)
