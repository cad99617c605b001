//! The claim stage on Apache Kafka and PostgreSQL: a stampede of claims (duplicates, retried
//! claim ids, several ids per user) on one coupon, the stage dropped mid-run with decided but
//! uncommitted records and started again, and a stale owner whose partition was taken: exactly
//! `stock` issued, to the first claimants, no user twice, every claim exactly one decision.
//! Needs `TIDINGS_TEST_BROKERS` and `TIDINGS_TEST_PG` (see compose/).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::{encoder, env_on, project_topology, Env};
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value as Json};
use tidings_core::json_avro::{avro_to_json, json_to_avro, union_branch_name};
use tidings_core::kafka::{KafkaConfig, H_DLQ_OFFSET, H_DLQ_PARTITION, H_DLQ_REASON};
use tidings_core::RegistryClient;
use tidings_pipeline::stages::claims::{self, ClaimsConfig};
use tidings_pipeline::topology::apply::apply;
use tidings_store::Store;
use tokio_util::sync::CancellationToken;

const TIMEOUT: Duration = Duration::from_secs(60);
const COUPON: &str = "drop-1";
const STOCK: usize = 40;
const USERS: u64 = 60;
const CLAIMS: usize = 4 * STOCK;

/// The claims of the stampede, in log order: (user, claim id). A quarter retry an earlier claim
/// (same user, same id), a quarter are an earlier claimant's new id, the rest a random user's new id.
fn stampede(prefix: &str) -> Vec<(String, String)> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ prefix.len() as u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out: Vec<(String, String)> = Vec::new();
    for i in 0..CLAIMS {
        let pick = next();
        let claim = match (pick % 4, out.is_empty()) {
            (0, false) => out[(next() % out.len() as u64) as usize].clone(),
            (1, false) => (out[(next() % out.len() as u64) as usize].0.clone(), format!("{prefix}key-{i}")),
            _ => (format!("user-{}", next() % USERS), format!("{prefix}key-{i}")),
        };
        out.push(claim);
    }
    out
}

/// The users who must hold the coupon: the first `STOCK` distinct claimants in log order (every
/// claim is inside the window and after the definition).
fn expected_holders(log: &[(String, String)]) -> BTreeSet<String> {
    let mut seen = Vec::new();
    for (user, _) in log {
        if !seen.contains(user) {
            seen.push(user.clone());
        }
    }
    seen.into_iter().take(STOCK).collect()
}

struct Run {
    env: Env,
    store: Store,
    pg_url: String,
    cfg: ClaimsConfig,
    /// The coupon's partition and the offset after its last record.
    partition: i32,
    end: i64,
    log: Vec<(String, String)>,
    /// The offset of the record that is not Avro, if one was produced.
    garbage: Option<i64>,
    /// More coupons and their claims ([`Run::add_coupons`]).
    more: Vec<(String, Vec<(String, String)>)>,
}

/// Topics under a fresh prefix, the registry, a fresh PostgreSQL store, and the coupon's
/// definition followed by the stampede produced to `coupon-claims`.
async fn setup() -> Run {
    setup_with(None).await
}

