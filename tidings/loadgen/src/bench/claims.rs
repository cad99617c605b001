//! The claim benchmark on Apache Kafka and PostgreSQL. `claims_decide`: a log of claims on one
//! hot coupon is produced straight to `coupon-claims` first (precomputed Avro), then `tidings up
//! --stages claims` starts and decides it; decisions/s until the stored next offset reaches the
//! log's end, CPU per decision, and the counts checked on `coupons` and in the store.
//! `claims_hot_row`: the conventional design on the same PostgreSQL over (a prefix of) the same
//! claims: one transaction per claim, a conditional `UPDATE` of the hot row plus a unique insert.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use tidings_core::avro_binary::{put_long, put_string, Datum};
use tidings_core::json_avro::{avro_to_json, union_branch_name};
use tidings_core::kafka::KafkaConfig;
use tidings_core::RegistryClient;
use tidings_loadgen::percentiles;

use super::cpu::{proc_ticks, CpuWindow};
use super::{now_micros, up_args, Proc};

/// The hot coupon every claim names.
const COUPON: &str = "bench-hot-drop";

/// The claim scenarios' settings (flags of `bench`).
#[derive(Debug, Clone)]
pub struct ClaimOpts {
    /// Claims in the log (claims_decide).
    pub claims: usize,
    /// Distinct users making them.
    pub users: usize,
    /// The coupon's stock (claims_decide).
    pub stock: usize,
    /// Claims of the log's start the hot-row design decides (its stock scaled in proportion).
    pub hot_row_claims: usize,
    /// Concurrent connections of the hot-row design.
    pub hot_row_connections: u32,
}

/// Claim `k` of the log: (user, claim id). Users come in a fixed scattered order, every user
/// once per `users` claims (so the first `users` claims are all first claims); in later rounds a
/// fifth of the claims repeat the user's previous idempotency key (a retry), the rest use a new
/// one (a second try, rejected `already_claimed` or `sold_out`).
fn claim(k: usize, users: usize) -> (String, String) {
    // 7,919 is prime and no factor of the user counts used, so k ↦ user is a permutation per round.
    let u = (k.wrapping_mul(7_919)) % users;
    let round = k / users;
    let key_round = if round > 0 && k.is_multiple_of(5) { round - 1 } else { round };
    (format!("user-{u:07}"), format!("claim-{u:07}-{key_round}"))
}

/// A new empty database on the test server (`TIDINGS_TEST_PG`), left for `tidings up` to migrate
/// (so a `tidings` binary of another commit, with other migrations, runs on it too): a small pool
/// on it and its URL.
pub(super) async fn fresh_database(connections: u32) -> anyhow::Result<(sqlx::PgPool, String)> {
    use sqlx::Connection;
    let admin = tidings_store::testing::admin_url();
    let name = format!("tidings_bench_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&admin).await?;
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await?;
    conn.close().await?;
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    let url = format!("{base}/{name}");
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(connections).connect(&url).await?;
    Ok((pool, url))
}

/// Drops a database [`fresh_database`] made (best effort: a leftover only takes disk).
pub(super) async fn drop_database(pool: sqlx::PgPool, url: &str) {
    use sqlx::Connection;
    pool.close().await;
    let Some((_, name)) = url.rsplit_once('/') else { return };
    if let Ok(mut conn) = sqlx::PgConnection::connect(&tidings_store::testing::admin_url()).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut conn).await;
    }
}

/// `e` with the last lines of `proc`'s log (its work directory goes when the benchmark ends).
pub(super) fn with_log(e: anyhow::Error, proc: &Proc) -> anyhow::Error {
    let log = std::fs::read_to_string(proc.dir.join("log")).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(8).collect();
    anyhow::anyhow!("{e:#}: {}", tail.into_iter().rev().collect::<Vec<_>>().join(" | "))
}

/// claims_decide's log of claims, (user, claim id) in log order.
pub fn log(o: &ClaimOpts) -> Vec<(String, String)> {
    (0..o.claims).map(|k| claim(k, o.users)).collect()
}

