//! The claim stage as a [`Processor`]: decides each record of an owned partition in log order on
//! that partition's state, produces each decision to `coupons`, and per batch awaits those
//! acknowledgements, then commits the batch's state and next offset in one fenced transaction.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use apache_avro::Schema;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tidings_core::consumer::StageContext;
use tidings_core::retry::{until_done, GaveUp};
use tidings_core::stage::{acknowledged, enqueue, DeadLetters, Processor, StageError, System};
use tidings_core::{DecodeError, FramedEncoder, RegistryClient};
use tidings_store::claims::{ClaimCommit, ClaimRows};
use tidings_store::Store;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::decide::{CouponState, Decision};
use super::ownership::{Held, Holdings, Ownership};
use super::records::{claim_record, coupons_value, decision_event, Undecidable};
use super::{state, ClaimsConfig};

/// The stage's consumer context: start at the stored offsets, forget revoked partitions.
pub type ClaimsContext = StageContext<Ownership>;

/// One owned partition: its coupons and the batch decided on them but not yet committed.
pub(super) struct Part {
    epoch: i64,
    coupons: HashMap<String, CouponState>,
    /// The next offset to decide; records below it were decided already.
    next: i64,
    /// Whether `next` moved since the last commit.
    moved: bool,
    rows: ClaimRows,
    /// The batch's decision events and dead letters, acknowledged before the batch commits.
    deliveries: Vec<DeliveryFuture>,
}

pub struct Claims {
    pub(super) cfg: ClaimsConfig,
    pub(super) store: Store,
    pub(super) registry: RegistryClient,
    pub(super) reader: &'static Schema,
    pub(super) writer: &'static Schema,
    pub(super) encoder: FramedEncoder,
    pub(super) producer: FutureProducer,
    pub(super) dead: DeadLetters,
    pub(super) held: Holdings,
    pub(super) parts: HashMap<i32, Part>,
    /// Records decided since the last commit, and when the first of them was.
    pub(super) pending: usize,
    pub(super) started: Option<Instant>,
    pub(super) shutdown: CancellationToken,
}

impl Processor for Claims {
    /// The batch's linger time is over.
    type Due = ();

    async fn process(&mut self, msg: &BorrowedMessage<'_>) -> Result<(), StageError> {
        self.decide(msg).await?;
        if self.pending >= self.cfg.batch_size {
            self.commit().await?;
        }
        Ok(())
    }

    fn due(&mut self) -> impl std::future::Future<Output = ()> + Send {
        let deadline = self.started.map(|s| s + self.cfg.linger);
        async move {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        }
    }

    async fn on_due(&mut self, (): ()) -> Result<(), StageError> {
        self.commit().await
    }

    async fn finish(mut self, ended: Result<(), StageError>) -> Result<(), StageError> {
        if ended.is_ok() && self.pending > 0 {
            // Shutdown: commit what was decided so a restart does not decide it again.
            self.commit().await?;
            info!("Claim stage stopped after committing its last batch.");
        }
        ended
    }
}