/// [`setup`], with a record that is not Avro before claim `garbage_at`; returns its offset too.
async fn setup_with(garbage_at: Option<usize>) -> Run {
    let brokers = tidings_core::testing::brokers_or_skip().expect("a broker");
    let run = uuid::Uuid::new_v4().simple().to_string();
    let topo = project_topology().with_prefix(&format!("it-{run}-"));
    let admin: AdminClient<DefaultClientContext> = KafkaConfig::new(&brokers).admin().create().unwrap();
    apply(&topo, &admin, TIMEOUT).await.expect("topics");
    let env = env_on(KafkaConfig::new(&brokers), topo).await;
    let (store, pg_url) = tidings_store::testing::fresh_postgres().await.unwrap();
    let mut cfg = ClaimsConfig::new(env.kafka.clone(), env.registry_url.as_str().into(), &env.topo).unwrap();
    // A tiny cache: retried claims are answered from the store's rejections, looked up per batch.
    cfg.rejection_cache = 2;

    let (enc, schema) = encoder(&env, &format!("{}-value", cfg.input)).await;
    let producer: FutureProducer = env.kafka.producer().create().unwrap();
    let send = |payload: Json| {
        let event = json!({"event_id": uuid::Uuid::new_v4().to_string(), "occurred_at": 0, "coupon_id": COUPON,
            "payload": payload});
        let bytes = enc.encode(json_to_avro(schema, &event).unwrap()).unwrap();
        let (producer, topic) = (producer.clone(), cfg.input.clone());
        async move { producer.send(FutureRecord::to(&topic).key(COUPON).payload(&bytes), TIMEOUT).await.unwrap() }
    };
    let defined = send(json!({"CouponDefined": {"title": "Drop", "discount_percent": 30, "stock": STOCK,
        "claim_opens_at": 0, "claim_closes_at": i64::MAX / 2, "valid_for_micros": 86_400_000_000i64}}))
    .await;
    let log = stampede("");
    let partition = defined.partition;
    let mut last = defined;
    let mut garbage = None;
    for (i, (user, key)) in log.iter().enumerate() {
        if garbage_at == Some(i) {
            let rec = FutureRecord::to(&cfg.input).key(COUPON).payload("not a claim");
            garbage = Some(producer.send(rec, TIMEOUT).await.unwrap().offset);
        }
        last = send(json!({"ClaimRequested": {"claim_id": key, "user_id": user}})).await;
    }
    assert_eq!(last.partition, partition, "one key, one partition");
    Run { env, store, pg_url, cfg, partition, end: last.offset + 1, log, garbage, more: Vec::new() }
}

impl Run {
    fn spawn(
        &self,
        cfg: ClaimsConfig,
    ) -> (CancellationToken, tokio::task::JoinHandle<Result<(), tidings_core::StageError>>) {
        let token = CancellationToken::new();
        let task = tokio::spawn(claims::run(cfg, self.store.clone(), token.clone()));
        (token, task)
    }

    /// The stored next offset of the coupon's partition (`None` before the first commit).
    async fn committed(&self) -> Option<i64> {
        let row: Option<(Option<i64>,)> =
            sqlx::query_as("SELECT next_offset FROM claim_partitions WHERE consumer = $1 AND partition = $2")
                .bind(&self.cfg.group)
                .bind(self.partition)
                .fetch_optional(&sqlx::PgPool::connect(&self.pg_url).await.unwrap())
                .await
                .unwrap();
        row.and_then(|r| r.0)
    }

