-- The first statement of every batch's transaction: moves the partition's next offset only if the
-- committing owner's epoch is still current (no row changed = fenced: roll back). On PostgreSQL it
-- also locks the row, so an assignment's epoch bump waits for this batch and then reads it.
-- $1 consumer, $2 partition, $3 epoch, $4 next offset.
UPDATE claim_partitions SET next_offset = $4 WHERE consumer = $1 AND partition = $2 AND epoch = $3