impl Claims {
    /// Decides one record (or dead-letters it) into its partition's batch.
    async fn decide(&mut self, msg: &BorrowedMessage<'_>) -> Result<(), StageError> {
        let p = msg.partition();
        let held = self.held.lock().expect("lock").get(&p).copied();
        let (epoch, stored_next) = match held {
            Some(Held::Owned { epoch, next }) => (epoch, next),
            Some(Held::Untaken) => {
                return Err(StageError::external(
                    System::Store,
                    true,
                    format!("claim partition {p} is assigned but could not be taken in the store"),
                ))
            }
            // Fetched before its revocation, or fenced: the partition's new owner decides it.
            None | Some(Held::Fenced) => return Ok(()),
        };
        if self.parts.get(&p).is_none_or(|part| part.epoch != epoch) {
            // Newly taken (or taken again: a batch of an earlier epoch would be fenced, and the
            // consumer restarts from the stored offset, so it is dropped and decided again).
            let dropped = self.parts.remove(&p);
            if dropped.as_ref().is_some_and(|d| d.moved) {
                info!(partition = p, "Claim partition {p} was taken again; its uncommitted batch is decided again.");
            }
            let rows = self.store.load_claim_rows(p).await?;
            let coupons = state::from_rows(rows).map_err(StageError::internal)?;
            let next = stored_next.unwrap_or(0);
            self.parts.insert(
                p,
                Part { epoch, coupons, next, moved: false, rows: ClaimRows::default(), deliveries: Vec::new() },
            );
        }
        let part = self.parts.get_mut(&p).expect("inserted above");
        if msg.offset() < part.next {
            return Ok(());
        }
        let decoded = match msg.payload() {
            None => Err(Undecidable { reason: "empty-payload", error: "record has no value".into() }),
            Some(payload) => match until_done(
                &self.shutdown,
                || "Decoding a claim through the schema registry".to_string(),
                (Duration::from_millis(200), Duration::from_secs(30)),
                || self.registry.decode(payload, self.reader),
                DecodeError::is_retriable,
            )
            .await
            {
                Ok(v) => claim_record(self.reader, &v),
                Err(GaveUp::Failed(e)) => Err(Undecidable { reason: e.reason_code(), error: e.to_string() }),
                // Not decided: the partition does not move past it, the next start reads it again.
                Err(GaveUp::ShutDown(_)) => return Ok(()),
            },
        };
        let at = msg.timestamp().to_millis().map(|ms| ms.saturating_mul(1000));
        let outcome = match (decoded, at) {
            (Ok(rec), Some(at)) => {
                let coupon = part.coupons.entry(rec.coupon_id.clone()).or_default();
                let decided = coupon.decide(&rec.coupon_id, &rec.request, at);
                let discount = coupon.definition.as_ref().map_or(0, |d| d.discount_percent);
                if let Decision::DefinitionRefused(why) = &decided.decision {
                    Err(Undecidable { reason: "invalid-definition", error: why.clone() })
                } else {
                    state::add_rows(&mut part.rows, &rec.coupon_id, &rec.request, &decided);
                    Ok(decision_event(&rec, &decided.decision, discount, at).map(|e| (rec.coupon_id, e)))
                }
            }
            (Ok(_), None) => Err(Undecidable { reason: "no-timestamp", error: "record has no timestamp".into() }),
            (Err(u), _) => Err(u),
        };
        let delivery = match outcome {
            Ok(None) => None,
            Ok(Some((coupon_id, event))) => {
                let value = coupons_value(self.writer, &event)
                    .map_err(|e| StageError::internal(format!("a decision does not fit the coupons schema: {e}")))?;
                let bytes = self
                    .encoder
                    .encode(value)
                    .map_err(|e| StageError::internal(format!("encoding a decision: {e}")))?;
                let rec = FutureRecord::to(&self.cfg.output).key(coupon_id.as_str()).payload(&bytes);
                Some(enqueue(&self.producer, rec).await?)
            }
            Err(u) => {
                warn!(partition = p, offset = msg.offset(), reason = u.reason, error = %u.error, "Claim record is a dead letter.");
                Some(
                    self.dead
                        .send(msg, u.reason, &u.error)
                        .await
                        .map_err(|e| StageError::kafka(System::DeadLetter, e))?,
                )
            }
        };
        part.deliveries.extend(delivery);
        part.next = msg.offset() + 1;
        part.moved = true;
        self.pending += 1;
        self.started.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Commits every partition's batch: its events acknowledged first, then its rows and next
    /// offset in one transaction fenced by the partition's epoch.
    async fn commit(&mut self) -> Result<(), StageError> {
        let mut fenced = Vec::new();
        for (p, part) in self.parts.iter_mut().filter(|(_, part)| part.moved) {
            for d in part.deliveries.drain(..) {
                acknowledged(d).await.map_err(|e| StageError::kafka(System::Kafka, e))?;
            }
            let rows = std::mem::take(&mut part.rows);
            match self.store.commit_claims(&self.cfg.group, *p, part.epoch, &rows, part.next).await? {
                ClaimCommit::Committed => part.moved = false,
                ClaimCommit::Fenced => fenced.push((*p, part.epoch)),
            }
        }
        for (p, stale) in fenced {
            // Another owner took the partition: what this one decided is its to decide again.
            warn!(partition = p, "Claim partition {p} was taken by another owner; this batch of it is dropped.");
            self.parts.remove(&p);
            let mut held = self.held.lock().expect("lock");
            // Unless this process took it again since (a newer epoch of its own).
            if held.get(&p).is_some_and(|h| matches!(h, Held::Owned { epoch, .. } if *epoch == stale)) {
                held.insert(p, Held::Fenced);
            }
        }
        // A revoked partition's batch is committed above (fenced if its new owner took it
        // already); its state is not needed any more.
        let held = self.held.lock().expect("lock");
        self.parts.retain(|p, part| matches!(held.get(p), Some(Held::Owned { epoch, .. }) if *epoch == part.epoch));
        drop(held);
        self.pending = 0;
        self.started = None;
        Ok(())
    }
}
