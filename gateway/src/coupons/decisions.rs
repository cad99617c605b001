//! The gateway's own reader of the claim stage's decisions on `coupons`: every partition assigned
//! (no group, nothing committed) from its end at start, each decision handed to the requests
//! waiting for it. Decisions made before the start have no waiter here; nothing needs them.

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tidings_core::json_avro::{avro_to_json, union_branch_name};
use tidings_core::kafka::KafkaConfig;
use tidings_core::stage::{StageError, System};
use tidings_core::{RegistryClient, RegistryError};
use tokio_util::sync::CancellationToken;

use super::waiters::{Outcome, WaitKey, Waiters};

/// How long the partition count and the ends of `coupons` may take to read at start.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the reader could not start.
#[derive(Debug, thiserror::Error)]
pub enum DecisionsError {
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("the schema of {0}: {1}")]
    Registry(String, RegistryError),
    #[error("topic {0} does not exist")]
    NoTopic(String),
    #[error("reading the ends of the partitions failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl DecisionsError {
    /// Whether starting again may succeed: a Kafka error the stages would retry (a leader moving
    /// while fresh topics settle, a broker restarting), a registry that is unreachable or
    /// throttling, a subject no one has registered yet (the claim stage registers it), or a topic
    /// this client's metadata does not show yet (`up` checked or created it just before, and a
    /// fresh client's first metadata may predate that, as the stages' "no partitions" is retried).
    pub fn is_retriable(&self) -> bool {
        match self {
            DecisionsError::Kafka(e) => StageError::kafka(System::Kafka, e.clone()).is_retriable(),
            DecisionsError::Registry(_, e) => e.is_retriable() || matches!(e, RegistryError::UnknownSubject(_)),
            DecisionsError::NoTopic(_) => true,
            DecisionsError::Join(_) => false,
        }
    }
}

/// Where decisions are read from.
#[derive(Clone)]
pub struct DecisionSource {
    pub kafka: KafkaConfig,
    pub registry: RegistryClient,
    /// Physical `coupons` topic.
    pub topic: String,
    /// A group id librdkafka requires of a consumer; it never joins nor commits.
    pub group: String,
}

/// A started reader: assigned at the partitions' ends, so every decision produced from now on
/// is read. [`DecisionReader::run`] reads until `shutdown`.
pub struct DecisionReader {
    consumer: StreamConsumer,
    registry: RegistryClient,
    reader: &'static apache_avro::Schema,
    waiters: Arc<Waiters>,
}

impl DecisionSource {
    /// Assigns every partition of the topic at its current end.
    pub async fn start(self, waiters: Arc<Waiters>) -> Result<DecisionReader, DecisionsError> {
        let subject = format!("{}-value", self.topic);
        let (_, reader) = self.registry.latest(&subject).await.map_err(|e| DecisionsError::Registry(subject, e))?;
        let consumer: StreamConsumer = self
            .kafka
            .consumer_with(&self.group, &[("fetch.wait.max.ms", "10")], &[("enable.auto.commit", "false")])
            .create()?;
        let topic = self.topic.clone();
        // The ends are read before anything is assigned: a decision produced after this point
        // is at or past them, so none produced once requests wait can be skipped.
        let (consumer, tpl) = tokio::task::spawn_blocking(move || {
            let n = tidings_core::kafka::partition_count(consumer.client(), &topic, METADATA_TIMEOUT)?;
            if n == 0 {
                return Err(DecisionsError::NoTopic(topic));
            }
            let mut tpl = TopicPartitionList::new();
            for p in 0..n {
                let (_, high) = consumer.fetch_watermarks(&topic, p, METADATA_TIMEOUT)?;
                tpl.add_partition_offset(&topic, p, Offset::Offset(high))?;
            }
            Ok((consumer, tpl))
        })
        .await??;
        consumer.assign(&tpl)?;
        Ok(DecisionReader { consumer, registry: self.registry, reader, waiters })
    }
}

impl DecisionReader {
    /// Reads decisions and completes their waiters until `shutdown`. A record that does not
    /// decode is skipped (it decides nothing a waiter could use); a read error is retried.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), DecisionsError> {
        loop {
            let m = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                m = self.consumer.recv() => m,
            };
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "Reading coupon decisions failed; retrying in 1 s.");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let Some(bytes) = m.payload() else { continue };
            let value = match self.registry.decode(bytes, self.reader).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, partition = m.partition(), offset = m.offset(),
                        "A record on the coupons topic does not decode; no waiter is answered by it.");
                    continue;
                }
            };
            let Some(branch) = union_branch_name(self.reader, &value, "payload") else { continue };
            if let Some((key, outcome)) = decision(branch, &avro_to_json(&value)) {
                self.waiters.complete(&key, &outcome);
            }
        }
    }
}

