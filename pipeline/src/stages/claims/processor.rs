//! The claim stage as a [`Processor`]: gathers the records read of each owned partition, decides
//! them together in log order (the rejections their claims need looked up in one store query) and
//! produces each decision to `coupons`; per batch awaits those acknowledgements, then commits the
//! batch's state and next offset in one fenced transaction.
//!
//! Metrics: `tidings_claims_decisions_total{outcome, reason}` (reason for rejections and
//! refusals), `tidings_stage_batch_records{stage="claims"}` and `tidings_claims_commit_seconds` per
//! committed batch, `tidings_claims_lookup_seconds` per group of claims decided; dead letters are core's
//! `tidings_dead_letters_total{stage="claims", reason}`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use apache_avro::Schema;
use rdkafka::message::{BorrowedMessage, Message, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tidings_core::consumer::StageContext;
use tidings_core::retry::{until_done, GaveUp};
use tidings_core::stage::{acknowledged, enqueue, DeadLetters, Processor, StageError, System};
use tidings_core::{DecodeError, FramedEncoder, RegistryClient};
use tidings_store::claims::{ClaimCommit, ClaimRows};
use tidings_store::Store;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::decide::{Decision, RefuseReason, RejectReason, Request};
use super::ownership::{Held, Holdings, Ownership};
use super::records::{
    claim_record, claim_record_datum, claim_record_value, coupons_value, decision_event, encode_decision, reads_direct,
    writes_direct, Claim, ClaimRecord, Undecidable,
};
use super::state::PartState;
use super::ClaimsConfig;

/// The stage's consumer context: start at the stored offsets, forget revoked partitions.
pub type ClaimsContext = StageContext<Ownership>;

/// A decodable record waiting to be decided with the records read with it.
struct Pending {
    rec: ClaimRecord,
    /// The record's timestamp, microseconds.
    at: i64,
    /// A definition's record, kept for its dead letter if it is refused.
    message: Option<OwnedMessage>,
}

/// One owned partition: its coupons and the batch read (decided in groups) but not committed.
pub(super) struct Part {
    epoch: i64,
    state: PartState,
    /// Records read and not decided yet, in log order.
    records: Vec<Pending>,
    /// The next offset to decide; records below it were decided already.
    next: i64,
    /// Whether `next` moved since the last commit.
    moved: bool,
    /// Records read since the last commit (the batch's size).
    read: usize,
    rows: ClaimRows,
    /// The batch's decision events and dead letters, acknowledged before the batch commits.
    deliveries: Vec<DeliveryFuture>,
}

/// Which of the direct codecs the registered schemas allow (see `records`).
#[derive(Debug, Clone, Copy)]
pub struct Direct {
    /// The reader schema is the one `claim_record_datum` reads.
    pub read: bool,
    /// The `coupons` writer schema is the one `encode_decision` writes.
    pub write: bool,
}

impl Direct {
    pub fn of(reader: &Schema, writer: &Schema) -> Self {
        Direct { read: reads_direct(reader), write: writes_direct(writer) }
    }
}

pub struct Claims {
    pub(super) cfg: ClaimsConfig,
    pub(super) store: Store,
    pub(super) registry: RegistryClient,
    pub(super) reader: &'static Schema,
    pub(super) writer: &'static Schema,
    pub(super) encoder: FramedEncoder,
    pub(super) direct: Direct,
    pub(super) producer: FutureProducer,
    pub(super) dead: DeadLetters,
    pub(super) held: Holdings,
    pub(super) parts: HashMap<i32, Part>,
    /// Records read since the last commit, and when the first of them was.
    pub(super) pending: usize,
    pub(super) started: Option<Instant>,
    /// When the first record read and not yet decided was.
    pub(super) undecided: Option<Instant>,
    pub(super) shutdown: CancellationToken,
}

/// What is due.
pub enum Due {
    /// The records read are decided and their decisions produced (`decide_linger` is over).
    Decide,
    /// The batch commits (its `linger` is over).
    Commit,
}

impl Processor for Claims {
    type Due = Due;

    async fn process(&mut self, msg: &BorrowedMessage<'_>) -> Result<(), StageError> {
        self.decide(msg).await?;
        if self.pending >= self.cfg.batch_size {
            self.commit().await?;
        }
        Ok(())
    }

    fn due(&mut self) -> impl std::future::Future<Output = Due> + Send {
        let commit = self.started.map(|s| (s + self.cfg.linger, Due::Commit));
        let decide = self.undecided.map(|s| (s + self.cfg.decide_linger, Due::Decide));
        let first = match (commit, decide) {
            (Some(c), Some(d)) if d.0 < c.0 => Some(d),
            (Some(c), _) => Some(c),
            (None, d) => d,
        };
        async move {
            match first {
                Some((at, due)) => {
                    tokio::time::sleep_until(at.into()).await;
                    due
                }
                None => std::future::pending().await,
            }
        }
    }

    async fn on_due(&mut self, due: Due) -> Result<(), StageError> {
        match due {
            Due::Decide => self.decide_read().await,
            Due::Commit => self.commit().await,
        }
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
    /// Adds one record to its partition's batch, or dead-letters it if it cannot be decided on.
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
            let rows = self.store.load_claim_coupons(p).await?;
            let state =
                PartState::new(rows, self.cfg.max_coupons, self.cfg.rejection_cache).map_err(StageError::internal)?;
            let next = stored_next.unwrap_or(0);
            let part = Part {
                epoch,
                state,
                records: Vec::new(),
                next,
                moved: false,
                read: 0,
                rows: ClaimRows::default(),
                deliveries: Vec::new(),
            };
            self.parts.insert(p, part);
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
                || decode_claim(&self.registry, self.reader, self.direct.read, payload),
                DecodeError::is_retriable,
            )
            .await
            {
                Ok(claim) => claim,
                Err(GaveUp::Failed(e)) => Err(Undecidable { reason: e.reason_code(), error: e.to_string() }),
                // Not decided: the partition does not move past it, the next start reads it again.
                Err(GaveUp::ShutDown(_)) => return Ok(()),
            },
        };
        let at = msg.timestamp().to_millis().map(|ms| ms.saturating_mul(1000));
        let undecidable = match (decoded, at) {
            (Ok(rec), Some(at)) => {
                // Decided with the records read with it, their rejections looked up together.
                let message = matches!(rec.request, Request::Define(_)).then(|| msg.detach());
                part.records.push(Pending { rec, at, message });
                None
            }
            (Ok(_), None) => Some(Undecidable { reason: "no-timestamp", error: "record has no timestamp".into() }),
            (Err(u), _) => Some(u),
        };
        if let Some(u) = undecidable {
            warn!(partition = p, offset = msg.offset(), reason = u.reason, error = %u.error, "Claim record is a dead letter.");
            let delivery =
                self.dead.send(msg, u.reason, &u.error).await.map_err(|e| StageError::kafka(System::DeadLetter, e))?;
            part.deliveries.push(delivery);
        }
        let read = !part.records.is_empty();
        part.next = msg.offset() + 1;
        part.moved = true;
        part.read += 1;
        self.pending += 1;
        self.started.get_or_insert_with(Instant::now);
        if read {
            self.undecided.get_or_insert_with(Instant::now);
        }
        Ok(())
    }

    /// Decides the records read in every partition.
    async fn decide_read(&mut self) -> Result<(), StageError> {
        let read: Vec<i32> = self.parts.iter().filter(|(_, part)| !part.records.is_empty()).map(|(p, _)| *p).collect();
        for p in read {
            self.decide_batch(p).await?;
        }
        self.undecided = None;
        Ok(())
    }

    /// Decides the records read in partition `p`: one store look-up for the rejections their
    /// claims need, then each in log order, its decision produced to `coupons` (or the record
    /// dead-lettered). The batch's rejections stay in memory until it commits.
    async fn decide_batch(&mut self, p: i32) -> Result<(), StageError> {
        let part = self.parts.get_mut(&p).expect("a partition with a batch");
        if part.records.is_empty() {
            return Ok(());
        }
        let ask = part.state.begin(part.records.iter().map(|r| (r.rec.coupon_id.as_str(), &r.rec.request)));
        let looking = Instant::now();
        let found = self.store.find_claim_rejections(&ask).await?;
        metrics::histogram!("tidings_claims_lookup_seconds").record(looking.elapsed().as_secs_f64());
        part.state.found(found).map_err(StageError::internal)?;
        let mut tally = Tally::default();
        for Pending { rec, at, message } in std::mem::take(&mut part.records) {
            let outcome = match part.state.decide(&rec.coupon_id, &rec.request, at) {
                Ok(decided) => match &decided.decision {
                    Decision::DefinitionRefused(why) => {
                        Err(Undecidable { reason: "invalid-definition", error: why.clone() })
                    }
                    decision => {
                        tally.add(decision);
                        let discount = part
                            .state
                            .coupon(&rec.coupon_id)
                            .and_then(|c| c.definition.as_ref())
                            .map_or(0, |d| d.discount_percent);
                        super::state::add_rows(&mut part.rows, &rec.coupon_id, &rec.request, &decided);
                        if self.direct.write {
                            let mut out = Vec::with_capacity(160);
                            let id = self.encoder.schema_id();
                            Ok(encode_decision(id, &rec, decision, discount, at, &mut out).then_some(out))
                        } else {
                            match decision_event(&rec, decision, discount, at) {
                                Some(event) => Ok(Some(encode_generic(self.writer, &self.encoder, &event)?)),
                                None => Ok(None),
                            }
                        }
                    }
                },
                Err(why) => Err(Undecidable { reason: "too-many-coupons", error: why }),
            };
            let delivery = match outcome {
                Ok(None) => None,
                Ok(Some(bytes)) => {
                    let record = FutureRecord::to(&self.cfg.output).key(rec.coupon_id.as_str()).payload(&bytes);
                    Some(enqueue(&self.producer, record).await?)
                }
                Err(u) => {
                    // Only a definition is refused, and its record was kept for this.
                    let msg =
                        message.ok_or_else(|| StageError::internal("a refused record that is not a definition"))?;
                    warn!(partition = p, offset = msg.offset(), reason = u.reason, error = %u.error, "Claim record is a dead letter.");
                    Some(
                        self.dead
                            .send(&msg, u.reason, &u.error)
                            .await
                            .map_err(|e| StageError::kafka(System::DeadLetter, e))?,
                    )
                }
            };
            part.deliveries.extend(delivery);
        }
        tally.record();
        Ok(())
    }

    /// Commits every partition's batch: decided, its events acknowledged, then its rows and next
    /// offset in one transaction fenced by the partition's epoch.
    async fn commit(&mut self) -> Result<(), StageError> {
        self.decide_read().await?;
        let mut fenced = Vec::new();
        for (p, part) in self.parts.iter_mut().filter(|(_, part)| part.moved) {
            for d in part.deliveries.drain(..) {
                acknowledged(d).await.map_err(|e| StageError::kafka(System::Kafka, e))?;
            }
            let rows = std::mem::take(&mut part.rows);
            let committing = Instant::now();
            let committed = self.store.commit_claims(&self.cfg.group, *p, part.epoch, &rows, part.next).await?;
            batch_committed(std::mem::take(&mut part.read), committing.elapsed());
            match committed {
                ClaimCommit::Committed => {
                    tidings_core::lag::durable(&self.cfg.group, &self.cfg.input, *p, part.next);
                    part.moved = false;
                    part.state.end();
                }
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

/// A record's claim: read directly when `direct` (the reader is the direct decoder's schema) and
/// its writer schema is the reader (the usual case), else through the registry's resolution.
async fn decode_claim(
    registry: &RegistryClient,
    reader: &'static Schema,
    direct: bool,
    payload: &[u8],
) -> Result<Claim, DecodeError> {
    if direct {
        return registry.decode_as(payload, reader, claim_record_datum, claim_record_value).await;
    }
    Ok(claim_record(reader, &registry.decode(payload, reader).await?))
}

/// A decision event through the generic path (JSON → Avro value → framed bytes), for a `coupons`
/// schema the direct encoder was not written for.
fn encode_generic(writer: &Schema, encoder: &FramedEncoder, event: &serde_json::Value) -> Result<Vec<u8>, StageError> {
    let value = coupons_value(writer, event)
        .map_err(|e| StageError::internal(format!("a decision does not fit the coupons schema: {e}")))?;
    encoder.encode(value).map_err(|e| StageError::internal(format!("encoding a decision: {e}")))
}

/// A decided group's decisions by outcome (and reason), added to the counters once per group
/// rather than looked up once per decision.
#[derive(Debug, Default)]
struct Tally {
    issued: u64,
    redeemed: u64,
    rejected: [u64; RejectReason::ALL.len()],
    refused: [u64; REFUSE_REASONS.len()],
}

const REFUSE_REASONS: [RefuseReason; 4] =
    [RefuseReason::UnknownCoupon, RefuseReason::UnknownCode, RefuseReason::Expired, RefuseReason::AlreadyRedeemed];

impl Tally {
    fn add(&mut self, decision: &Decision) {
        match decision {
            Decision::Issued { .. } => self.issued += 1,
            Decision::Redeemed { .. } => self.redeemed += 1,
            Decision::Rejected { reason, .. } => {
                self.rejected[RejectReason::ALL.iter().position(|r| r == reason).expect("listed")] += 1
            }
            Decision::Refused { reason, .. } => {
                self.refused[REFUSE_REASONS.iter().position(|r| r == reason).expect("listed")] += 1
            }
            Decision::Defined | Decision::DefinitionRefused(_) => {}
        }
    }

    /// Adds the counts to `tidings_claims_decisions_total`.
    fn record(&self) {
        const NAME: &str = "tidings_claims_decisions_total";
        let add = |n: u64, outcome: &'static str, reason: Option<&'static str>| {
            if n > 0 {
                match reason {
                    Some(reason) => metrics::counter!(NAME, "outcome" => outcome, "reason" => reason).increment(n),
                    None => metrics::counter!(NAME, "outcome" => outcome).increment(n),
                }
            }
        };
        add(self.issued, "issued", None);
        add(self.redeemed, "redeemed", None);
        for (n, r) in self.rejected.iter().zip(RejectReason::ALL) {
            add(*n, "rejected", Some(r.as_str()));
        }
        for (n, r) in self.refused.iter().zip(REFUSE_REASONS) {
            add(*n, "refused", Some(r.as_str()));
        }
    }
}

/// A batch of `records` records (decided, dead-lettered or skipped) committed in `took`.
fn batch_committed(records: usize, took: Duration) {
    tidings_core::stage::batch(super::STAGE, records);
    metrics::histogram!("tidings_claims_commit_seconds").record(took.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::claims::decide::Issue;
    use metrics_exporter_prometheus::PrometheusBuilder;
    use rdkafka::message::OwnedMessage;
    use rdkafka::Timestamp;

    /// Every decision counts under its outcome (rejections and refusals with their reason), and a
    /// committed batch's size and commit time are observed.
    #[test]
    fn decisions_and_batches_are_counted() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let mut tally = Tally::default();
            let issue = Issue { claim_id: "k".into(), code: "C".into(), expires_at: 1 };
            tally.add(&Decision::Issued { user_id: "u".into(), issue });
            let rejected = |reason| Decision::Rejected { user_id: "u".into(), claim_id: "k".into(), reason };
            tally.add(&rejected(RejectReason::SoldOut));
            tally.add(&rejected(RejectReason::SoldOut));
            tally.add(&rejected(RejectReason::AlreadyClaimed));
            tally.add(&Decision::Redeemed { user_id: "u".into(), code: "C".into(), order_id: "o".into() });
            let refused = Decision::Refused {
                user_id: "u".into(),
                code: "C".into(),
                order_id: "o".into(),
                reason: RefuseReason::AlreadyRedeemed,
            };
            tally.add(&refused);
            tally.add(&Decision::Defined);
            tally.record();
            batch_committed(4_000, Duration::from_millis(30));
        });
        let text = handle.render();
        for line in [
            r#"tidings_claims_decisions_total{outcome="issued"} 1"#,
            r#"tidings_claims_decisions_total{outcome="rejected",reason="sold_out"} 2"#,
            r#"tidings_claims_decisions_total{outcome="rejected",reason="already_claimed"} 1"#,
            r#"tidings_claims_decisions_total{outcome="redeemed"} 1"#,
            r#"tidings_claims_decisions_total{outcome="refused",reason="already_redeemed"} 1"#,
            r#"tidings_stage_batch_records_sum{stage="claims"} 4000"#,
            "tidings_claims_commit_seconds_count 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
        }
        assert!(!text.contains(r#"reason="not_open""#), "a reason nothing was rejected for: {text}");
    }

    /// A claim record that cannot be decided on is counted as the claim stage's dead letter by
    /// its reason.
    #[tokio::test(flavor = "current_thread")]
    async fn dead_letters_are_counted_by_reason() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let _local = metrics::set_default_local_recorder(&recorder);
        // Nothing listens there: the record waits in the producer's queue, counted when sent.
        let producer: FutureProducer =
            tidings_core::kafka::KafkaConfig::new("127.0.0.1:1").producer().create().unwrap();
        let dead = DeadLetters::new(producer, "t-dlq".into(), super::super::STAGE);
        let msg = OwnedMessage::new(Some(vec![1]), None, "t-claims".into(), Timestamp::now(), 0, 7, None);
        let _delivery = dead.send(&msg, "malformed", "bad bytes").await.unwrap();
        let text = handle.render();
        let line = r#"tidings_dead_letters_total{stage="claims",reason="malformed"} 1"#;
        assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
    }
}
