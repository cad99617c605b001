//! Which gateway owns which partition, learned through Kafka itself: each instance, when assigned
//! partitions, appends `partition → its URL` to a compacted one-partition owners topic, and every
//! instance reads that topic from the start. The log order decides: a new owner writes after the
//! group assigned it, which is after the previous owner gave the partition up.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tidings_core::kafka::KafkaConfig;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use tidings_core::stage::StageError;

/// One record of the owners topic; the key is `<notifications topic>/<partition>`, so compaction
/// keeps the latest owner of each partition.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OwnerRecord {
    pub topic: String,
    pub partition: i32,
    pub url: String,
    pub instance: String,
    pub at_ms: i64,
}

/// Where redirects may send a browser. The owners topic is writable by any Kafka client, so an
/// announced URL is only followed when it matches: entries are origins (`https://gw-1.example.com`,
/// `http://10.0.0.5:8080`; no port = any port) and may start the host with `*.` for any subdomain.
/// Empty: the host of this instance's own URL, any port.
#[derive(Debug, Clone, Default)]
pub struct RedirectAllow {
    entries: Vec<(String, String, Option<u16>)>,
}

impl RedirectAllow {
    /// Parses the entries, reporting every bad one.
    pub fn new<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        for e in entries.into_iter().map(str::trim).filter(|e| !e.is_empty()) {
            // `*.` is not a valid host for the URL parser: check the rest and put it back.
            let (wild, rest) = match e.split_once("://*.") {
                Some((scheme, rest)) => (true, format!("{scheme}://{rest}")),
                None => (false, e.to_string()),
            };
            match url::Url::parse(&rest) {
                Ok(u) if u.host_str().is_some() && matches!(u.scheme(), "http" | "https") && u.path() == "/" => {
                    let host = u.host_str().unwrap_or_default().to_ascii_lowercase();
                    let host = if wild { format!("*.{host}") } else { host };
                    ok.push((u.scheme().to_string(), host, u.port()));
                }
                _ => bad.push(format!("{e:?} is not an http(s) origin")),
            }
        }
        if bad.is_empty() {
            Ok(RedirectAllow { entries: ok })
        } else {
            Err(bad.join("; "))
        }
    }

    fn allows(&self, self_url: &str, target: &str) -> bool {
        let Ok(t) = url::Url::parse(target) else { return false };
        let host = t.host_str().unwrap_or_default().to_ascii_lowercase();
        if self.entries.is_empty() {
            let own = url::Url::parse(self_url).ok();
            return own
                .is_some_and(|o| o.scheme() == t.scheme() && o.host_str().map(str::to_ascii_lowercase) == Some(host));
        }
        self.matches(target)
    }

    /// The entries as CSP source expressions (`scheme://host[:port]`, `*.` kept).
    pub fn origins(&self) -> Vec<String> {
        self.entries
            .iter()
            .map(|(scheme, host, port)| match port {
                Some(p) => format!("{scheme}://{host}:{p}"),
                None => format!("{scheme}://{host}"),
            })
            .collect()
    }

    /// Whether `target` matches an entry (an empty list matches nothing).
    pub fn matches(&self, target: &str) -> bool {
        let Ok(t) = url::Url::parse(target) else { return false };
        let host = t.host_str().unwrap_or_default().to_ascii_lowercase();
        self.entries.iter().any(|(scheme, h, port)| {
            let host_ok = match h.strip_prefix("*.") {
                Some(suffix) => host.strip_suffix(suffix).is_some_and(|sub| sub.ends_with('.') && sub.len() > 1),
                None => *h == host,
            };
            scheme == t.scheme() && host_ok && port.is_none_or(|p| Some(p) == t.port_or_known_default())
        })
    }
}

/// The directory as this instance knows it.
#[derive(Debug)]
pub struct Owners {
    self_url: String,
    topic: String,
    map: RwLock<HashMap<i32, String>>,
    allow: RedirectAllow,
}

impl Owners {
    /// A directory for partitions of `topic`, as seen by the instance reachable at `self_url`,
    /// redirecting only to owners on `self_url`'s host.
    pub fn new(self_url: &str, topic: &str) -> Arc<Owners> {
        Self::with_allow(self_url, topic, RedirectAllow::default())
    }

    /// Like `new`, redirecting only to owners that `allow` lists.
    pub fn with_allow(self_url: &str, topic: &str, allow: RedirectAllow) -> Arc<Owners> {
        Arc::new(Owners {
            self_url: self_url.to_string(),
            topic: topic.to_string(),
            map: RwLock::new(HashMap::new()),
            allow,
        })
    }

    pub fn self_url(&self) -> &str {
        &self.self_url
    }