/// A framed `coupon-claims` record (schemas/coupon_claim.avsc, field order) with `payload`'s
/// union branch `branch` and its fields already encoded.
fn claim_record(schema_id: u32, event_id: &str, branch: i64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + payload.len());
    out.push(0);
    out.extend_from_slice(&schema_id.to_be_bytes());
    put_string(event_id, &mut out);
    put_long(now_micros(), &mut out);
    put_string(COUPON, &mut out);
    put_long(0, &mut out); // locale: null
    put_long(branch, &mut out);
    out.extend_from_slice(payload);
    out
}

fn definition(schema_id: u32, stock: usize) -> Vec<u8> {
    let mut p = Vec::new();
    put_string("Bench drop", &mut p);
    put_long(20, &mut p); // discount_percent
    put_long(stock as i64, &mut p);
    put_long(0, &mut p); // claim_opens_at
    put_long(i64::MAX / 2, &mut p); // claim_closes_at
    put_long(86_400_000_000, &mut p); // valid_for_micros
    put_long(1, &mut p); // per_user_limit
    claim_record(schema_id, "bench-definition", 0, &p)
}

fn claim_requested(schema_id: u32, k: usize, user: &str, claim_id: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(48);
    put_string(claim_id, &mut p);
    put_string(user, &mut p);
    claim_record(schema_id, &format!("bench-claim-{k}"), 1, &p)
}

/// Delivery reports of the lean producer: (acknowledged, failed).
#[derive(Default)]
struct Reports(Mutex<(usize, usize)>);

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let mut r = self.0.lock().unwrap();
        match result {
            Ok(_) => r.0 += 1,
            Err(_) => r.1 += 1,
        }
    }
}

/// Produces `records` (framed, keyed by the coupon) as fast as librdkafka takes them:
/// idempotent, acks=all, 5 ms linger, lz4-free; answers the produce's figures.
fn produce_all(brokers: &str, topic: &str, records: &[Vec<u8>]) -> anyhow::Result<Value> {
    let producer: ThreadedProducer<Reports> = KafkaConfig::new(brokers)
        .producer_with(&[("linger.ms", "5")])
        .set("queue.buffering.max.messages", "1000000")
        .set("batch.num.messages", "10000")
        .create_with_context(Reports::default())?;
    let (t, ticks) = (Instant::now(), proc_ticks(None));
    for r in records {
        loop {
            match producer.send(BaseRecord::to(topic).key(COUPON).payload(r)) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => bail!("producing a claim: {e}"),
            }
        }
    }
    producer.flush(Duration::from_secs(120))?;
    let secs = t.elapsed().as_secs_f64();
    let cpu = (proc_ticks(None) - ticks) as f64 / 100.0;
    let (acked, failed) = *producer.context().0.lock().unwrap();
    ensure!(acked == records.len() && failed == 0, "{acked} of {} claims acknowledged, {failed} failed", records.len());
    Ok(json!({
        "records": records.len(), "secs": secs, "per_sec": (records.len() as f64 / secs).round(),
        "client_cpu_secs": cpu, "client_cpu_us_per_record": (cpu * 1e6 / records.len() as f64).round(),
        "note": "precomputed Avro (Confluent wire format) produced by one idempotent librdkafka producer, acks=all, linger.ms=5; CPU of this process over the produce",
    }))
}

/// The partition of `topic` holding records, and its end offset (the log was produced to one).
fn partition_end(brokers: &str, topic: &str) -> anyhow::Result<(i32, i64)> {
    let c: BaseConsumer = KafkaConfig::new(brokers).consumer_with("bench-claims-watermarks", &[], &[]).create()?;
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let n = md.topics().first().map_or(0, |t| t.partitions().len()) as i32;
    for p in 0..n {
        let (_, high) = c.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        if high > 0 {
            return Ok((p, high));
        }
    }
    bail!("no records on {topic}")
}

/// One decision read back from `coupons`.
struct Decided {
    event_id: String,
    user_id: String,
    claim_id: String,
    issued: bool,
}

