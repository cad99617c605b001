//! The coupon stampede on Apache Kafka and PostgreSQL: 20,000 claims from 5,000 users (retries
//! with the same idempotency key and new claims with new keys) on one coupon with stock 1,000,
//! sent as users send them (`POST /v1/coupons/{id}/claims` on a gateway process), while the claim
//! stage (its own `tidings up --stages claims` process) is SIGKILLed twice and a second
//! claim-stage process joins and leaves (SIGTERM), taking the coupon's partition and giving it
//! back; each step is triggered by the coupons seen issued, so all of them land mid-issue.
//! Afterwards: exactly 1,000 issued, no user twice, every claim exactly one decision on `coupons`,
//! every answer the decision, and `tidings coupon verify` agrees; the same verifier, run on a copy
//! of the data with one violation planted, names it. Needs `TIDINGS_TEST_BROKERS` and `TIDINGS_TEST_PG`.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{eventually, fresh_pg, topology_path, unique_prefix, Endpoints, Tidings, Up};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Value as Json};
use sqlx::Connection;
use tidings_core::json_avro::{avro_to_json, union_branch_name};
use tidings_core::kafka::{partition_for, KafkaConfig};
use tidings_core::RegistryClient;

const STOCK: usize = 1_000;
const USERS: usize = 5_000;
const CLAIMS: usize = 20_000;
/// Claims in flight at once, each waiting for its answer (the gateway waits for the decision up
/// to its claim wait, 500 ms by default, then answers 202).
const IN_FLIGHT: usize = 64;
/// Claims sent per second at most, so the run lasts long enough for the processes to come and
/// go while claims are being decided (about 30 s of claims).
const RATE: u64 = 700;
/// The first users' first claims are spread over this many claims (a new user about every 11
/// claims), so the stock is issued over the first ~11,000 claims, where the kills happen.
const EARLY_USERS: usize = 1_250;
const EARLY_SPAN: usize = 14_000;
/// The static member id of the claim-stage process that is killed and restarted.
const STATIC_MEMBER: &str = "group.instance.id=stampede-a";
/// The core's embedded registry's write token; the claim stage registers its output schema.
const REGISTRY_TOKEN: &str = "stampede-registry-write-token-0123456789";

/// The claims in send order: (user, idempotency key). Each user's first claim has key `u-1`;
/// the others retry a user's latest key (the same claim again) or make a new claim with a new
/// key, about half each.
fn stampede(seed: u64) -> Vec<(String, String)> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut keys: Vec<usize> = Vec::new(); // per introduced user: keys made
    let mut out = Vec::with_capacity(CLAIMS);
    for i in 0..CLAIMS {
        let due = if i < EARLY_SPAN {
            (i + 1) * EARLY_USERS / EARLY_SPAN
        } else {
            EARLY_USERS + (i + 1 - EARLY_SPAN) * (USERS - EARLY_USERS) / (CLAIMS - EARLY_SPAN)
        };
        if keys.is_empty() || keys.len() < due {
            keys.push(1);
            out.push((format!("user-{}", keys.len() - 1), format!("user-{}-1", keys.len() - 1)));
            continue;
        }
        let u = rng.random_range(0..keys.len());
        if rng.random_bool(0.5) {
            keys[u] += 1;
        }
        out.push((format!("user-{u}"), format!("user-{u}-{}", keys[u])));
    }
    assert_eq!(keys.len(), USERS);
    out
}

/// A claim: (user, idempotency key = claim id).
type Claim = (String, String);
/// One decision event: (event id, branch, code or reason).
type Decision = (String, String, String);
/// A PostgreSQL session: client port, start, state and its last query.
type Session = (Option<i32>, Option<String>, Option<String>, Option<String>);

/// Every decision read from `coupons`, deduplicated by event id (a record decided again after a
/// crash or by the next owner repeats its event's id).
#[derive(Default)]
struct Decisions {
    events: HashSet<String>,
    /// By claim (user, claim id): each distinct decision event (event id, branch, code or reason).
    by_claim: HashMap<Claim, Vec<Decision>>,
    /// CouponIssued events by user.
    issued: HashMap<String, usize>,
}

