//! `tidings up --stages claims` on Apache Kafka and PostgreSQL: a coupon definition and claims
//! produced with `tidings produce` are decided into exactly `stock` CouponIssued and ClaimRejected
//! for the rest; `tidings coupon verify` agrees, and names a violation planted afterwards.
//! Needs `TIDINGS_TEST_BROKERS` and `TIDINGS_TEST_PG`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{brokers_or_skip, fresh_pg, topology_path, unique_prefix, Endpoints, Tidings, Up};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Value as Json};
use tidings_core::json_avro::{avro_to_json, union_branch_name};
use tidings_core::RegistryClient;

const COUPON: &str = "drop-up";
const STOCK: usize = 5;
const USERS: usize = 12;

/// `tidings <args>` against the running `up`, with `stdin` as its input.
fn tidings(ep: &Endpoints, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidings"))
        .args(args)
        .args(["--brokers", &ep.brokers, "--schema-registry-url", &ep.schema_registry_url])
        .args(["--database-url", &ep.database_url, "--topic-prefix", &ep.topic_prefix])
        .arg("--topology")
        .arg(topology_path())
        .env("TIDINGS_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning tidings");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// The claims in log order: every user claims, some twice with the same idempotency key (a
/// retry) and some with a new one.
fn claims() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for i in 0..USERS {
        out.push((format!("user-{i}"), format!("key-{i}")));
        if i % 3 == 0 {
            out.push((format!("user-{i}"), format!("key-{i}")));
        }
        if i % 4 == 1 {
            out.push((format!("user-{i}"), format!("key-{i}-again")));
        }
    }
    out
}

fn record(payload: Json) -> String {
    json!({"event_id": uuid::Uuid::new_v4().to_string(), "occurred_at": 0, "coupon_id": COUPON, "payload": payload})
        .to_string()
}

/// Every decision on `coupons` (deduplicated by event id), keyed by (user, claim id): its branch.
/// Reads from the beginning with assigned partitions until every claim has one.
async fn decisions(ep: &Endpoints, want: usize, procs: &[&Tidings]) -> BTreeMap<(String, String), String> {
    let topic = format!("{}coupons", ep.topic_prefix);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &ep.brokers)
        .set("group.id", "unused")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)).unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..md.topics()[0].partitions().len() as i32 {
        tpl.add_partition_offset(&topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let registry = RegistryClient::new(ep.schema_registry_url.as_str()).unwrap();
    let (_, reader) = registry.latest(&format!("{topic}-value")).await.unwrap();
    let (mut ids, mut by_claim) = (BTreeSet::new(), BTreeMap::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    while by_claim.len() < want {
        if Instant::now() > deadline {
            let logs: Vec<String> = procs.iter().map(|p| p.log_tail(30)).collect();
            panic!("only {} of {want} claims decided: {by_claim:?}\n{}", by_claim.len(), logs.join("\n"));
        }
        let Some(m) = consumer.poll(Duration::from_millis(200)) else { continue };
        let m = m.unwrap();
        let value = registry.decode(m.payload().unwrap(), reader).await.unwrap();
        let branch = union_branch_name(reader, &value, "payload").unwrap().to_string();
        let event = avro_to_json(&value);
        if !ids.insert(event["event_id"].as_str().unwrap().to_string()) {
            continue;
        }
        let p = &event["payload"];
        let claim = (p["user_id"].as_str().unwrap().to_string(), p["claim_id"].as_str().unwrap().to_string());
        assert!(by_claim.insert(claim.clone(), branch).is_none(), "claim {claim:?} decided twice differently");
    }
    by_claim
}

/// Starts `up --stages claims`, produces the coupon and its claims, and waits for the decisions.
async fn decided_run() -> (Tidings, Endpoints, sqlx::PgPool) {
    let brokers = brokers_or_skip().expect("TIDINGS_TEST_BROKERS");
    let (pool, db) = fresh_pg().await;
    let prefix = unique_prefix();
    let up = Up { brokers: &brokers, database_url: &db, prefix: &prefix, stages: "claims", registry_url: None };
    let mut proc_ = Tidings::spawn("claims", &up);
    let ep = proc_.endpoints(Duration::from_secs(60)).await;

    let mut lines = vec![record(json!({"CouponDefined": {"title": "Drop", "discount_percent": 20, "stock": STOCK,
        "claim_opens_at": 0, "claim_closes_at": i64::MAX / 2, "valid_for_micros": 86_400_000_000i64}}))];
    let log = claims();
    lines.extend(log.iter().map(|(u, k)| record(json!({"ClaimRequested": {"claim_id": k, "user_id": u}}))));
    let out = tidings(&ep, &["produce", "coupon-claims"], &lines.join("\n"));
    assert!(out.status.success(), "produce failed: {}", String::from_utf8_lossy(&out.stderr));

    let distinct: BTreeSet<&(String, String)> = log.iter().collect();
    let decided = decisions(&ep, distinct.len(), &[&proc_]).await;
    // The first STOCK users (all inside the window, after the definition) hold one each.
    let issued: BTreeSet<&str> =
        decided.iter().filter(|(_, b)| *b == "CouponIssued").map(|((u, _), _)| u.as_str()).collect();
    let first: BTreeSet<&str> = (0..STOCK).map(|i| format!("user-{i}")).map(|u| &*u.leak()).collect();
    assert_eq!(issued, first, "issued to the first {STOCK} claimants: {decided:?}");
    assert_eq!(decided.values().filter(|b| *b == "CouponIssued").count(), STOCK, "{decided:?}");
    assert_eq!(decided.values().filter(|b| *b == "ClaimRejected").count(), distinct.len() - STOCK, "{decided:?}");
    (proc_, ep, pool)
}

#[tokio::test(flavor = "multi_thread")]
async fn up_with_the_claims_stage_issues_exactly_the_stock() {
    let (mut proc_, _ep, _pool) = decided_run().await;
    common::sigterm(&mut proc_).await;
}

/// `tidings coupon verify --coupon COUPON`: its exit code and stdout.
fn verify(ep: &Endpoints) -> (Option<i32>, String) {
    let out = tidings(ep, &["coupon", "verify", "--coupon", COUPON], "");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code(), format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr)))
}