    async fn wait_committed(&self, offset: i64) {
        let deadline = Instant::now() + TIMEOUT;
        while self.committed().await != Some(offset) {
            assert!(Instant::now() < deadline, "offset {offset} not committed; at {:?}", self.committed().await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The sum of the stored next offsets of every partition: records committed, on topics
    /// that start at offset 0.
    async fn committed_records(&self) -> i64 {
        let pool = sqlx::PgPool::connect(&self.pg_url).await.unwrap();
        sqlx::query_as::<_, (Option<i64>,)>("SELECT sum(next_offset)::bigint FROM claim_partitions WHERE consumer = $1")
            .bind(&self.cfg.group)
            .fetch_one(&pool)
            .await
            .unwrap()
            .0
            .unwrap_or(0)
    }

    async fn wait_records_committed(&self, n: i64) {
        let deadline = Instant::now() + TIMEOUT;
        while self.committed_records().await != n {
            assert!(Instant::now() < deadline, "{n} records not committed; {}", self.committed_records().await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The highest epoch any partition was taken at.
    async fn max_epoch(&self) -> i64 {
        let pool = sqlx::PgPool::connect(&self.pg_url).await.unwrap();
        sqlx::query_as::<_, (Option<i64>,)>("SELECT max(epoch) FROM claim_partitions WHERE consumer = $1")
            .bind(&self.cfg.group)
            .fetch_one(&pool)
            .await
            .unwrap()
            .0
            .unwrap_or(0)
    }

    /// Defines coupons `ids` (the same stock) and produces a stampede on each, interleaved;
    /// returns how many records all coupons' partitions now hold.
    async fn add_coupons(&mut self, ids: &[&str]) -> i64 {
        let (enc, schema) = encoder(&self.env, &format!("{}-value", self.cfg.input)).await;
        let producer: FutureProducer = self.env.kafka.producer().create().unwrap();
        let send = |coupon: &str, payload: Json| {
            let event = json!({"event_id": uuid::Uuid::new_v4().to_string(), "occurred_at": 0, "coupon_id": coupon,
                "payload": payload});
            let bytes = enc.encode(json_to_avro(schema, &event).unwrap()).unwrap();
            let (producer, topic, coupon) = (producer.clone(), self.cfg.input.clone(), coupon.to_string());
            async move {
                producer.send(FutureRecord::to(&topic).key(&coupon).payload(&bytes), TIMEOUT).await.unwrap();
            }
        };
        for id in ids {
            send(
                id,
                json!({"CouponDefined": {"title": "Drop", "discount_percent": 30, "stock": STOCK,
                "claim_opens_at": 0, "claim_closes_at": i64::MAX / 2, "valid_for_micros": 86_400_000_000i64}}),
            )
            .await;
            self.more.push((id.to_string(), stampede(&format!("{id}/"))));
        }
        for i in 0..CLAIMS {
            for (coupon, log) in &self.more {
                let (user, key) = &log[i];
                send(coupon, json!({"ClaimRequested": {"claim_id": key, "user_id": user}})).await;
            }
        }
        let c: StreamConsumer = self.env.kafka.consumer("watermarks").create().unwrap();
        let mut total = 0;
        for p in 0..self.env.topo.topics["coupon-claims"].partitions {
            total += c.fetch_watermarks(&self.cfg.input, p, TIMEOUT).unwrap().1;
        }
        total
    }

    async fn holders(&self) -> i64 {
        let pool = sqlx::PgPool::connect(&self.pg_url).await.unwrap();
        sqlx::query_as::<_, (i64,)>("SELECT count(*) FROM coupon_holders").fetch_one(&pool).await.unwrap().0
    }
}

/// The claim decisions on `coupons` (each event id once; a re-produced event must be identical),
/// read until every distinct claim of `log` has one and, with `to_end` (once no stage runs), to
/// the end of the topic, so decisions produced again are compared too.
async fn decisions(run: &Run, to_end: bool) -> BTreeMap<(String, String), Json> {
    let wanted: BTreeSet<(String, String)> =
        run.log.iter().chain(run.more.iter().flat_map(|(_, log)| log)).cloned().collect();
    let c: StreamConsumer = run.env.kafka.consumer(&format!("reader-{}", uuid::Uuid::new_v4())).create().unwrap();
    c.subscribe(&[run.cfg.output.as_str()]).unwrap();
    let registry = RegistryClient::new(run.env.registry_url.as_str()).unwrap();
    let (_, reader) = registry.latest(&format!("{}-value", run.cfg.output)).await.unwrap();
    let mut by_id: HashMap<String, Json> = HashMap::new();
    let mut by_claim: BTreeMap<(String, String), Json> = BTreeMap::new();
    let mut records = 0;
    if to_end {
        for p in 0..run.env.topo.topics["coupons"].partitions {
            let (low, high) = c.fetch_watermarks(&run.cfg.output, p, TIMEOUT).unwrap();
            records += high - low;
        }
    }
    let deadline = Instant::now() + TIMEOUT;
    let mut read = 0;
    while by_claim.len() < wanted.len() || read < records {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, c.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {} claims decided", by_claim.len(), wanted.len()))
            .unwrap();
        read += 1;
        let value = registry.decode(m.payload().unwrap(), reader).await.unwrap();
        let branch = union_branch_name(reader, &value, "payload").unwrap().to_string();
        let mut event = avro_to_json(&value);
        event["branch"] = json!(branch);
        event["occurred_at"] = json!(null);
        let id = event["event_id"].as_str().unwrap().to_string();
        if let Some(before) = by_id.insert(id.clone(), event.clone()) {
            assert_eq!(before, event, "event {id} produced twice with different contents");
            continue;
        }
        if event["branch"].as_str().is_some_and(|b| b.starts_with("Redemption")) {
            continue;
        }
        let p = &event["payload"];
        let claim = (p["user_id"].as_str().unwrap().to_string(), p["claim_id"].as_str().unwrap().to_string());
        assert!(wanted.contains(&claim), "a decision of no claim: {event}");
        let twice = by_claim.insert(claim.clone(), event);
        assert!(twice.is_none(), "claim {claim:?} got two different decisions");
    }
    by_claim
}

/// Exactly `STOCK` issued, to the first claimants, no user twice; every other claim rejected with
/// `already_claimed` (its user holds one) or `sold_out`.
fn check_invariants(run: &Run, decided: &BTreeMap<(String, String), Json>) {
    check_coupon(COUPON, &run.log, decided);
}

/// [`check_invariants`] for coupon `coupon`, whose claims in log order are `log`.
fn check_coupon(coupon: &str, log: &[(String, String)], decided: &BTreeMap<(String, String), Json>) {
    let mut issued: BTreeMap<String, usize> = BTreeMap::new();
    for ((user, _), event) in decided.iter().filter(|(_, e)| e["coupon_id"] == coupon) {
        match event["branch"].as_str().unwrap() {
            "CouponIssued" => *issued.entry(user.clone()).or_default() += 1,
            "ClaimRejected" => {
                let reason = event["payload"]["reason"].as_str().unwrap();
                assert!(["already_claimed", "sold_out"].contains(&reason), "{event}");
            }
            other => panic!("unexpected decision {other}"),
        }
    }
    assert!(issued.values().all(|n| *n == 1), "a user was issued twice: {issued:?}");
    assert_eq!(issued.len(), STOCK, "issued to {} users", issued.len());
    assert_eq!(issued.keys().cloned().collect::<BTreeSet<_>>(), expected_holders(log), "{coupon}");
}

/// Dropped mid-run: every record decided and its event produced, the last partial batch not
/// committed; the next run decides those records again into the same events, and commits them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_dropped_mid_run_and_started_again_issues_exactly_the_stock() {
    let run = setup().await;
    let records = CLAIMS as i64 + 1;
    // Batches of 30 commit at once; the last 161 % 30 = 11 records would wait an hour.
    let mut first = run.cfg.clone();
    first.batch_size = 30;
    first.linger = Duration::from_secs(3600);
    assert_ne!(records % 30, 0);
    let (_, task) = run.spawn(first);
    let committed_before_drop = run.end - records % 30;
    run.wait_committed(committed_before_drop).await;
    // All decisions are out before the drop (the uncommitted ones too).
    let before = decisions(&run, false).await;
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert_eq!(run.committed().await, Some(committed_before_drop), "the dropped batch was not committed");

    let (token, task) = run.spawn(run.cfg.clone());
    run.wait_committed(run.end).await;
    token.cancel();
    task.await.unwrap().unwrap();
    let after = decisions(&run, true).await;
    assert_eq!(before, after, "decided again, the same decisions");
    check_invariants(&run, &after);
    assert_eq!(run.holders().await, STOCK as i64);
}

/// A new owner took the partition (its epoch bump, as its assignment does) while the old owner
/// held decided records: the old owner's commit writes nothing, and the new owner decides them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owner_commits_nothing_and_the_next_owner_decides_everything() {
    let run = setup().await;
    let mut stale = run.cfg.clone();
    stale.batch_size = 100_000;
    stale.linger = Duration::from_secs(3600);
    let (token, task) = run.spawn(stale);
    decisions(&run, false).await;
    let taken = run.store.assign_claim_partition(&run.cfg.group, run.partition).await.unwrap();
    assert_eq!(taken.next_offset, None);
    // Stopping commits the held batch, which its epoch now fences.
    token.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(run.committed().await, None, "the stale owner moved the offset");
    assert_eq!(run.holders().await, 0, "the stale owner wrote its state");

    let (token, task) = run.spawn(run.cfg.clone());
    run.wait_committed(run.end).await;
    token.cancel();
    task.await.unwrap().unwrap();
    check_invariants(&run, &decisions(&run, true).await);
    assert_eq!(run.holders().await, STOCK as i64);
}

/// A record that cannot be decoded is a dead letter with its reason and coordinates; the
/// partition moves on and the claims after it are decided as if it were not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_claim_is_a_dead_letter_and_the_partition_moves_on() {
    let run = setup_with(Some(CLAIMS / 2)).await;
    let (token, task) = run.spawn(run.cfg.clone());
    run.wait_committed(run.end).await;
    token.cancel();
    task.await.unwrap().unwrap();
    check_invariants(&run, &decisions(&run, true).await);
    let dead = common::read(&common::consumer(&run.env, &run.cfg.dead_letter), 1).await;
    let (key, value, headers, _, _) = &dead[0];
    assert_eq!((key.as_deref(), value.as_deref()), (Some(COUPON.as_bytes()), Some(&b"not a claim"[..])));
    let header = |k: &str| headers.iter().find(|(h, _)| h == k).map(|(_, v)| v.clone());
    assert_eq!(header(H_DLQ_OFFSET), run.garbage.map(|o| o.to_string()));
    assert_eq!(header(H_DLQ_PARTITION), Some(run.partition.to_string()));
    assert!(header(H_DLQ_REASON).is_some_and(|r| !r.is_empty()), "{headers:?}");
}

/// Two owners in one group over five coupons: the first holds an uncommitted batch when the
/// second joins (a rebalance moves partitions between them), then is dropped; the second takes
/// every partition over. Each coupon still issues exactly its stock to its first claimants.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn owners_joining_and_dropped_issue_exactly_each_coupons_stock() {
    let mut run = setup().await;
    let total = run.add_coupons(&["drop-2", "drop-3", "drop-4", "drop-5"]).await;
    assert_eq!(total, 5 * (CLAIMS as i64 + 1));
    let mut first = run.cfg.clone();
    first.batch_size = 30;
    first.linger = Duration::from_secs(3600);
    assert_ne!(total % 30, 0);
    let (_, a) = run.spawn(first);
    run.wait_records_committed(total - total % 30).await;
    let epoch = run.max_epoch().await;
    let mut second = run.cfg.clone();
    second.batch_size = 25;
    second.linger = Duration::from_millis(20);
    let (token, b) = run.spawn(second);
    // The join reassigned partitions (each assignment takes its partition at a new epoch).
    let deadline = Instant::now() + TIMEOUT;
    while run.max_epoch().await == epoch {
        assert!(Instant::now() < deadline, "no rebalance");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.abort();
    assert!(a.await.unwrap_err().is_cancelled());
    run.wait_records_committed(total).await;
    token.cancel();
    b.await.unwrap().unwrap();
    let decided = decisions(&run, true).await;
    check_invariants(&run, &decided);
    for (coupon, log) in &run.more {
        check_coupon(coupon, log, &decided);
    }
    assert_eq!(run.holders().await, 5 * STOCK as i64);
}

/// The state is kept by partition: started on a topic whose partition count differs from the one
/// its state was decided under, the stage refuses with a configuration error and decides nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_partition_count_than_the_states_is_refused() {
    let run = setup().await;
    let partitions = run.env.topo.topics["coupon-claims"].partitions;
    assert_eq!(run.store.pin_claim_partitions(&run.cfg.group, partitions * 2).await.unwrap(), partitions * 2);
    let err = claims::run(run.cfg.clone(), run.store.clone(), CancellationToken::new()).await.unwrap_err();
    assert!(matches!(err, tidings_core::StageError::Configuration(_)), "{err}");
    assert!(err.to_string().contains(&format!("has {partitions} partitions")), "{err}");
    assert_eq!(run.committed().await, None);
}

/// Every event on `coupons`, each id once (a re-produced event must be identical), read to the
/// end of the topic; only once no stage runs.
async fn events_to_end(run: &Run) -> Vec<Json> {
    let c: StreamConsumer = run.env.kafka.consumer(&format!("reader-{}", uuid::Uuid::new_v4())).create().unwrap();
    c.subscribe(&[run.cfg.output.as_str()]).unwrap();
    let registry = RegistryClient::new(run.env.registry_url.as_str()).unwrap();
    let (_, reader) = registry.latest(&format!("{}-value", run.cfg.output)).await.unwrap();
    let mut records = 0;
    for p in 0..run.env.topo.topics["coupons"].partitions {
        let (low, high) = c.fetch_watermarks(&run.cfg.output, p, TIMEOUT).unwrap();
        records += high - low;
    }
    let mut by_id: BTreeMap<String, Json> = BTreeMap::new();
    for _ in 0..records {
        let m = tokio::time::timeout(TIMEOUT, c.recv()).await.expect("a record").unwrap();
        let value = registry.decode(m.payload().unwrap(), reader).await.unwrap();
        let mut event = avro_to_json(&value);
        event["branch"] = json!(union_branch_name(reader, &value, "payload").unwrap());
        event["occurred_at"] = json!(null);
        let id = event["event_id"].as_str().unwrap().to_string();
        if let Some(before) = by_id.insert(id.clone(), event.clone()) {
            assert_eq!(before, event, "event {id} produced twice with different contents");
        }
    }
    by_id.into_values().collect()
}

/// An issued code redeemed for one order, the stage restarted, then the same code for a second
/// order, the first order's request retried and a stranger's request with a code not theirs:
/// exactly one redemption accepted, the second order refused `already_redeemed`, the stranger
/// `unknown_code`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issued_code_is_redeemed_for_one_order_only() {
    let run = setup().await;
    let holder = expected_holders(&run.log).into_iter().next().unwrap();
    let stranger = (0..USERS).map(|u| format!("user-{u}")).find(|u| !expected_holders(&run.log).contains(u)).unwrap();
    let code = claims::decide::code_for(COUPON, &holder);
    let (enc, schema) = encoder(&run.env, &format!("{}-value", run.cfg.input)).await;
    let producer: FutureProducer = run.env.kafka.producer().create().unwrap();
    let redeem = |user: String, code: String, order: &str| {
        let event = json!({"event_id": uuid::Uuid::new_v4().to_string(), "occurred_at": 0, "coupon_id": COUPON,
            "payload": {"RedemptionRequested": {"user_id": user, "code": code, "order_id": order}}});
        let bytes = enc.encode(json_to_avro(schema, &event).unwrap()).unwrap();
        let (producer, topic) = (producer.clone(), run.cfg.input.clone());
        async move { producer.send(FutureRecord::to(&topic).key(COUPON).payload(&bytes), TIMEOUT).await.unwrap().offset }
    };
    let stage = || async {
        let (token, task) = run.spawn(run.cfg.clone());
        let end = {
            let c: StreamConsumer = run.env.kafka.consumer("watermarks").create().unwrap();
            c.fetch_watermarks(&run.cfg.input, run.partition, TIMEOUT).unwrap().1
        };
        run.wait_committed(end).await;
        token.cancel();
        task.await.unwrap().unwrap();
    };
    redeem(holder.clone(), code.clone(), "order-1").await;
    stage().await;
    redeem(holder.clone(), code.clone(), "order-2").await;
    redeem(holder.clone(), code.clone(), "order-1").await;
    redeem(stranger, code.clone(), "order-3").await;
    stage().await;

    let redemptions: Vec<Json> = events_to_end(&run)
        .await
        .into_iter()
        .filter(|e| e["branch"].as_str().unwrap().starts_with("Redemption"))
        .collect();
    let outcome = |order: &str| {
        let of: Vec<&Json> = redemptions.iter().filter(|e| e["payload"]["order_id"] == order).collect();
        assert_eq!(of.len(), 1, "{order}: {of:?}");
        (of[0]["branch"].as_str().unwrap().to_string(), of[0]["payload"]["reason"].as_str().map(str::to_string))
    };
    assert_eq!(outcome("order-1"), ("RedemptionAccepted".to_string(), None));
    assert_eq!(outcome("order-2"), ("RedemptionRefused".to_string(), Some("already_redeemed".to_string())));
    assert_eq!(outcome("order-3"), ("RedemptionRefused".to_string(), Some("unknown_code".to_string())));
    let accepted = redemptions.iter().filter(|e| e["branch"] == "RedemptionAccepted").count();
    assert_eq!(accepted, 1, "{redemptions:?}");
}
