-- Takes a claim partition for a new owner: bumps its epoch (creating the row at epoch 1) and
-- returns the new epoch with the stored next offset. $1 consumer, $2 partition.
INSERT INTO claim_partitions (consumer, partition, epoch, next_offset) VALUES ($1, $2, 1, NULL)
ON CONFLICT (consumer, partition) DO UPDATE SET epoch = claim_partitions.epoch + 1
RETURNING epoch, next_offset