/// The decisions so far, shared by the reader and the test.
#[derive(Default)]
struct Watch {
    state: Mutex<Decisions>,
    /// Distinct claims decided.
    decided: AtomicUsize,
    issued: AtomicUsize,
}

impl Watch {
    fn decided(&self) -> usize {
        self.decided.load(Ordering::SeqCst)
    }
}

/// Reads `topic` from its start for as long as the test runs, filling `watch`.
async fn read_decisions(brokers: String, registry: RegistryClient, topic: String, watch: Arc<Watch>) {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", format!("stampede-reader-{}", uuid::Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)).unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..md.topics()[0].partitions().len() as i32 {
        tpl.add_partition_offset(&topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let (_, reader) = registry.latest(&format!("{topic}-value")).await.unwrap();
    loop {
        let m = consumer.recv().await.expect("reading coupons");
        let value = registry.decode(m.payload().unwrap(), reader).await.unwrap();
        let branch = union_branch_name(reader, &value, "payload").unwrap().to_string();
        let event = avro_to_json(&value);
        let p = &event["payload"];
        if !matches!(branch.as_str(), "CouponIssued" | "ClaimRejected") {
            continue;
        }
        let mut state = watch.state.lock().unwrap();
        if !state.events.insert(event["event_id"].as_str().unwrap().to_string()) {
            continue;
        }
        let s = |f: &str| p[f].as_str().unwrap_or_default().to_string();
        let claim = (s("user_id"), s("claim_id"));
        let detail = if branch == "CouponIssued" { s("code") } else { s("reason") };
        if branch == "CouponIssued" {
            *state.issued.entry(claim.0.clone()).or_default() += 1;
            watch.issued.fetch_add(1, Ordering::SeqCst);
        }
        let decisions = state.by_claim.entry(claim).or_default();
        decisions.push((event["event_id"].as_str().unwrap().to_string(), branch, detail));
        if decisions.len() == 1 {
            watch.decided.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A claimant of the coupon API: users' `POST /v1/coupons/{id}/claims` on the gateway.
struct Claimant {
    http: reqwest::Client,
    /// The gateway's base URL.
    base: String,
    coupon: String,
    /// A user token per user.
    tokens: HashMap<String, String>,
    /// Every answer: the claim, the status, and the code (201) or the error code (409).
    answers: Mutex<Vec<(Claim, u16, String)>>,
}

impl Claimant {
    /// Defines the coupon as a service and waits until the gateway knows it.
    async fn define(&self, procs: &[&Tidings]) {
        let body = json!({"id": self.coupon, "title": "Stampede", "discount_percent": 25, "stock": STOCK,
            "claim_opens_at": "2020-01-01T00:00:00Z", "claim_closes_at": "2099-01-01T00:00:00Z",
            "valid_for_secs": 86_400});
        let resp = self.http.post(format!("{}/v1/coupons", self.base)).bearer_auth(common::ingest_token()).json(&body);
        let resp = resp.send().await.expect("POST /v1/coupons");
        let status = resp.status().as_u16();
        assert!(matches!(status, 201 | 202), "defining the coupon: {status} {}", resp.text().await.unwrap_or_default());
        let url = format!("{}/v1/coupons/{}", self.base, self.coupon);
        let token = common::user_token("user-0");
        eventually("the coupon to be defined", Duration::from_secs(30), Duration::from_millis(50), procs, || async {
            let resp = self.http.get(&url).bearer_auth(&token).send().await.map_err(|e| e.to_string())?;
            match resp.status().as_u16() {
                200 => Ok(()),
                s => Err(format!("{s} {}", resp.text().await.unwrap_or_default())),
            }
        })
        .await;
    }

    /// One claim, as a browser sends it: the answer is its decision (201 / 409), or 202 if the
    /// decision took longer than the gateway's claim wait.
    async fn claim(&self, user: &str, key: &str) {
        let resp = self
            .http
            .post(format!("{}/v1/coupons/{}/claims", self.base, self.coupon))
            .bearer_auth(&self.tokens[user])
            .header("idempotency-key", key)
            .send()
            .await
            .expect("POST /v1/coupons/{id}/claims");
        let status = resp.status().as_u16();
        let body: Json = resp.json().await.unwrap_or(Json::Null);
        let detail = match status {
            201 => body["code"].as_str(),
            409 => body["error"]["code"].as_str(),
            202 => body["status"].as_str(),
            _ => panic!("claim ({user}, {key}) answered {status}: {body}"),
        };
        let detail = detail.unwrap_or_else(|| panic!("claim ({user}, {key}) answered {status}: {body}")).to_string();
        self.answers.lock().unwrap().push(((user.to_string(), key.to_string()), status, detail));
    }
}

/// Sends the claims from [`IN_FLIGHT`] tasks at [`RATE`] at most, never one at or past `gate`.
async fn send_all(claimant: Arc<Claimant>, log: Arc<Vec<Claim>>, gate: Arc<AtomicUsize>, sent: Arc<AtomicUsize>) {
    let next = Arc::new(AtomicUsize::new(0));
    let pace = Arc::new(tokio::sync::Mutex::new(tokio::time::Instant::now()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let (claimant, log, gate, sent, next, pace) =
            (claimant.clone(), log.clone(), gate.clone(), sent.clone(), next.clone(), pace.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= log.len() {
                    return;
                }
                while i >= gate.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let slot = {
                    let mut last = pace.lock().await;
                    *last = (*last + Duration::from_micros(1_000_000 / RATE)).max(tokio::time::Instant::now());
                    *last
                };
                tokio::time::sleep_until(slot).await;
                let (user, key) = &log[i];
                claimant.claim(user, key).await;
                sent.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("a claim task panicked");
    }
}

/// How many times `proc_` took the coupon's partition, by its log.
fn takes(proc_: &Tidings, partition: i32) -> usize {
    proc_.log_tail(usize::MAX).matches(&format!("Took claim partition {partition} at epoch")).count()
}

/// Waits (bounded) until `proc_` has taken the coupon's partition `times` times.
async fn await_takes(proc_: &Tidings, partition: i32, times: usize, others: &[&Tidings]) {
    let mut procs = vec![proc_];
    procs.extend_from_slice(others);
    eventually(
        &format!("{} to take partition {partition} (take {times})", proc_.name),
        Duration::from_secs(60),
        Duration::from_millis(20),
        &procs,
        || async move {
            let n = takes(proc_, partition);
            if n >= times {
                Ok(())
            } else {
                Err(format!("taken {n} times"))
            }
        },
    )
    .await;
}

/// Waits (bounded) until `counter` (claims decided, coupons issued) reaches `n`.
async fn await_seen(what: &str, counter: &AtomicUsize, n: usize, procs: &[&Tidings]) {
    eventually(&format!("{n} {what}"), Duration::from_secs(120), Duration::from_millis(10), procs, || async {
        let seen = counter.load(Ordering::SeqCst);
        if seen >= n {
            Ok(())
        } else {
            Err(format!("{seen} {what}"))
        }
    })
    .await;
}

/// `tidings coupon verify --coupon <coupon>` against the given data: exit code and output.
fn verify(brokers: &str, registry: &str, database: &str, prefix: &str, coupon: &str) -> (Option<i32>, String) {
    tidings(&["coupon", "verify", "--coupon", coupon], brokers, registry, database, prefix, "")
}

fn tidings(
    args: &[&str],
    brokers: &str,
    registry: &str,
    database: &str,
    prefix: &str,
    stdin: &str,
) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidings"))
        .args(args)
        .args(["--brokers", brokers, "--schema-registry-url", registry, "--database-url", database])
        .args(["--topic-prefix", prefix])
        .arg("--topology")
        .arg(topology_path())
        .env("TIDINGS_LOG", "warn")
        .env("TIDINGS_SCHEMA_REGISTRY_BEARER_TOKEN", REGISTRY_TOKEN)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning tidings");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

/// Copies every record of `from` (start to current end) to `to`, keeping partition, key, value
/// and timestamp: the claim stage's decisions depend on the claim records' timestamps.
async fn copy_topic(brokers: &str, from: &str, to: &str) -> usize {
    let (b, f) = (brokers.to_string(), from.to_string());
    let records = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &b)
            .set("group.id", format!("stampede-copy-{}", uuid::Uuid::new_v4().simple()))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let md = consumer.fetch_metadata(Some(&f), Duration::from_secs(10)).unwrap();
        let parts = md.topics()[0].partitions().len() as i32;
        let mut tpl = TopicPartitionList::new();
        let mut ends = BTreeMap::new();
        for p in 0..parts {
            let (low, high) = consumer.fetch_watermarks(&f, p, Duration::from_secs(10)).unwrap();
            if high > low {
                tpl.add_partition_offset(&f, p, Offset::Offset(low)).unwrap();
                ends.insert(p, high);
            }
        }
        consumer.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ends.is_empty() {
            assert!(Instant::now() < deadline, "copying {f}: partitions {ends:?} not read to their end");
            let Some(m) = consumer.poll(Duration::from_millis(200)) else { continue };
            let m = m.unwrap();
            let ts = m.timestamp().to_millis().unwrap();
            out.push((m.partition(), m.key().map(<[u8]>::to_vec), m.payload().unwrap().to_vec(), ts));
            if ends.get(&m.partition()).is_some_and(|end| m.offset() + 1 >= *end) {
                ends.remove(&m.partition());
            }
        }
        out
    })
    .await
    .unwrap();
    let producer: FutureProducer = KafkaConfig::new(brokers).producer().create().unwrap();
    let mut deliveries = Vec::with_capacity(records.len());
    for (p, key, value, ts) in &records {
        let rec = FutureRecord::<str, [u8]>::to(to).partition(*p).payload(&value[..]).timestamp(*ts);
        let rec = match key {
            Some(k) => rec.key(std::str::from_utf8(k).expect("coupon ids are text")),
            None => rec,
        };
        deliveries.push(common::send_when_room(&producer, rec, "a copied record").await);
    }
    for d in deliveries {
        d.await.unwrap().map_err(|(e, _)| e).expect("copied record acknowledged");
    }
    records.len()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stampede_through_kills_and_rebalances_issues_exactly_the_stock() {
    let started = Instant::now();
    let brokers = common::brokers_or_skip().expect("TIDINGS_TEST_BROKERS");
    let (pool, db) = fresh_pg().await;
    // The database is copied later (as a template), so no session of the test may stay on it; a
    // connection the migrations used can outlive its pool's close, so it is ended here, before
    // any process uses the database.
    pool.close().await;
    let orig_name = db.rsplit('/').next().unwrap().to_string();
    let mut admin = sqlx::PgConnection::connect(&tidings_store::testing::admin_url()).await.unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&orig_name)
        .execute(&mut admin)
        .await
        .unwrap();
    let prefix = unique_prefix();
    let seed: u64 = std::env::var("TIDINGS_STAMPEDE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0);
    eprintln!("topic prefix {prefix}, database {db}, claims seed {seed} (TIDINGS_STAMPEDE_SEED replays it)");

    // The core serves the embedded registry, creates the topics and serves the coupon API.
    let core_up = Up { brokers: &brokers, database_url: &db, prefix: &prefix, stages: "gateway", registry_url: None };
    let core_env = [("TIDINGS_REGISTRY_WRITE_TOKEN", REGISTRY_TOKEN)];
    let mut core = Tidings::spawn_env("core", &core_up, &core_env);
    let ep: Endpoints = core.endpoints(Duration::from_secs(60)).await;
    let registry = RegistryClient::new(&ep.schema_registry_url).unwrap();

    // The coupon lands on a partition in the upper half of coupon-claims: the range assignment
    // gives it to the second member ("stampede-b" sorts after "stampede-a") while both are up.
    let topology = tidings_pipeline::topology::Topology::load(&topology_path()).unwrap();
    let partitions = topology.topics["coupon-claims"].partitions;
    let coupon =
        (0..).map(|i| format!("stampede-{i}")).find(|c| partition_for(c, partitions) >= partitions / 2).unwrap();
    let hot = partition_for(&coupon, partitions);

    let claims_up = Up {
        brokers: &brokers,
        database_url: &db,
        prefix: &prefix,
        stages: "claims",
        registry_url: Some(&ep.schema_registry_url),
    };
    let token = ("TIDINGS_SCHEMA_REGISTRY_BEARER_TOKEN", REGISTRY_TOKEN);
    let static_member = [("TIDINGS_KAFKA_OPTS", STATIC_MEMBER), token];
    let mut a = Tidings::spawn_env("claims-a1", &claims_up, &static_member);
    a.endpoints(Duration::from_secs(60)).await;
    await_takes(&a, hot, 1, &[&core]).await;

    let watch = Arc::new(Watch::default());
    let reader =
        tokio::spawn(read_decisions(brokers.clone(), registry.clone(), format!("{prefix}coupons"), watch.clone()));
    let log = Arc::new(stampede(seed));
    let claimant = Arc::new(Claimant {
        http: reqwest::Client::builder().pool_max_idle_per_host(IN_FLIGHT).build().unwrap(),
        base: ep.http.clone(),
        coupon: coupon.clone(),
        tokens: log.iter().map(|(u, _)| (u.clone(), common::user_token(u))).collect(),
        answers: Mutex::new(Vec::new()),
    });
    claimant.define(&[&core, &a]).await;

    let distinct: BTreeSet<&(String, String)> = log.iter().collect();
    let gate = Arc::new(AtomicUsize::new(4_000));
    let sent = Arc::new(AtomicUsize::new(0));
    let sending = tokio::spawn(send_all(claimant.clone(), log.clone(), gate.clone(), sent.clone()));
    let run_started = Instant::now();
    // (what, claims sent, distinct claims decided, coupons issued) at each step.
    let mut steps: Vec<(String, usize, usize, usize)> = Vec::new();
    let mut step = |what: &str, watch: &Watch| {
        let s = (what.to_string(), sent.load(Ordering::SeqCst), watch.decided(), watch.issued.load(Ordering::SeqCst));
        eprintln!("{:>6.1}s {s:?}", run_started.elapsed().as_secs_f64());
        steps.push(s);
    };

    // Lets the senders go 3,000 claims further: each step leaves claims for the next process.
    let open = || gate.store(sent.load(Ordering::SeqCst) + 3_000, Ordering::SeqCst);

    // First kill, while coupons are being issued: the static member's restart takes the
    // partition at once.
    let mut dead = Vec::new();
    await_seen("coupons issued", &watch.issued, 200, &[&a, &core]).await;
    a.kill9();
    step("SIGKILL claims-a1", &watch);
    dead.push(std::mem::replace(&mut a, Tidings::spawn_env("claims-a2", &claims_up, &static_member)));
    open();
    await_takes(&a, hot, 1, &[&core]).await;
    step("claims-a2 took the partition", &watch);

    // A second process joins and takes the coupon's partition; it issues coupons, then leaves
    // (SIGTERM) and the partition goes back.
    await_seen("coupons issued", &watch.issued, 400, &[&a, &core]).await;
    let b_opts = [("TIDINGS_KAFKA_OPTS", "client.id=stampede-b"), token];
    let mut b = Tidings::spawn_env("claims-b", &claims_up, &b_opts);
    step("claims-b started", &watch);
    await_takes(&b, hot, 1, &[&a, &core]).await;
    step("claims-b took the partition", &watch);
    let at = watch.issued.load(Ordering::SeqCst);
    open();
    await_seen("coupons issued", &watch.issued, at + 150, &[&b, &a, &core]).await;
    let a_takes = takes(&a, hot);
    common::sigterm(&mut b).await;
    step("SIGTERM claims-b (exited 0)", &watch);
    await_takes(&a, hot, a_takes + 1, &[&b, &core]).await;
    step("claims-a2 took the partition back", &watch);
    let at = watch.issued.load(Ordering::SeqCst);
    open();

    // Second kill, while coupons are still being issued.
    await_seen("coupons issued", &watch.issued, at + 100, &[&a, &core]).await;
    a.kill9();
    step("SIGKILL claims-a2", &watch);
    dead.push(std::mem::replace(&mut a, Tidings::spawn_env("claims-a3", &claims_up, &static_member)));
    gate.store(CLAIMS, Ordering::SeqCst);
    await_takes(&a, hot, 1, &[&core]).await;
    step("claims-a3 took the partition", &watch);

    tokio::time::timeout(Duration::from_secs(180), sending).await.expect("claims sent in time").unwrap();
    step("all claims sent", &watch);
    await_seen("claims decided", &watch.decided, distinct.len(), &[&a, &core]).await;
    step("all claims decided", &watch);
    let run_secs = run_started.elapsed().as_secs_f64();
    // Every step but the last ones left claims to decide for the process that came next.
    for (what, sent_then, decided_then, _) in &steps[..steps.len() - 2] {
        assert!(decided_then < &distinct.len(), "{what} came after every claim was decided: {steps:?}");
        assert!(*sent_then < CLAIMS, "{what} came after every claim was sent: {steps:?}");
    }
    // The kills and the second process came while coupons were being issued, not only rejected.
    let issued_at = |what: &str| steps.iter().find(|s| s.0 == what).map(|s| s.3).unwrap();
    for step in ["SIGKILL claims-a1", "claims-b took the partition", "SIGKILL claims-a2"] {
        assert!(issued_at(step) < STOCK, "{step} came after the stock was gone: {steps:?}");
    }

    // Exactly the stock issued, no user twice, every claim exactly one decision.
    {
        let state = watch.state.lock().unwrap();
        let twice: Vec<_> = state.by_claim.iter().filter(|(_, d)| d.len() > 1).take(5).collect();
        assert!(twice.is_empty(), "claims with more than one decision: {twice:?}");
        let undecided: Vec<_> = distinct.iter().filter(|c| !state.by_claim.contains_key(*c)).take(5).collect();
        assert!(undecided.is_empty(), "claims without a decision: {undecided:?}");
        let unknown: Vec<_> =
            state.by_claim.keys().filter(|c| !distinct.contains(&(c.0.clone(), c.1.clone()))).take(5).collect();
        assert!(unknown.is_empty(), "decisions of claims never made: {unknown:?}");
        assert_eq!(state.by_claim.len(), distinct.len());
        let issued: usize = state.issued.values().sum();
        assert_eq!(issued, STOCK, "CouponIssued events");
        assert_eq!(state.issued.len(), STOCK, "users issued a coupon");
        let users_twice: Vec<_> = state.issued.iter().filter(|(_, n)| **n > 1).collect();
        assert!(users_twice.is_empty(), "users issued twice: {users_twice:?}");
        let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
        for d in state.by_claim.values() {
            *reasons.entry(if d[0].1 == "CouponIssued" { "issued" } else { d[0].2.as_str() }).or_default() += 1;
        }
        eprintln!("{} claims, {} distinct, decided: {reasons:?}", log.len(), distinct.len());
        assert!(
            reasons.get("already_claimed").is_some_and(|n| *n > 0) && reasons.get("sold_out").is_some_and(|n| *n > 0)
        );

        // Every answer the users got is the decision on `coupons`: 201 with its code, 409 with
        // its reason (202: decided after the gateway's wait).
        let answers = claimant.answers.lock().unwrap();
        assert_eq!(answers.len(), CLAIMS);
        let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
        for (claim, status, detail) in answers.iter() {
            *statuses.entry(*status).or_default() += 1;
            let (_, branch, decided) = &state.by_claim[claim][0];
            let agrees = match status {
                201 => branch == "CouponIssued" && decided == detail,
                409 => branch == "ClaimRejected" && decided == detail,
                _ => detail == "pending",
            };
            assert!(agrees, "{claim:?} answered {status} {detail}, but was decided {branch} {decided}");
        }
        eprintln!("answers by status: {statuses:?}");
        assert!(
            statuses.get(&201).is_some_and(|n| *n > 0) && statuses.get(&409).is_some_and(|n| *n > 0),
            "{statuses:?}"
        );
    }
    reader.abort();
    common::sigterm(&mut a).await;

    let (code, out) = verify(&brokers, &ep.schema_registry_url, &db, &prefix, &coupon);
    assert_eq!(code, Some(0), "coupon verify on the run:\n{out}");
    assert!(out.contains(&format!("{STOCK} issued")) && out.contains("All invariants hold"), "{out}");
    eprintln!("[{:.1}s] {out}", started.elapsed().as_secs_f64());

    // A copy of the data: the database as a template, the two topics under another prefix, served
    // by a process on the copy (whose registry is the copied one, with the same schema ids).
    common::sigterm(&mut core).await;
    let copy_db = format!("{db}_copy");
    let copy_name = copy_db.rsplit('/').next().unwrap();
    // A template must have no sessions; those of the stopped processes end a moment after them.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sessions: Vec<Session> = sqlx::query_as(
            "SELECT client_port, backend_start::text, state, left(query, 200) FROM pg_stat_activity WHERE datname = $1",
        )
        .bind(&orig_name)
        .fetch_all(&mut admin)
        .await
        .unwrap();
        if sessions.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "sessions on {orig_name} after every process stopped: {sessions:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sqlx::query(&format!("CREATE DATABASE {copy_name} TEMPLATE {orig_name}")).execute(&mut admin).await.unwrap();
    let copy_prefix = unique_prefix();
    let copy_up =
        Up { brokers: &brokers, database_url: &copy_db, prefix: &copy_prefix, stages: "ingest", registry_url: None };
    let mut copy = Tidings::spawn_env("copy", &copy_up, &core_env);
    let copy_ep = copy.endpoints(Duration::from_secs(60)).await;
    for topic in ["coupon-claims", "coupons"] {
        let n = copy_topic(&brokers, &format!("{prefix}{topic}"), &format!("{copy_prefix}{topic}")).await;
        eprintln!(
            "[{:.1}s] copied {n} records of {prefix}{topic} to {copy_prefix}{topic}",
            started.elapsed().as_secs_f64()
        );
    }
    let copy_registry = copy_ep.schema_registry_url.as_str();
    let (code, out) = verify(&brokers, copy_registry, &copy_db, &copy_prefix, &coupon);
    assert_eq!(code, Some(0), "coupon verify on the unchanged copy:\n{out}");

    // Planted in the copy: a second decision, CouponIssued, for a claim that was rejected, and a
    // holder row for another user who was issued nothing.
    let (user, key, intruder) = {
        let state = watch.state.lock().unwrap();
        let mut never: Vec<&Claim> = distinct.iter().copied().filter(|c| !state.issued.contains_key(&c.0)).collect();
        never.dedup_by(|a, b| a.0 == b.0);
        (never[0].0.clone(), never[0].1.clone(), never[1].0.clone())
    };
    let planted = json!({"event_id": uuid::Uuid::new_v4().to_string(), "occurred_at": 0, "coupon_id": coupon,
        "payload": {"CouponIssued": {"user_id": user, "code": "PLANTED", "discount_percent": 25, "expires_at": 0,
        "claim_id": key}}});
    let (code, out) =
        tidings(&["produce", "coupons"], &brokers, copy_registry, &copy_db, &copy_prefix, &planted.to_string());
    assert_eq!(code, Some(0), "producing the planted decision:\n{out}");
    let copy_pool = sqlx::PgPool::connect(&copy_db).await.unwrap();
    sqlx::query(
        "INSERT INTO coupon_holders (coupon_id, user_id, partition, claim_id, code, expires_at)
         SELECT coupon_id, $2, partition, 'planted', 'PLANTED-ROW', 0 FROM coupon_holders WHERE coupon_id = $1 LIMIT 1",
    )
    .bind(&coupon)
    .bind(&intruder)
    .execute(&copy_pool)
    .await
    .unwrap();
    copy_pool.close().await;
    let (code, out) = verify(&brokers, copy_registry, &copy_db, &copy_prefix, &coupon);
    assert_eq!(code, Some(1), "coupon verify on the copy with planted violations:\n{out}");
    let named = |s: &str| out.lines().any(|l| l.contains("VIOLATION") && l.contains(s));
    assert!(named(&format!("claim (\"{user}\", \"{key}\")")) && named("2 decisions"), "{out}");
    assert!(named(&format!("{} users were issued a coupon, more than its stock {STOCK}", STOCK + 1)), "{out}");
    assert!(named(&format!("the store holds user \"{intruder}\"")) && named("coupon_holders"), "{out}");
    assert!(named(&format!("the store holds {} holders (coupon_holders), more than its stock", STOCK + 1)), "{out}");
    eprintln!("[{:.1}s] {out}", started.elapsed().as_secs_f64());
    // The originals are untouched: the run still verifies (through the copy's registry).
    let (code, out) = verify(&brokers, copy_registry, &db, &prefix, &coupon);
    assert_eq!(code, Some(0), "coupon verify on the original after the plant:\n{out}");
    common::sigterm(&mut copy).await;
    drop(dead);
    eprintln!("claims ran {run_secs:.1}s; the whole test {:.1}s; steps: {steps:?}", started.elapsed().as_secs_f64());
}
