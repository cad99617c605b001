//! The scheduler as a [`Processor`]: records read are stored in batches (then their offsets are
//! stored); every tick, the owned partitions' due rows are produced, acknowledged, marked released.
//!
//! Metrics: `tidings_scheduler_held` (rows of the owned partitions not released yet, per tick),
//! `tidings_scheduler_released_total{to}`; dead letters are core's
//! `tidings_dead_letters_total{stage="scheduler", reason}`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{BorrowedMessage, Message, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, Timestamp, TopicPartitionList};
use tidings_core::stage::{acknowledged, enqueue, unproducible, DeadLetters, Processor, StageError, System};
use tidings_store::scheduled::ScheduledRelease;
use tidings_store::Store;
use tracing::{debug, info, warn};

use super::records::{decode_headers, encode_headers, release_of, released_headers};
use super::{Owned, SchedulerConfig, SchedulerContext};

pub struct Scheduler {
    pub(super) cfg: SchedulerConfig,
    pub(super) store: Store,
    pub(super) producer: FutureProducer,
    pub(super) dead: DeadLetters,
    pub(super) consumer: Arc<StreamConsumer<SchedulerContext>>,
    pub(super) owned: Owned,
    /// Records read and not stored yet.
    pub(super) read: Vec<ScheduledRelease>,
    /// The next offset of each partition once what was read is stored.
    pub(super) next: HashMap<i32, i64>,
    /// Dead letters sent since the last store, acknowledged before their offsets are stored.
    pub(super) dead_letters: Vec<DeliveryFuture>,
    /// When the next release is due.
    pub(super) next_tick: Instant,
}

impl Processor for Scheduler {
    type Due = ();

    async fn process(&mut self, msg: &BorrowedMessage<'_>) -> Result<(), StageError> {
        match release_of(msg.headers(), &self.cfg.destinations) {
            Ok(r) => self.read.push(ScheduledRelease {
                release_id: r.id,
                partition: msg.partition(),
                offset: msg.offset(),
                release_at: r.at,
                release_to: r.to,
                key: msg.key().map(<[u8]>::to_vec),
                value: msg.payload().map(<[u8]>::to_vec),
                headers: encode_headers(&r.other),
            }),
            Err(u) => {
                let d = self
                    .dead
                    .send(msg, u.reason, &u.error)
                    .await
                    .map_err(|e| StageError::kafka(System::DeadLetter, e))?;
                self.dead_letters.push(d);
            }
        }
        self.next.insert(msg.partition(), msg.offset() + 1);
        if self.read.len() + self.dead_letters.len() >= self.cfg.batch_size {
            self.store_read().await?;
        }
        Ok(())
    }

    fn due(&mut self) -> impl std::future::Future<Output = ()> + Send {
        tokio::time::sleep_until(self.next_tick.into())
    }

    async fn on_due(&mut self, _: ()) -> Result<(), StageError> {
        self.store_read().await?;
        let more = self.release().await?;
        // After a full batch the next one is due almost at once; the millisecond lets the consumer
        // be polled in between (records read, rebalances served) while a backlog drains.
        let wait = if more { Duration::from_millis(1) } else { self.cfg.tick };
        self.next_tick = Instant::now() + wait;
        Ok(())
    }

    /// Stores what was read and commits its offsets, so a restart reads none of it again.
    async fn finish(mut self, ended: Result<(), StageError>) -> Result<(), StageError> {
        let stored = if ended.is_ok() { self.store_read().await } else { Ok(()) };
        if let Err(e) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            if e.rdkafka_error_code() != Some(RDKafkaErrorCode::NoOffset) {
                warn!(error = %e, "Final offset commit failed; the next start reads again from the previous commit.");
            }
        }
        if ended.is_ok() && stored.is_ok() {
            info!("Scheduler stopped after storing what it read and committing its offsets.");
        }
        ended.and(stored)
    }
}

impl Scheduler {
    /// Stores the records read (a record stored already keeps its row), then their offsets.
    async fn store_read(&mut self) -> Result<(), StageError> {
        for d in self.dead_letters.drain(..) {
            acknowledged(d).await.map_err(|e| StageError::kafka(System::DeadLetter, e))?;
        }
        if !self.read.is_empty() {
            let now = chrono::Utc::now().timestamp_micros();
            let new = self.store.hold_releases(&self.read, now).await?;
            debug!(read = self.read.len(), new, "Scheduler stored {new} held record(s).");
            self.read.clear();
        }
        if self.next.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::with_capacity(self.next.len());
        for (p, next) in self.next.drain() {
            tpl.add_partition_offset(&self.cfg.input, p, Offset::Offset(next))?;
        }
        if let Err(e) = self.consumer.store_offsets(&tpl) {
            // Revoked meanwhile: its new owner reads those records again, and keeps the first rows.
            debug!(error = %e, "Offsets not stored (a partition is no longer assigned).");
        }
        Ok(())
    }