/// The waiter key and outcome of a `coupons` event; `None` for events that decide no request
/// (campaigns, expiry notices, coupons issued without a claim).
pub fn decision(branch: &str, event: &Value) -> Option<(WaitKey, Outcome)> {
    let coupon = event.get("coupon_id")?.as_str()?.to_string();
    let p = event.get("payload")?;
    let s = |f: &str| p.get(f).and_then(Value::as_str).map(str::to_string);
    let claim = || Some(WaitKey::Claim { coupon: coupon.clone(), user: s("user_id")?, claim: s("claim_id")? });
    let redemption = || Some(WaitKey::Redemption { coupon: coupon.clone(), code: s("code")?, order: s("order_id")? });
    match branch {
        "CouponIssued" => {
            Some((claim()?, Outcome::Issued { code: s("code")?, expires_at: p.get("expires_at")?.as_i64()? }))
        }
        "ClaimRejected" => Some((claim()?, Outcome::Rejected { reason: s("reason")? })),
        "RedemptionAccepted" => Some((redemption()?, Outcome::Redeemed)),
        "RedemptionRefused" => Some((redemption()?, Outcome::Refused { reason: s("reason")? })),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(payload: Value) -> Value {
        json!({"event_id": "e", "occurred_at": 1, "coupon_id": "c", "payload": payload})
    }

    #[test]
    fn each_decision_names_its_request() {
        let issued =
            event(json!({"user_id": "u", "code": "C", "discount_percent": 5, "expires_at": 9, "claim_id": "k"}));
        let claim = WaitKey::Claim { coupon: "c".into(), user: "u".into(), claim: "k".into() };
        assert_eq!(
            decision("CouponIssued", &issued),
            Some((claim.clone(), Outcome::Issued { code: "C".into(), expires_at: 9 }))
        );
        let rejected = event(json!({"user_id": "u", "claim_id": "k", "reason": "sold_out"}));
        assert_eq!(
            decision("ClaimRejected", &rejected),
            Some((claim, Outcome::Rejected { reason: "sold_out".into() }))
        );
        let redemption = WaitKey::Redemption { coupon: "c".into(), code: "C".into(), order: "o".into() };
        let accepted = event(json!({"user_id": "u", "code": "C", "order_id": "o"}));
        assert_eq!(decision("RedemptionAccepted", &accepted), Some((redemption.clone(), Outcome::Redeemed)));
        let refused = event(json!({"user_id": "u", "code": "C", "order_id": "o", "reason": "already_redeemed"}));
        assert_eq!(
            decision("RedemptionRefused", &refused),
            Some((redemption, Outcome::Refused { reason: "already_redeemed".into() }))
        );
        let not_a_claim = event(json!({"user_id": "u", "code": "C", "discount_percent": 5, "expires_at": 9,
            "claim_id": null}));
        assert_eq!(decision("CouponIssued", &not_a_claim), None, "issued without a claim");
        assert_eq!(decision("CampaignLaunched", &event(json!({}))), None);
    }

    /// A start that fails while fresh topics settle is tried again, a topic not yet in the
    /// metadata too; a bad schema or bad settings are not.
    #[test]
    fn only_passing_failures_restart_the_reader() {
        use rdkafka::types::RDKafkaErrorCode;
        let moving = KafkaError::MetadataFetch(RDKafkaErrorCode::NotLeaderForPartition);
        assert!(DecisionsError::Kafka(moving).is_retriable());
        let unregistered = RegistryError::UnknownSubject("coupons-value".into());
        assert!(DecisionsError::Registry("coupons-value".into(), unregistered).is_retriable());
        let invalid = RegistryError::InvalidSchema("coupons-value".into(), "bad".into());
        assert!(!DecisionsError::Registry("coupons-value".into(), invalid).is_retriable());
        assert!(DecisionsError::NoTopic("coupons".into()).is_retriable());
        let config = KafkaError::ClientCreation("bad settings".into());
        assert!(!DecisionsError::Kafka(config).is_retriable());
    }
}