    /// The last announced owner of `partition`.
    pub fn owner(&self, partition: i32) -> Option<String> {
        self.map.read().expect("lock").get(&partition).cloned()
    }

    /// Whether a browser may be sent to `url` (see [`RedirectAllow`]).
    pub fn may_redirect_to(&self, url: &str) -> bool {
        self.allow.allows(&self.self_url, url)
    }

    /// Applies one record read from the owners topic (records of other topics are ignored).
    pub fn apply(&self, rec: &OwnerRecord) {
        if rec.topic == self.topic {
            self.map.write().expect("lock").insert(rec.partition, rec.url.clone());
        }
    }
}

/// Appends "this instance owns `partitions`" to the owners topic and waits for the broker's ack.
pub async fn announce(
    producer: &FutureProducer,
    owners_topic: &str,
    owners: &Owners,
    instance: &str,
    partitions: &[i32],
) -> Result<(), StageError> {
    for &partition in partitions {
        let rec = OwnerRecord {
            topic: owners.topic.clone(),
            partition,
            url: owners.self_url.clone(),
            instance: instance.to_string(),
            at_ms: chrono::Utc::now().timestamp_millis(),
        };
        let key = format!("{}/{}", rec.topic, partition);
        let value = serde_json::to_vec(&rec).expect("owner record serializes");
        producer
            .send(FutureRecord::to(owners_topic).key(&key).payload(&value).partition(0), Duration::from_secs(30))
            .await
            .map_err(|(e, _)| StageError::from(e))?;
        // Our own reader will see it too, but redirects from this instance should not wait for that.
        owners.apply(&rec);
    }
    info!(?partitions, "Announced ownership of {} partition(s) on {owners_topic}.", partitions.len());
    Ok(())
}

/// Reads the owners topic from the beginning and keeps `owners` current until `shutdown`.
pub async fn follow(
    kafka: &KafkaConfig,
    owners_topic: &str,
    owners: Arc<Owners>,
    shutdown: CancellationToken,
) -> Result<(), StageError> {
    // Assigned, not subscribed: every instance reads the whole topic, and nothing is committed.
    let cc = kafka.consumer_with(
        &format!("tidings-owners-reader-{}", uuid::Uuid::new_v4()),
        &[("auto.offset.reset", "earliest")],
        &[("enable.auto.commit", "false")],
    );
    let consumer: StreamConsumer = cc.create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(owners_topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = consumer.recv() => match m {
                Ok(m) => match m.payload().map(serde_json::from_slice::<OwnerRecord>) {
                    Some(Ok(rec)) => {
                        debug!(partition = rec.partition, url = %rec.url, "Owner announced.");
                        owners.apply(&rec);
                    }
                    Some(Err(e)) => warn!(error = %e, offset = m.offset(), "Ignoring a malformed owners record."),
                    None => {}
                },
                Err(e) => warn!(error = %e, "Owners topic consumer error; continuing."),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_records_win_and_other_topics_are_ignored() {
        let o = Owners::new("http://a", "n");
        let rec = |url: &str, topic: &str| OwnerRecord {
            topic: topic.into(),
            partition: 3,
            url: url.into(),
            instance: "i".into(),
            at_ms: 0,
        };
        o.apply(&rec("http://b", "n"));
        o.apply(&rec("http://c", "n"));
        o.apply(&rec("http://d", "other"));
        assert_eq!(o.owner(3).as_deref(), Some("http://c"));
        assert_eq!(o.owner(4), None);
    }

    #[test]
    fn redirects_follow_the_allow_list_or_stay_on_this_host() {
        let same_host = Owners::new("http://127.0.0.1:8080", "n");
        assert!(same_host.may_redirect_to("http://127.0.0.1:9999"));
        assert!(!same_host.may_redirect_to("http://evil.example:8080"));
        assert!(!same_host.may_redirect_to("https://127.0.0.1:8080"), "scheme differs");

        let allow = RedirectAllow::new(["https://*.gw.example.com", "http://10.0.0.5:8080"]).unwrap();
        let listed = Owners::with_allow("https://a.gw.example.com", "n", allow);
        assert!(listed.may_redirect_to("https://b.gw.example.com/"));
        assert!(!listed.may_redirect_to("https://gw.example.com.evil.net"));
        assert!(!listed.may_redirect_to("https://evilgw.example.com"));
        assert!(listed.may_redirect_to("http://10.0.0.5:8080"));
        assert!(!listed.may_redirect_to("http://10.0.0.5:8081"));
        assert!(!listed.may_redirect_to("javascript:alert(1)"));

        let err = RedirectAllow::new(["ftp://x", "not a url", "https://ok.example"]).unwrap_err();
        assert!(err.contains("ftp://x") && err.contains("not a url") && !err.contains("ok.example"), "{err}");
    }
}
