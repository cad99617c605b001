//! `tidings coupon verify`: re-reads the `coupon-claims` log and the decisions on `coupons` from
//! Kafka (every partition from its start to its current end, assigned, no group) and the claim
//! stage's tables, and checks every invariant of the claim stage, naming each violation's offsets.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Message};
use serde_json::Value as Json;
use std::sync::{Arc, Mutex};
use tidings_core::json_avro::{avro_to_json, union_branch_name};
use tidings_core::kafka::KafkaConfig;
use tidings_core::shutdown::StageHealth;
use tidings_core::stage::{self, OffsetRange, Processor, RangeSource, Source};
use tidings_core::RegistryClient;
use tidings_core::StageError;
use tidings_pipeline::stages::claims::{INPUT, OUTPUT};
use tidings_store::Store;
use tokio_util::sync::CancellationToken;

use crate::endpoints::database_url;
use crate::tools::{brokers, registry_url, topology_with_running_prefix};
use crate::Infra;

/// Longest wait for the next record while a partition is read up to its end.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a record is: partition and offset.
type At = (i32, i64);

/// One record of a topic, decoded: its coordinates, record timestamp (micros), branch and JSON.
struct Record {
    at: At,
    micros: Option<i64>,
    branch: String,
    event: Json,
}

/// What the claim log says of one coupon.
#[derive(Default)]
struct Log {
    /// The first definition: (stock, opens_at, closes_at) and its offset; later ones do not count.
    definition: Option<(i64, i64, i64, At)>,
    /// (user, claim id, record time, where) in log order.
    claims: Vec<(String, String, Option<i64>, At)>,
}

/// One decision event on `coupons`, the first time its id was read.
struct Decision {
    at: At,
    branch: String,
    payload: Json,
}

/// The claim stage's decisions of one coupon, by event id.
#[derive(Default)]
struct Decided {
    events: BTreeMap<String, Decision>,
}

/// Exit 0 when every invariant holds, 1 on a violation, 2 when the data could not be read.
pub async fn run(coupon: Option<&str>, infra: &Infra) -> anyhow::Result<ExitCode> {
    match verify(coupon, infra).await {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            Ok(ExitCode::from(2))
        }
    }
}