/// The verifier agrees with a correct run, and names a violation planted in the store (a holder
/// past the stock) and one planted on `coupons` (a second decision, an issue past the stock).
#[tokio::test(flavor = "multi_thread")]
async fn coupon_verify_agrees_with_the_stage_and_names_planted_violations() {
    // The process stays up: its embedded registry serves the schemas.
    let (mut proc_, ep, pool) = decided_run().await;
    let (code, out) = verify(&ep);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("coupon {COUPON}: stock {STOCK},")), "{out}");
    assert!(out.contains(&format!("{STOCK} issued")) && out.contains("All invariants hold"), "{out}");

    // A second holder row past the stock, for a user no CouponIssued names.
    sqlx::query(
        "INSERT INTO coupon_holders (coupon_id, user_id, partition, claim_id, code, expires_at)
         SELECT coupon_id, 'intruder', partition, 'k', 'PLANTED', 0 FROM coupon_holders WHERE coupon_id = $1 LIMIT 1",
    )
    .bind(COUPON)
    .execute(&pool)
    .await
    .unwrap();
    let (code, out) = verify(&ep);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("VIOLATION") && out.contains("\"intruder\"") && out.contains("coupon_holders"), "{out}");
    assert!(out.contains(&format!("more than its stock {STOCK}")), "{out}");
    sqlx::query("DELETE FROM coupon_holders WHERE user_id = 'intruder'").execute(&pool).await.unwrap();
    assert_eq!(verify(&ep).0, Some(0), "the planted row was the only violation");

    // An extra CouponIssued on `coupons` for a rejected claimant: past the stock, a second decision.
    let late = format!("user-{}", USERS - 1);
    let issued = json!({"event_id": uuid::Uuid::new_v4().to_string(), "occurred_at": 0, "coupon_id": COUPON,
        "payload": {"CouponIssued": {"user_id": late, "code": "PLANTED", "discount_percent": 20, "expires_at": 0,
        "claim_id": format!("key-{}", USERS - 1)}}});
    let out = tidings(&ep, &["produce", "coupons"], &issued.to_string());
    assert!(out.status.success(), "produce failed: {}", String::from_utf8_lossy(&out.stderr));
    let (code, out) = verify(&ep);
    assert_eq!(code, Some(1), "{out}");
    let named = |s: &str| out.lines().any(|l| l.contains("VIOLATION") && l.contains(s));
    assert!(named(&format!("claim (\"{late}\", \"key-{}\")", USERS - 1)) && named("2 decisions"), "{out}");
    assert!(named(&format!("user \"{late}\" was issued a coupon at")) && named("offset"), "{out}");
    assert!(named(&format!("more than its stock {STOCK}")), "{out}");
    common::sigterm(&mut proc_).await;
}