/// A CouponIssued or ClaimRejected decision (schemas/coupon_event.avsc, the few fields checked);
/// `None` for anything else.
fn decision(bytes: &[u8]) -> Option<Decided> {
    let mut d = Datum::new(bytes.get(5..)?);
    let event_id = d.string().ok()?.to_string();
    d.long().ok()?;
    d.string().ok()?;
    d.optional_string().ok()?;
    match d.long().ok()? {
        0 => {
            let user_id = d.string().ok()?.to_string();
            d.string().ok()?;
            d.long().ok()?;
            d.long().ok()?;
            let claim_id = d.optional_string().ok()?.unwrap_or_default().to_string();
            Some(Decided { event_id, user_id, claim_id, issued: true })
        }
        3 => {
            let user_id = d.string().ok()?.to_string();
            let claim_id = d.string().ok()?.to_string();
            Some(Decided { event_id, user_id, claim_id, issued: false })
        }
        _ => None,
    }
}
/// Reads every decision on `coupons` for the hot coupon and checks them against the log.
async fn check_decisions(
    brokers: &str,
    registry: &RegistryClient,
    topic: &str,
    log: &[(String, String)],
    stock: usize,
) -> anyhow::Result<Value> {
    let (p, end) = partition_end(brokers, topic)?;
    let c: BaseConsumer = KafkaConfig::new(brokers).consumer_with("bench-claims-check", &[], &[]).create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    c.assign(&tpl)?;
    let (_, reader) = registry.latest(&format!("{topic}-value")).await?;
    let mut decisions = Vec::with_capacity(log.len());
    let mut first_checked = false;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut next = 0;
    while next < end {
        ensure!(Instant::now() < deadline, "read {next} of {end} decisions");
        let Some(m) = c.poll(Duration::from_millis(500)) else { continue };
        let m = m?;
        next = m.offset() + 1;
        let bytes = m.payload().unwrap_or_default();
        let d = decision(bytes).with_context(|| format!("decision at offset {} does not decode", m.offset()))?;
        if !first_checked {
            // The lean reader agrees with the schema's own decoding on the first decision.
            let value = registry.decode(bytes, reader).await?;
            let branch = if d.issued { "CouponIssued" } else { "ClaimRejected" };
            let v = avro_to_json(&value);
            let p = &v["payload"];
            ensure!(
                union_branch_name(reader, &value, "payload") == Some(branch)
                    && v["event_id"] == json!(d.event_id)
                    && p["user_id"] == json!(d.user_id)
                    && p["claim_id"] == json!(d.claim_id),
                "the lean decision reader disagrees with the schema's decoding: {v}"
            );
            first_checked = true;
        }
        decisions.push(d);
    }
    let claims: HashSet<(&str, &str)> = log.iter().map(|(u, k)| (u.as_str(), k.as_str())).collect();
    let mut by_event: HashMap<&str, (&str, &str, bool)> = HashMap::new();
    let mut conflicting = 0;
    for d in &decisions {
        let this = (d.user_id.as_str(), d.claim_id.as_str(), d.issued);
        if *by_event.entry(d.event_id.as_str()).or_insert(this) != this {
            conflicting += 1;
        }
    }
    let decided: HashSet<(&str, &str)> = by_event.values().map(|(u, k, _)| (*u, *k)).collect();
    let mut issued_users: HashMap<&str, usize> = HashMap::new();
    for (u, _, issued) in by_event.values() {
        if *issued {
            *issued_users.entry(u).or_default() += 1;
        }
    }
    let issued = issued_users.values().sum::<usize>();
    let twice = issued_users.values().filter(|n| **n > 1).count();
    let v = json!({
        "records": decisions.len(), "claims": log.len(), "distinct_claims": claims.len(),
        "distinct_decisions": by_event.len(), "issued": issued, "rejected": by_event.len() - issued,
        "users_issued_twice": twice, "conflicting_decisions": conflicting,
        "undecided_claims": claims.difference(&decided).count(),
    });
    ensure!(
        decisions.len() == log.len()
            && by_event.len() == claims.len()
            && decided == claims
            && issued == stock
            && twice == 0
            && conflicting == 0,
        "the decisions on {topic} break an invariant: {v}"
    );
    Ok(v)
}