async fn verify(coupon: Option<&str>, infra: &Infra) -> anyhow::Result<ExitCode> {
    let topo = topology_with_running_prefix(infra)?;
    let kafka = infra.kafka(brokers(infra)?)?;
    let registry = RegistryClient::new(infra.registry(registry_url(infra)?)?)?;
    let (input, output) = (topo.topic_name(INPUT), topo.topic_name(OUTPUT));
    let mut violations: Vec<String> = Vec::new();

    let mut logs: BTreeMap<String, Log> = BTreeMap::new();
    let mut undecodable = 0u64;
    let (partitions, claim_records) = read_topic(&kafka, &registry, &input).await?;
    for r in claim_records {
        let Ok(r) = r else {
            // The stage dead-letters these; they are no claim.
            undecodable += 1;
            continue;
        };
        let id = r.event["coupon_id"].as_str().unwrap_or_default().to_string();
        if coupon.is_some_and(|c| c != id) {
            continue;
        }
        let log = logs.entry(id).or_default();
        let p = &r.event["payload"];
        match r.branch.as_str() {
            "CouponDefined" if log.definition.is_none() => {
                let int = |f: &str| p[f].as_i64().unwrap_or_default();
                log.definition = Some((int("stock"), int("claim_opens_at"), int("claim_closes_at"), r.at));
            }
            "ClaimRequested" => {
                let s = |f: &str| p[f].as_str().unwrap_or_default().to_string();
                log.claims.push((s("user_id"), s("claim_id"), r.micros, r.at));
            }
            _ => {}
        }
    }

    let mut decided: BTreeMap<String, Decided> = BTreeMap::new();
    let (_, decision_records) = read_topic(&kafka, &registry, &output).await?;
    for r in decision_records.into_iter().flatten() {
        if !matches!(r.branch.as_str(), "CouponIssued" | "ClaimRejected" | "RedemptionAccepted" | "RedemptionRefused") {
            continue;
        }
        // CouponIssued without a claim id was issued by something else than the claim stage.
        if r.branch == "CouponIssued" && r.event["payload"]["claim_id"].is_null() {
            continue;
        }
        let id = r.event["coupon_id"].as_str().unwrap_or_default().to_string();
        if coupon.is_some_and(|c| c != id) {
            continue;
        }
        let event_id = r.event["event_id"].as_str().unwrap_or_default().to_string();
        let d = Decision { at: r.at, branch: r.branch, payload: r.event["payload"].clone() };
        let events = &mut decided.entry(id).or_default().events;
        match events.get(&event_id) {
            // The same decision produced again (a replay): downstream dedupes it by id.
            Some(first) if first.branch == d.branch && first.payload == d.payload => {}
            Some(first) => violations.push(format!(
                "event {event_id} at {output} {} differs from the one with its id at {}",
                show(d.at),
                show(first.at)
            )),
            None => {
                events.insert(event_id, d);
            }
        }
    }

    let store = Store::connect(&database_url(infra)).await?;
    let mut holders: BTreeMap<String, Vec<tidings_store::claims::HolderRow>> = BTreeMap::new();
    let mut redemptions: BTreeMap<String, Vec<tidings_store::claims::RedemptionRow>> = BTreeMap::new();
    for p in 0..partitions {
        let rows = store.load_claim_rows(p).await.context("reading the claim stage's tables")?;
        for h in rows.holders.into_iter().filter(|h| coupon.is_none_or(|c| c == h.coupon_id)) {
            holders.entry(h.coupon_id.clone()).or_default().push(h);
        }
        for r in rows.redemptions.into_iter().filter(|r| coupon.is_none_or(|c| c == r.coupon_id)) {
            redemptions.entry(r.coupon_id.clone()).or_default().push(r);
        }
    }

    let ids: BTreeSet<&String> = logs.keys().chain(decided.keys()).chain(holders.keys()).collect();
    println!("Checked {input} ({partitions} partitions, {undecodable} undecodable record(s) skipped), {output} and the store:");
    let (empty_log, empty_decided) = (Log::default(), Decided::default());
    for id in ids {
        let log = logs.get(id).unwrap_or(&empty_log);
        let dec = decided.get(id).unwrap_or(&empty_decided);
        let held = holders.get(id).map(Vec::as_slice).unwrap_or_default();
        let redeemed = redemptions.get(id).map(Vec::as_slice).unwrap_or_default();
        check_coupon(id, log, dec, held, redeemed, (&input, &output), &mut violations);
    }
    if coupon.is_some_and(|c| !logs.contains_key(c)) {
        println!("  (no record of coupon {:?} on {input})", coupon.unwrap_or_default());
    }
    if violations.is_empty() {
        println!("All invariants hold.");
        return Ok(ExitCode::SUCCESS);
    }
    println!("{} violation(s):", violations.len());
    for v in &violations {
        println!("  VIOLATION: {v}");
    }
    Ok(ExitCode::from(1))
}

fn show(at: At) -> String {
    format!("partition {} offset {}", at.0, at.1)
}

