-- How many rows of the partitions bound in place of the generated part are not released yet.
SELECT count(*) FROM scheduled_releases WHERE released_at IS NULL AND source_partition IN (/* generated */)