    /// Releases one batch of the owned partitions' due rows; on a partial batch also purges old
    /// released rows and updates the held gauge. Whether a full batch was released (more may be due).
    async fn release(&mut self) -> Result<bool, StageError> {
        let now = match self.cfg.clock.now_micros() {
            Ok(now) => now,
            Err(e) => {
                warn!(error = %e, "The scheduler cannot tell the time; nothing is released this tick.");
                return Ok(false);
            }
        };
        let owned = self.owned.partitions();
        let due = self.store.due_releases(&owned, now, self.cfg.batch_size).await?;
        let full = due.len() == self.cfg.batch_size;
        if !due.is_empty() {
            self.produce(&due).await?;
        }
        if !full {
            let retain = i64::try_from(self.cfg.retain_released.as_micros()).unwrap_or(i64::MAX);
            let purged = self.store.purge_released(now.saturating_sub(retain), self.cfg.batch_size).await?;
            if purged > 0 {
                debug!(purged, "Scheduler purged {purged} released row(s) past their retention.");
            }
            let held = self.store.held_releases(&owned).await?;
            metrics::gauge!("tidings_scheduler_held").set(held as f64);
        }
        Ok(full)
    }

    /// Produces `due` (key, value and headers as read, plus `tidings.released-at`), awaits every
    /// acknowledgement, then marks them released. A row its destination refuses for good is a
    /// dead letter (and marked released, so it does not hold back the rest).
    async fn produce(&mut self, due: &[ScheduledRelease]) -> Result<(), StageError> {
        let mut deliveries = Vec::with_capacity(due.len());
        for row in due {
            let kept = decode_headers(&row.headers).ok_or_else(|| {
                StageError::internal(format!(
                    "the stored headers of release {} are not the scheduler's",
                    row.release_id
                ))
            })?;
            let mut rec: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&row.release_to).headers(released_headers(&kept, row.release_at));
            if let Some(k) = &row.key {
                rec = rec.key(k.as_slice());
            }
            if let Some(v) = &row.value {
                rec = rec.payload(v.as_slice());
            }
            deliveries.push(enqueue(&self.producer, rec).await.map_err(|e| StageError::kafka(System::Kafka, e))?);
        }
        let mut released: HashMap<&str, u64> = HashMap::new();
        let mut dead = Vec::new();
        for (row, d) in due.iter().zip(deliveries) {
            match acknowledged(d).await {
                Ok(_) => *released.entry(row.release_to.as_str()).or_default() += 1,
                Err(e) => match unproducible(&e) {
                    Some(reason) => {
                        let error = format!("{} refused the released record: {e}", row.release_to);
                        let copy = as_message(&self.cfg.input, row);
                        dead.push(
                            self.dead
                                .send(&copy, reason, &error)
                                .await
                                .map_err(|e| StageError::kafka(System::DeadLetter, e))?,
                        );
                    }
                    None => {
                        return Err(StageError::kafka(System::Kafka, e).context(format!("releasing {}", row.release_id)))
                    }
                },
            }
        }
        for d in dead {
            acknowledged(d).await.map_err(|e| StageError::kafka(System::DeadLetter, e))?;
        }
        let at = self.cfg.clock.now_micros().unwrap_or_else(|_| chrono::Utc::now().timestamp_micros());
        let ids: Vec<&str> = due.iter().map(|r| r.release_id.as_str()).collect();
        self.store.mark_released(&ids, at).await?;
        for (to, n) in released {
            info!(released = n, to, "Released {n} held record(s) to {to}.");
            metrics::counter!("tidings_scheduler_released_total", "to" => to.to_string()).increment(n);
        }
        Ok(())
    }
}

/// A stored row as the `tidings.scheduled` record it was read from, for its dead letter.
fn as_message(input: &str, row: &ScheduledRelease) -> OwnedMessage {
    OwnedMessage::new(
        row.value.clone(),
        row.key.clone(),
        input.to_string(),
        Timestamp::NotAvailable,
        row.partition,
        row.offset,
        None,
    )
}