/// Every invariant for one coupon; prints its counts and pushes its violations.
fn check_coupon(
    id: &str,
    log: &Log,
    dec: &Decided,
    held: &[tidings_store::claims::HolderRow],
    redeemed: &[tidings_store::claims::RedemptionRow],
    (input, output): (&str, &str),
    out: &mut Vec<String>,
) {
    let mut v = |s: String| out.push(format!("coupon {id}: {s}"));
    let s = |p: &Json, f: &str| p[f].as_str().unwrap_or_default().to_string();

    // Claims: one per (user, claim id), at its first record.
    let mut claims: BTreeMap<(String, String), At> = BTreeMap::new();
    for (user, claim, _, at) in &log.claims {
        claims.entry((user.clone(), claim.clone())).or_insert(*at);
    }
    // The first eligible claimants in log order: after the definition, inside its window.
    let stock = log.definition.map_or(0, |d| d.0.max(0)) as usize;
    let mut eligible: Vec<(&str, At)> = Vec::new();
    if let Some((_, opens, closes, def_at)) = log.definition {
        for (user, _, micros, at) in &log.claims {
            let inside = micros.is_some_and(|t| t >= opens && t < closes);
            if at.0 == def_at.0 && at.1 > def_at.1 && inside && !eligible.iter().any(|(u, _)| u == user) {
                eligible.push((user, *at));
            }
        }
    }
    let expected: BTreeMap<&str, At> = eligible.iter().take(stock).copied().collect();

    // Decisions of claims, by claim; issues by user; accepted redemptions by code.
    let mut by_claim: BTreeMap<(String, String), Vec<At>> = BTreeMap::new();
    let mut issued: BTreeMap<String, Vec<(At, String)>> = BTreeMap::new();
    let mut accepted: BTreeMap<String, Vec<(At, String)>> = BTreeMap::new();
    let mut rejected = 0usize;
    for d in dec.events.values() {
        let p = &d.payload;
        match d.branch.as_str() {
            "CouponIssued" | "ClaimRejected" => {
                by_claim.entry((s(p, "user_id"), s(p, "claim_id"))).or_default().push(d.at);
                if d.branch == "CouponIssued" {
                    issued.entry(s(p, "user_id")).or_default().push((d.at, s(p, "code")));
                } else {
                    rejected += 1;
                }
            }
            "RedemptionAccepted" => accepted.entry(s(p, "code")).or_default().push((d.at, s(p, "order_id"))),
            _ => {}
        }
    }
    let issues: usize = issued.values().map(Vec::len).sum();
    println!(
        "  coupon {id}: stock {stock}{}, {} claim(s) ({} distinct, {} eligible claimant(s)), {issues} issued, \
         {rejected} rejected, {} redeemed; store: {} holder(s), {} redemption(s)",
        if log.definition.is_none() { " (no definition on the log)" } else { "" },
        log.claims.len(),
        claims.len(),
        eligible.len(),
        accepted.len(),
        held.len(),
        redeemed.len()
    );

    // Every claim exactly one decision (copies with the same event id are one), and none of no claim.
    for (claim, at) in &claims {
        match by_claim.get(claim).map(Vec::as_slice).unwrap_or_default() {
            [] => v(format!("claim {claim:?} at {input} {} has no decision on {output}", show(*at))),
            [_] => {}
            many => v(format!(
                "claim {claim:?} at {input} {} has {} decisions, at {output} {}",
                show(*at),
                many.len(),
                many.iter().map(|a| show(*a)).collect::<Vec<_>>().join(", ")
            )),
        }
    }
    for (claim, ats) in by_claim.iter().filter(|(c, _)| !claims.contains_key(*c)) {
        v(format!("a decision at {output} {} decides claim {claim:?}, which is not on {input}", show(ats[0])));
    }
    // Never one user twice.
    for (user, issues) in issued.iter().filter(|(_, i)| i.len() > 1) {
        let ats: Vec<String> = issues.iter().map(|(a, _)| show(*a)).collect();
        v(format!("user {user:?} was issued {} coupons, at {output} {}", issues.len(), ats.join(", ")));
    }
    // Never more than stock; issued = min(stock, distinct eligible claimants).
    if issued.len() > stock {
        v(format!("{} users were issued a coupon, more than its stock {stock}", issued.len()));
    }
    if issued.len() != expected.len() {
        v(format!(
            "{} users were issued a coupon; min(stock {stock}, {} eligible claimants) is {}",
            issued.len(),
            eligible.len(),
            expected.len()
        ));
    }
    // Issued exactly to the first eligible claimants in log order.
    for (user, at) in expected.iter().filter(|(u, _)| !issued.contains_key(**u)) {
        v(format!(
            "user {user:?} is among the first {stock} eligible claimants (at {input} {}) but was issued none",
            show(*at)
        ));
    }
    for (user, issues) in issued.iter().filter(|(u, _)| !expected.contains_key(u.as_str())) {
        v(format!(
            "user {user:?} was issued a coupon at {output} {} but is not among the first {stock} eligible claimants",
            show(issues[0].0)
        ));
    }
    // Every issued code redeemed at most once, and only issued codes.
    let codes: BTreeSet<&str> = issued.values().flatten().map(|(_, c)| c.as_str()).collect();
    for (code, orders) in &accepted {
        let distinct: BTreeSet<&str> = orders.iter().map(|(_, o)| o.as_str()).collect();
        if distinct.len() > 1 {
            let ats: Vec<String> =
                orders.iter().map(|(a, o)| format!("order {o:?} at {output} {}", show(*a))).collect();
            v(format!("code {code} was redeemed {} times: {}", distinct.len(), ats.join(", ")));
        }
        if !codes.contains(code.as_str()) {
            v(format!("code {code} was redeemed at {output} {} but never issued", show(orders[0].0)));
        }
    }
    // The store holds what the log decided: committed holders are a subset of the issued (the
    // store may lag the events, never lead them), within stock; its redemptions of held codes.
    if held.len() > stock {
        v(format!("the store holds {} holders (coupon_holders), more than its stock {stock}", held.len()));
    }
    for h in held {
        let on_log = issued.get(&h.user_id).is_some_and(|i| i.iter().any(|(_, c)| *c == h.code));
        if !on_log {
            v(format!(
                "the store holds user {:?} (claim {:?}, code {}) in coupon_holders, but no CouponIssued on {output} says so",
                h.user_id, h.claim_id, h.code
            ));
        }
    }
    for r in redeemed {
        if !held.iter().any(|h| h.code == r.code) {
            v(format!("the store redeemed code {} (order {:?}), which no holder holds", r.code, r.order_id));
        }
    }
}