/// claims_decide: the log produced first, then decided by a fresh `tidings up --stages claims`.
/// Answers its line and the log (for the hot-row design).
pub async fn decide(
    bin: &Path,
    root: &Path,
    topology: &Path,
    brokers: &str,
    prefix: &str,
    o: &ClaimOpts,
) -> anyhow::Result<(Value, Vec<(String, String)>)> {
    ensure!(o.users > 0 && o.claims >= o.users && o.stock > 0, "claims ≥ users > 0 and stock > 0");
    let (pool, db) = fresh_database(2).await.context("a fresh PostgreSQL database")?;
    let pool = &pool;
    let input = format!("{prefix}coupon-claims");
    let output = format!("{prefix}coupons");

    // Topics and schemas first (an ingest-only process, stopped before the claims are decided:
    // the embedded registry keeps its schemas in the store, so the stage's process serves the same ids).
    let mut setup =
        Proc::spawn(bin, "claims-setup", root, &up_args(Some(brokers), Some(prefix), topology, &db, "ingest"), &[])?;
    let ep = setup.endpoints().await.map_err(|e| with_log(e, &setup))?;
    let registry = RegistryClient::new(ep["schema_registry_url"].as_str().unwrap_or_default())?;
    let (schema_id, reader) = registry.latest(&format!("{input}-value")).await.context("the coupon-claims schema")?;
    // The precomputed layout is the schema's: a claim decodes through it to what was encoded.
    let probe = avro_to_json(&registry.decode(&claim_requested(schema_id, 0, "u", "k"), reader).await?);
    ensure!(
        probe["coupon_id"] == json!(COUPON) && probe["payload"] == json!({"claim_id": "k", "user_id": "u"}),
        "a precomputed claim decodes as {probe}"
    );
    setup.shutdown().await;

    let t = Instant::now();
    let log = log(o);
    let mut records = Vec::with_capacity(o.claims + 1);
    records.push(definition(schema_id, o.stock));
    records.extend(log.iter().enumerate().map(|(k, (u, c))| claim_requested(schema_id, k, u, c)));
    eprintln!("bench: {} claim records encoded in {:.1} s; producing", records.len(), t.elapsed().as_secs_f64());
    let produced = {
        let (brokers, topic) = (brokers.to_string(), input.clone());
        tokio::task::spawn_blocking(move || produce_all(&brokers, &topic, &records)).await??
    };
    let (partition, end) = partition_end(brokers, &input)?;
    eprintln!("bench: {end} records on {input} partition {partition}; starting the claim stage");

    // The stage: decisions/s from its first commit to the one that reaches the log's end.
    let spawned = Instant::now();
    let claims_args = up_args(Some(brokers), Some(prefix), topology, &db, "claims");
    let stage = Proc::spawn(bin, "claims-decide", root, &claims_args, &[])?;
    let mut first: Option<(Instant, i64, CpuWindow)> = None;
    let deadline = Instant::now() + Duration::from_secs(900);
    let (done_at, (first_at, from, window)) = loop {
        // An error before the stage's process has migrated the database: not yet.
        let next: Option<(Option<i64>,)> =
            sqlx::query_as("SELECT next_offset FROM claim_partitions WHERE partition = $1")
                .bind(partition)
                .fetch_optional(pool)
                .await
                .unwrap_or(None);
        if let Some(n) = next.and_then(|(n,)| n) {
            if first.is_none() {
                first = Some((Instant::now(), n, CpuWindow::start(&[stage.pid()])));
            }
            if n >= end {
                break (Instant::now(), first.take().expect("set above"));
            }
        }
        if Instant::now() > deadline {
            return Err(with_log(anyhow::anyhow!("the claim stage did not reach offset {end} in 900 s"), &stage));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let measured = usize::try_from(end - from).unwrap_or(0);
    let steady = done_at.duration_since(first_at).as_secs_f64();
    let whole = done_at.duration_since(spawned).as_secs_f64();
    let cpu = window.end(measured);
    // Read back through the stage's own registry (the setup process is gone), the stage idle.
    let mut stage = stage;
    let ep = stage.endpoints().await?;
    let registry = RegistryClient::new(ep["schema_registry_url"].as_str().unwrap_or_default())?;
    let counts = check_decisions(brokers, &registry, &output, &log, o.stock).await;
    stage.shutdown().await;
    let counts = counts?;
    let (holders, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT user_id) FROM coupon_holders WHERE coupon_id = $1")
            .bind(COUPON)
            .fetch_one(pool)
            .await?;
    let (rejections,): (i64,) = sqlx::query_as("SELECT count(*) FROM coupon_rejections WHERE coupon_id = $1")
        .bind(COUPON)
        .fetch_one(pool)
        .await?;
    ensure!(holders as usize == o.stock && distinct == holders, "store: {holders} holders, {distinct} distinct users");
    drop_database(pool.clone(), &db).await;
    Ok((
        json!({
            "scenario": "claims_decide",
            "claims": o.claims, "users": o.users, "stock": o.stock, "partition": partition,
            "decisions_per_sec": (measured as f64 / steady).round(),
            "measured": {"decisions": measured, "secs": steady},
            "from_start": {"secs": whole, "decisions_per_sec": (o.claims as f64 / whole).round(),
                "note": "from spawning `tidings up --stages claims` (connecting, taking the partition) to the last commit"},
            "produced": produced,
            "decisions": counts,
            "store": {"holders": holders, "distinct_holders": distinct, "rejections": rejections},
            "cpu": cpu,
            "note": "decisions/s from the stage's first commit to the commit of the log's last record (stored next offset), watched every 20 ms; cpu.per_event_us.server is tidings' CPU per decision",
        }),
        log,
    ))
}

/// claims_hot_row: the conventional design on the same PostgreSQL over the first
/// `hot_row_claims` claims of `log`, the stock scaled to the same share: per claim one
/// transaction from one of `hot_row_connections` connections, `UPDATE … SET stock = stock - 1
/// WHERE id = $1 AND stock > 0` and, if a row changed, an insert unique on (coupon, user) (a
/// conflict rolls the transaction back: already claimed).
pub async fn hot_row(log: &[(String, String)], o: &ClaimOpts) -> anyhow::Result<Value> {
    let n = o.hot_row_claims.min(log.len());
    let stock = (o.stock as u128 * n as u128 / log.len().max(1) as u128) as i32;
    ensure!(n > 0 && stock > 0, "no claims or no stock for the hot-row design");
    let (admin_pool, db) = fresh_database(1).await.context("a fresh PostgreSQL database")?;
    admin_pool.close().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(o.hot_row_connections)
        .min_connections(o.hot_row_connections)
        .connect(&db)
        .await?;
    for ddl in [
        "CREATE TABLE hot_coupons (id text PRIMARY KEY, stock integer NOT NULL)",
        "CREATE TABLE hot_claims (coupon_id text NOT NULL, user_id text NOT NULL, claim_id text NOT NULL, PRIMARY KEY (coupon_id, user_id))",
    ] {
        sqlx::query(ddl).execute(&pool).await?;
    }
    sqlx::query("INSERT INTO hot_coupons (id, stock) VALUES ($1, $2)").bind(COUPON).bind(stock).execute(&pool).await?;
    let claims: Arc<Vec<(String, String)>> = Arc::new(log[..n].to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let cpu = CpuWindow::start(&[]);
    let t = Instant::now();
    let workers: Vec<_> = (0..o.hot_row_connections)
        .map(|_| {
            let (pool, claims, next) = (pool.clone(), claims.clone(), next.clone());
            tokio::spawn(async move {
                // (issued, sold out, already claimed, latencies µs)
                let mut got = (0usize, 0usize, 0usize, Vec::new());
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some((user, claim_id)) = claims.get(k) else { return Ok::<_, sqlx::Error>(got) };
                    let at = Instant::now();
                    let mut tx = pool.begin().await?;
                    let took = sqlx::query("UPDATE hot_coupons SET stock = stock - 1 WHERE id = $1 AND stock > 0")
                        .bind(COUPON)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected()
                        == 1;
                    let inserted = took
                        && sqlx::query(
                            "INSERT INTO hot_claims (coupon_id, user_id, claim_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                        )
                        .bind(COUPON)
                        .bind(user)
                        .bind(claim_id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected()
                            == 1;
                    if inserted {
                        tx.commit().await?;
                        got.0 += 1;
                    } else {
                        tx.rollback().await?;
                        if took {
                            got.2 += 1;
                        } else {
                            got.1 += 1;
                        }
                    }
                    got.3.push(at.elapsed().as_micros() as i64);
                }
            })
        })
        .collect();
    let (mut issued, mut sold_out, mut already, mut lat) = (0, 0, 0, Vec::with_capacity(n));
    for w in workers {
        let (i, s, a, l) = w.await??;
        (issued, sold_out, already) = (issued + i, sold_out + s, already + a);
        lat.extend(l);
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu.end(n);
    let (rows, users, left): (i64, i64, i32) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM hot_claims), (SELECT count(DISTINCT user_id) FROM hot_claims), (SELECT stock FROM hot_coupons)",
    )
    .fetch_one(&pool)
    .await?;
    drop_database(pool, &db).await;
    let v = json!({
        "scenario": "claims_hot_row",
        "claims": n, "of_log": log.len(), "stock": stock, "connections": o.hot_row_connections,
        "decisions_per_sec": (n as f64 / secs).round(), "secs": secs,
        "latency_ms": percentiles(lat),
        "issued": issued, "sold_out": sold_out, "already_claimed": already,
        "store": {"claims": rows, "distinct_users": users, "stock_left": left},
        "cpu": cpu,
        "note": "one transaction per claim: UPDATE hot_coupons SET stock = stock - 1 WHERE id = $1 AND stock > 0, then (if taken) INSERT … ON CONFLICT DO NOTHING on (coupon, user), rolled back if it conflicts; the first `claims` of the claims_decide log with its stock scaled to them; latency from taking the claim to its commit; others = PostgreSQL",
    });
    ensure!(
        issued == stock as usize && rows == i64::from(stock) && users == rows && left == 0,
        "the hot-row design broke an invariant: {v}"
    );
    Ok(v)
}

/// The summary line: claims_decide's decisions/s over claims_hot_row's.
pub fn comparison(decide: &Value, hot_row: &Value) -> Value {
    let rate = |v: &Value| v["decisions_per_sec"].as_f64();
    json!({
        "scenario": "claims_comparison",
        "claims_decide_per_sec": rate(decide), "claims_hot_row_per_sec": rate(hot_row),
        "ratio": rate(decide).zip(rate(hot_row)).map(|(a, b)| (a / b * 100.0).round() / 100.0),
        "note": "claims_decide decisions/s ÷ claims_hot_row decisions/s, same PostgreSQL, same claims (the hot row over a prefix of them)",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log has the promised shape: every user once in the first round, retries repeat a key.
    #[test]
    fn the_log_gives_every_user_a_first_claim_and_repeats_some_keys() {
        let (users, claims) = (1_000, 5_000);
        let log: Vec<_> = (0..claims).map(|k| claim(k, users)).collect();
        let first: HashSet<&str> = log[..users].iter().map(|(u, _)| u.as_str()).collect();
        assert_eq!(first.len(), users);
        let distinct: HashSet<&(String, String)> = log.iter().collect();
        assert!(distinct.len() < claims && distinct.len() > claims * 3 / 4, "{}", distinct.len());
    }

    /// The precomputed bytes decode as the lean reader's own encoding would: a claim's fields
    /// sit where schemas/coupon_claim.avsc puts them.
    #[test]
    fn a_precomputed_claim_has_the_schemas_layout() {
        let bytes = claim_requested(7, 3, "user-1", "claim-1");
        assert_eq!(&bytes[..5], &[0, 0, 0, 0, 7]);
        let mut d = Datum::new(&bytes[5..]);
        assert_eq!(d.string().unwrap(), "bench-claim-3");
        assert!(d.long().is_ok());
        assert_eq!(d.string().unwrap(), COUPON);
        assert_eq!((d.long().unwrap(), d.long().unwrap()), (0, 1));
        assert_eq!((d.string().unwrap(), d.string().unwrap()), ("claim-1", "user-1"));
        assert!(d.end().is_ok());
    }
}

/// claims_http's settings.
#[derive(Debug, Clone)]
pub struct HttpOpts {
    /// Users claiming at once, one claim each.
    pub users: usize,
    /// The coupon's stock.
    pub stock: usize,
}

/// claims_http: one `tidings up --stages gateway,claims` on a fresh PostgreSQL database; a coupon
/// defined over `POST /v1/coupons`, then every user's `POST /v1/coupons/{id}/claims` released at
/// once (each on its own connection, opened before): claim → answer p50/p99 and the answers by
/// status; then, once every claim is decided in the store, issued = stock.
pub async fn http(
    bin: &Path,
    root: &Path,
    topology: &Path,
    brokers: &str,
    prefix: &str,
    o: &HttpOpts,
) -> anyhow::Result<Value> {
    const HTTP_COUPON: &str = "bench-http-drop";
    let (pool, db) = fresh_database(2).await.context("a fresh PostgreSQL database")?;
    let args = up_args(Some(brokers), Some(prefix), topology, &db, "gateway,claims");
    let mut proc_ = Proc::spawn(bin, "claims-http", root, &args, &[])?;
    let v = async {
        let ep = proc_.endpoints().await.map_err(|e| with_log(e, &proc_))?;
        let url = ep["http"].as_str().unwrap_or_default().to_string();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
        super::wait_ready(&http, &url, Duration::from_secs(120)).await.map_err(|e| with_log(e, &proc_))?;
        eprintln!("bench: the coupon API is up at {url}");
        let body = json!({"id": HTTP_COUPON, "title": "Bench HTTP drop", "discount_percent": 20, "stock": o.stock,
            "claim_opens_at": "2020-01-01T00:00:00Z", "claim_closes_at": "2099-01-01T00:00:00Z", "valid_for_secs": 86_400});
        let resp = http
            .post(format!("{url}/v1/coupons"))
            .bearer_auth(tidings_gateway::service_auth::DEV_SERVICE_TOKEN)
            .json(&body)
            .send()
            .await?;
        ensure!(matches!(resp.status().as_u16(), 201 | 202), "defining the coupon: {} {}", resp.status(), resp.text().await?);
        let token = |u: &str| {
            tidings_gateway::auth::mint_hs256(
                tidings_gateway::auth::DEV_SECRET.as_bytes(),
                u,
                Duration::from_secs(86_400),
                None,
                None,
            )
        };
        let first = token("user-0000000")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = http.get(format!("{url}/v1/coupons/{HTTP_COUPON}")).bearer_auth(&first).send().await?;
            if r.status() == 200 {
                break;
            }
            ensure!(Instant::now() < deadline, "the coupon was not defined in 60 s: {}", r.status());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Each user its own client (one connection), opened by a first request, then all released.
        let go = Arc::new(tokio::sync::Barrier::new(o.users + 1));
        // Connections are opened a few hundred at a time: thousands of connects at once overflow
        // the listener's accept queue and wait out SYN retransmits.
        let connecting = Arc::new(tokio::sync::Semaphore::new(256));
        let mut tasks = Vec::with_capacity(o.users);
        for i in 0..o.users {
            let user = format!("user-{i:07}");
            let (tok, go, url, connecting) = (token(&user)?, go.clone(), url.clone(), connecting.clone());
            tasks.push(tokio::spawn(async move {
                let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).pool_max_idle_per_host(1).build();
                // Connected first; a user whose connection failed still meets the others at the
                // release (or it would never come) and then reports the failure.
                let permit = connecting.acquire_owned().await;
                // A connection the listener closed at once (its accept queue overflowing) is
                // opened again, at most five times.
                let mut ready = Err(anyhow::anyhow!("not connected"));
                for _ in 0..5 {
                    ready = match &client {
                        Ok(c) => match c.get(format!("{url}/healthz")).send().await {
                            Ok(r) => r.bytes().await.map(drop).map_err(anyhow::Error::from),
                            Err(e) => Err(e.into()),
                        },
                        Err(e) => Err(anyhow::anyhow!("{e}")),
                    };
                    if ready.is_ok() || client.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                drop(permit);
                go.wait().await;
                ready?;
                let client = client?;
                let at = Instant::now();
                let resp = client
                    .post(format!("{url}/v1/coupons/{HTTP_COUPON}/claims"))
                    .bearer_auth(&tok)
                    .header("idempotency-key", format!("bench-{user}"))
                    .send()
                    .await?;
                let status = resp.status().as_u16();
                resp.bytes().await?;
                Ok::<_, anyhow::Error>((status, at.elapsed().as_micros() as i64))
            }));
        }
        eprintln!("bench: {} claimants connecting", o.users);
        let server = [proc_.pid()];
        go.wait().await;
        let (t, cpu) = (Instant::now(), CpuWindow::start(&server));
        let mut by_status: HashMap<u16, usize> = HashMap::new();
        let (mut latencies, mut failed) = (Vec::with_capacity(o.users), 0);
        for task in tasks {
            match task.await? {
                Ok((status, us)) => {
                    *by_status.entry(status).or_default() += 1;
                    latencies.push(us);
                }
                Err(e) => {
                    if failed == 0 {
                        eprintln!("bench: a claim failed: {e:#}");
                    }
                    failed += 1
                }
            }
        }
        let answered_secs = t.elapsed().as_secs_f64();
        // Every claim decided (those answered 202 too): issued = stock, the rest rejected.
        let deadline = Instant::now() + Duration::from_secs(120);
        let (holders, distinct, rejections) = loop {
            let (h, d, r): (i64, i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM coupon_holders WHERE coupon_id = $1), \
                 (SELECT count(DISTINCT user_id) FROM coupon_holders WHERE coupon_id = $1), \
                 (SELECT count(*) FROM coupon_rejections WHERE coupon_id = $1)",
            )
            .bind(HTTP_COUPON)
            .fetch_one(&pool)
            .await?;
            if usize::try_from(h + r).unwrap_or(0) >= o.users - failed || Instant::now() > deadline {
                break (h, d, r);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let cpu = cpu.end(o.users);
        let count = |s: u16| by_status.get(&s).copied().unwrap_or(0);
        let v = json!({
            "scenario": "claims_http",
            "users": o.users, "stock": o.stock,
            "latency_ms": percentiles(latencies),
            "answered_secs": answered_secs,
            "answers": {"201": count(201), "409": count(409), "202": count(202),
                "other": o.users - failed - count(201) - count(409) - count(202), "failed": failed},
            "store": {"issued": holders, "distinct_holders": distinct, "rejected": rejections},
            "cpu": cpu,
            "note": "every user's POST /v1/coupons/{id}/claims released at once (each on a connection opened before; failed = connections the listener closed five times or claims without an answer), one `tidings up --stages gateway,claims` on Apache Kafka + PostgreSQL; latency from the release to the answer (201 issued, 409 rejected, 202 not decided within the claim wait); store = the claim tables once every claim is decided",
        });
        // `failed`: users whose connection could not be opened (or whose claim got no answer),
        // reported; every claim sent must be decided, and exactly the stock issued.
        ensure!(
            holders as usize == o.stock
                && distinct == holders
                && count(201) <= o.stock
                && usize::try_from(holders + rejections).unwrap_or(0) >= o.users - failed,
            "the stampede broke an invariant: {v}"
        );
        Ok(v)
    }
    .await
    .map_err(|e| with_log(e, &proc_));
    proc_.shutdown().await;
    drop_database(pool, &db).await;
    v
}