/// Every record of `topic` from each partition's start to its end as of now, decoded with the
/// latest registered schema (`Err` for a record that does not decode); and the partition count.
/// Read by the stage skeleton over a range source, as a replay is: no group is joined or committed
/// to, and a partition whose last offsets are control records still ends.
async fn read_topic(
    kafka: &KafkaConfig,
    registry: &RegistryClient,
    topic: &str,
) -> anyhow::Result<(i32, Vec<Result<Record, String>>)> {
    let (_, reader) =
        registry.latest(&format!("{topic}-value")).await.with_context(|| format!("the schema of {topic}"))?;
    let probe: BaseConsumer = kafka.consumer_with("tidings-coupon-verify", &[], &[]).create()?;
    let partitions = tidings_core::kafka::partition_count(probe.client(), topic, READ_TIMEOUT)?;
    anyhow::ensure!(partitions > 0, "topic {topic} does not exist");
    let mut ranges = Vec::new();
    for p in 0..partitions {
        let (low, high) = probe.fetch_watermarks(topic, p, READ_TIMEOUT)?;
        ranges.push(OffsetRange::new(topic, p, low, high));
    }
    let out = Arc::new(Mutex::new(Vec::new()));
    let (health, shutdown) = (StageHealth::default(), CancellationToken::new());
    let run = stage::run("coupon-verify", &health, &shutdown, || {
        out.lock().expect("lock").clear(); // a retried attempt reads its ranges again
        let source = RangeSource::new(kafka, ranges.clone()).map_err(StageError::from);
        let collect = Collect { registry: registry.clone(), reader, out: out.clone() };
        async move { Ok((collect, Source::Ranges(source?))) }
    });
    tokio::time::timeout(READ_TIMEOUT, run)
        .await
        .with_context(|| format!("{topic} was not read to its end within {READ_TIMEOUT:?}"))??;
    let out = std::mem::take(&mut *out.lock().expect("lock"));
    Ok((partitions, out))
}

/// Decodes each record of the ranges into `out`.
struct Collect {
    registry: RegistryClient,
    reader: &'static apache_avro::Schema,
    out: Arc<Mutex<Vec<Result<Record, String>>>>,
}

impl Processor for Collect {
    type Due = ();

    async fn process(&mut self, m: &BorrowedMessage<'_>) -> Result<(), StageError> {
        let micros = m.timestamp().to_millis().map(|ms| ms.saturating_mul(1000));
        let decoded = match m.payload() {
            Some(bytes) => self.registry.decode(bytes, self.reader).await.map_err(|e| e.to_string()),
            None => Err("no value".to_string()),
        };
        let record = decoded.and_then(|value| {
            let branch = union_branch_name(self.reader, &value, "payload").ok_or("no payload branch")?.to_string();
            Ok(Record { at: (m.partition(), m.offset()), micros, branch, event: avro_to_json(&value) })
        });
        self.out.lock().expect("lock").push(record);
        Ok(())
    }

    fn due(&mut self) -> impl std::future::Future<Output = ()> + Send {
        std::future::pending()
    }

    async fn on_due(&mut self, _: ()) -> Result<(), StageError> {
        Ok(())
    }

    async fn finish(self, ended: Result<(), StageError>) -> Result<(), StageError> {
        ended
    }
}
