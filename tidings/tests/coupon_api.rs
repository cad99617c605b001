//! The coupon API of `tidings up --stages templating,persistence,claims,gateway` on Apache Kafka
//! and PostgreSQL: defining (services only, every bad field named), listing and reading coupons
//! with their stock left, claims answered with the claim stage's decision (idempotent by key),
//! the issued coupon in the claimant's inbox, and one code redeemed from two orders at once.
//! Needs `TIDINGS_TEST_BROKERS` and `TIDINGS_TEST_PG`.

mod common;

use std::time::Duration;

use common::{brokers_or_skip, eventually, fresh_pg, ingest_token, unique_prefix, user_token, Endpoints, Tidings, Up};
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};

/// Starts `up` with the claim stage and the gateway. The claim wait is long so that the answers
/// of this test are decisions, never 202 because the stage was slow on a busy machine.
async fn start(extra_env: &[(&'static str, &'static str)]) -> (Tidings, Endpoints, Client) {
    let brokers = brokers_or_skip().expect("TIDINGS_TEST_BROKERS");
    let (_pool, db) = fresh_pg().await;
    let prefix = unique_prefix();
    let up = Up {
        brokers: &brokers,
        database_url: &db,
        prefix: &prefix,
        stages: "templating,persistence,claims,gateway",
        registry_url: None,
    };
    let mut env = vec![("TIDINGS_COUPON_CLAIM_WAIT_MS", "15000"), ("TIDINGS_COUPON_REDEMPTION_WAIT_MS", "15000")];
    env.extend_from_slice(extra_env);
    let mut proc_ = Tidings::spawn_env("coupons", &up, &env);
    let ep = proc_.endpoints(Duration::from_secs(60)).await;
    let http = Client::new();
    common::await_ready(&http, &ep.http, &[&proc_]).await;
    (proc_, ep, http)
}

/// A request to the gateway with `bearer` (if any), `key` as Idempotency-Key (if any) and `body`
/// (if any): the status and the JSON answer (null if none).
async fn call(
    http: &Client,
    method: Method,
    url: &str,
    bearer: Option<&str>,
    key: Option<&str>,
    body: Option<&Value>,
) -> (StatusCode, Value) {
    let mut req = http.request(method, url);
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn coupon(id: &str, stock: u32) -> Value {
    json!({"id": id, "title": "Spring drop", "discount_percent": 20, "stock": stock,
           "claim_closes_at": "2099-01-01T00:00:00Z", "valid_for_secs": 86_400})
}

fn code_of(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

/// Defines `body` as a service; it must be created (201).
async fn create(http: &Client, ep: &Endpoints, body: &Value, proc_: &Tidings) -> Value {
    let url = format!("{}/v1/coupons", ep.http);
    let (status, got) = call(http, Method::POST, &url, Some(ingest_token()), None, Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{got}\n{}", proc_.log_tail(30));
    got
}

async fn claim(http: &Client, ep: &Endpoints, coupon: &str, user: &str, key: &str) -> (StatusCode, Value) {
    let url = format!("{}/v1/coupons/{coupon}/claims", ep.http);
    call(http, Method::POST, &url, Some(&user_token(user)), Some(key), None).await
}

/// `tidings coupon create` against the running `up`, with a title, closing and validity besides `args`.
fn create_cli(ep: &Endpoints, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tidings"))
        .args(["coupon", "create", "--title", "From the CLI", "--closes-at", "2099-01-01T00:00:00Z"])
        .args(["--valid-for-secs", "3600"])
        .args(args)
        .args(["--brokers", &ep.brokers, "--schema-registry-url", &ep.schema_registry_url])
        .args(["--topic-prefix", &ep.topic_prefix])
        .arg("--topology")
        .arg(common::topology_path())
        .env("TIDINGS_LOG", "warn")
        .output()
        .expect("running tidings coupon create")
}

/// `GET url` as `user` until its 200 answer satisfies `done` (30 s at most): the answer.
async fn settled(http: &Client, url: &str, user: &str, proc_: &Tidings, done: impl Fn(&Value) -> bool) -> Value {
    let what = format!("GET {url} as {user}");
    eventually(&what, Duration::from_secs(30), Duration::from_millis(50), &[proc_], || async {
        let (status, body) = call(http, Method::GET, url, Some(&user_token(user)), None, None).await;
        if status == StatusCode::OK && done(&body) {
            Ok(body)
        } else {
            Err(format!("{status}: {body}"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn coupons_are_defined_read_and_claimed_with_their_decisions() {
    let (mut proc_, ep, http) = start(&[]).await;
    let coupons = format!("{}/v1/coupons", ep.http);
    let alice = user_token("alice");

    // Defining: services only; every bad field named at once.
    let (status, body) = call(&http, Method::POST, &coupons, None, None, Some(&coupon("drop", 2))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, body) = call(&http, Method::POST, &coupons, Some(&alice), None, Some(&coupon("drop", 2))).await;
    assert_eq!((status, code_of(&body)), (StatusCode::FORBIDDEN, "forbidden"), "{body}");
    let bad = json!({"id": "no spaces", "title": "", "discount_percent": 101, "stock": 0,
        "claim_opens_at": "soon", "claim_closes_at": "2000-01-01", "valid_for_secs": -1, "per_user_limit": 2});
    let (status, body) = call(&http, Method::POST, &coupons, Some(ingest_token()), None, Some(&bad)).await;
    assert_eq!((status, code_of(&body)), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_coupon"), "{body}");
    let mut named: Vec<&str> = body["error"]["path"].as_str().unwrap().split(',').collect();
    named.sort();
    let every = [
        "claim_closes_at",
        "claim_opens_at",
        "discount_percent",
        "id",
        "per_user_limit",
        "stock",
        "title",
        "valid_for_secs",
    ];
    assert_eq!(named, every, "{body}");

    let created = create(&http, &ep, &coupon("drop", 2), &proc_).await;
    assert_eq!((created["stock_left"].as_u64(), created["status"].as_str()), (Some(2), Some("open")), "{created}");
    // The same definition again is a retry; another one under the same id is refused.
    let (status, again) =
        call(&http, Method::POST, &coupons, Some(ingest_token()), None, Some(&coupon("drop", 2))).await;
    assert_eq!((status, again["id"].as_str()), (StatusCode::OK, Some("drop")), "{again}");
    let (status, body) =
        call(&http, Method::POST, &coupons, Some(ingest_token()), None, Some(&coupon("drop", 3))).await;
    assert_eq!((status, code_of(&body)), (StatusCode::CONFLICT, "coupon_exists"), "{body}");

    // Reading: users only (a service token never acts as a user).
    assert_eq!(call(&http, Method::GET, &coupons, None, None, None).await.0, StatusCode::UNAUTHORIZED);
    let (status, _) = call(&http, Method::GET, &coupons, Some(ingest_token()), None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, list) = call(&http, Method::GET, &coupons, Some(&alice), None, None).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["coupons"][0]["id"], "drop", "{list}");
    assert_eq!(list["coupons"][0]["stock_left"], 2, "{list}");
    assert!(list["as_of"].is_string(), "{list}");
    let (status, body) = call(&http, Method::GET, &format!("{coupons}/nope"), Some(&alice), None, None).await;
    assert_eq!((status, code_of(&body)), (StatusCode::NOT_FOUND, "unknown_coupon"), "{body}");

    // Claims: the key is required and checked; an unknown coupon produces nothing.
    let claims_topic = format!("{}coupon-claims", ep.topic_prefix);
    let before = common::high_watermarks(&ep.brokers, &claims_topic).await;
    let url = format!("{coupons}/drop/claims");
    let (status, body) = call(&http, Method::POST, &url, Some(&alice), None, None).await;
    assert_eq!((status, code_of(&body)), (StatusCode::BAD_REQUEST, "idempotency_key_required"), "{body}");
    let (status, body) = claim(&http, &ep, "drop", "alice", "has space").await;
    assert_eq!((status, code_of(&body)), (StatusCode::BAD_REQUEST, "bad_idempotency_key"), "{body}");
    let (status, body) =
        call(&http, Method::POST, &url, Some(&alice), Some("k-0"), Some(&json!({"user_id": "bob"}))).await;
    assert_eq!((status, code_of(&body)), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"), "{body}");
    let (status, _) = call(&http, Method::POST, &url, Some(ingest_token()), Some("k-0"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a service token claims for nobody");
    let (status, body) = claim(&http, &ep, "nope", "alice", "k-1").await;
    assert_eq!((status, code_of(&body)), (StatusCode::NOT_FOUND, "unknown_coupon"), "{body}");
    assert_eq!(common::high_watermarks(&ep.brokers, &claims_topic).await, before, "a refused claim is not produced");

    let (status, first) = claim(&http, &ep, "drop", "alice", "k-1").await;
    assert_eq!(status, StatusCode::CREATED, "{first}\n{}", proc_.log_tail(30));
    assert_eq!((first["status"].as_str(), first["claim_id"].as_str()), (Some("issued"), Some("k-1")), "{first}");
    let code = first["code"].as_str().expect("a code").to_string();
    let (status, retry) = claim(&http, &ep, "drop", "alice", "k-1").await;
    assert_eq!((status, retry["code"].as_str()), (StatusCode::CREATED, Some(code.as_str())), "the same claim: {retry}");
    let (status, body) = claim(&http, &ep, "drop", "alice", "k-2").await;
    assert_eq!((status, code_of(&body)), (StatusCode::CONFLICT, "already_claimed"), "{body}");
    let (status, body) = claim(&http, &ep, "drop", "bob", "b-1").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = claim(&http, &ep, "drop", "carol", "c-1").await;
    assert_eq!((status, code_of(&body)), (StatusCode::CONFLICT, "sold_out"), "{body}");

    // Each user's decided claim and the stock left, from the store: the stage commits a batch
    // after producing its decisions, so the store may lag the answers a moment.
    let me = format!("{coupons}/drop/claims/me");
    let mine = settled(&http, &me, "alice", &proc_, |b| b["status"] == "issued").await;
    assert_eq!((mine["code"].as_str(), mine["redeemed"].as_bool()), (Some(code.as_str()), Some(false)), "{mine}");
    let carols = settled(&http, &me, "carol", &proc_, |b| b["status"] == "rejected").await;
    assert_eq!(carols["reason"], "sold_out", "{carols}");
    let (status, body) = call(&http, Method::GET, &me, Some(&user_token("dave")), None, None).await;
    assert_eq!((status, code_of(&body)), (StatusCode::NOT_FOUND, "no_decided_claim"), "{body}");
    let drop = settled(&http, &format!("{coupons}/drop"), "alice", &proc_, |b| b["stock_left"] == 0).await;
    assert_eq!(drop["status"], "sold_out", "{drop}");

    // `tidings coupon create` checks as the API does (exit 64 naming each bad flag, nothing
    // produced) and defines a coupon the API then serves.
    let before = common::high_watermarks(&ep.brokers, &claims_topic).await;
    let bad = create_cli(&ep, &["--id", "cli drop", "--stock", "0", "--discount-percent", "5"]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("--id:") && stderr.contains("--stock:") && !stderr.contains("--discount-percent"),
        "{stderr}"
    );
    assert_eq!(common::high_watermarks(&ep.brokers, &claims_topic).await, before, "nothing produced");
    let good = create_cli(&ep, &["--id", "cli-drop", "--stock", "7", "--discount-percent", "5"]);
    assert!(good.status.success(), "{}", String::from_utf8_lossy(&good.stderr));
    let cli = settled(&http, &format!("{coupons}/cli-drop"), "alice", &proc_, |b| b["id"] == "cli-drop").await;
    assert_eq!((cli["stock_left"].as_u64(), cli["discount_percent"].as_u64()), (Some(7), Some(5)), "{cli}");

    // The issued coupon reaches alice's inbox as a notification.
    let inbox = format!("{}/v1/notifications", ep.http);
    eventually(
        "coupon.issued in alice's inbox",
        Duration::from_secs(30),
        Duration::from_millis(200),
        &[&proc_],
        || {
            let (http, inbox, alice) = (http.clone(), inbox.clone(), alice.clone());
            async move {
                let (status, page) = call(&http, Method::GET, &inbox, Some(&alice), None, None).await;
                let items = page["items"].as_array().cloned().unwrap_or_default();
                if status == StatusCode::OK && items.iter().any(|i| i["kind"] == "coupon.issued") {
                    Ok(())
                } else {
                    Err(format!("{status}: {page}"))
                }
            }
        },
    )
    .await;
    common::sigterm(&mut proc_).await;
}

/// Done 2: one issued coupon redeemed from two orders at the same time is redeemed exactly once;
/// the accepted order retried is accepted again, the other is refused `already_redeemed`.
#[tokio::test(flavor = "multi_thread")]
async fn one_code_redeemed_from_two_orders_at_once_is_redeemed_once() {
    let (mut proc_, ep, http) = start(&[]).await;
    create(&http, &ep, &coupon("single", 1), &proc_).await;
    let (status, issued) = claim(&http, &ep, "single", "alice", "k").await;
    assert_eq!(status, StatusCode::CREATED, "{issued}");
    let code = issued["code"].as_str().unwrap().to_string();
    let url = format!("{}/v1/coupons/single/redemptions", ep.http);
    let order = |o: &str| json!({"user_id": "alice", "code": code, "order_id": o});

    // Services only, and well-formed.
    let (status, body) = call(&http, Method::POST, &url, Some(&user_token("alice")), None, Some(&order("o-0"))).await;
    assert_eq!((status, code_of(&body)), (StatusCode::FORBIDDEN, "forbidden"), "{body}");
    assert_eq!(call(&http, Method::POST, &url, None, None, Some(&order("o-0"))).await.0, StatusCode::UNAUTHORIZED);
    let (status, body) = call(&http, Method::POST, &url, Some(ingest_token()), None, Some(&json!({"code": 1}))).await;
    assert_eq!((status, code_of(&body)), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_redemption"), "{body}");

    let (one, two) = (order("o-1"), order("o-2"));
    let ((s1, b1), (s2, b2)) = tokio::join!(
        call(&http, Method::POST, &url, Some(ingest_token()), None, Some(&one)),
        call(&http, Method::POST, &url, Some(ingest_token()), None, Some(&two)),
    );
    let mut answers = [(s1, b1, "o-1"), (s2, b2, "o-2")];
    answers.sort_by_key(|(s, ..)| *s);
    let [(won, won_body, winner), (lost, lost_body, loser)] = answers;
    assert_eq!(
        (won, lost),
        (StatusCode::OK, StatusCode::CONFLICT),
        "exactly one accepted: {won_body} / {lost_body}\n{}",
        proc_.log_tail(30)
    );
    assert_eq!((won_body["status"].as_str(), won_body["order_id"].as_str()), (Some("redeemed"), Some(winner)));
    assert_eq!(code_of(&lost_body), "already_redeemed", "{lost_body}");

    // Retries get the same decisions.
    let (status, again) = call(&http, Method::POST, &url, Some(ingest_token()), None, Some(&order(winner))).await;
    assert_eq!((status, again["order_id"].as_str()), (StatusCode::OK, Some(winner)), "{again}");
    let (status, body) = call(&http, Method::POST, &url, Some(ingest_token()), None, Some(&order(loser))).await;
    assert_eq!((status, code_of(&body)), (StatusCode::CONFLICT, "already_redeemed"), "{body}");
    let stranger = json!({"user_id": "mallory", "code": code, "order_id": "o-3"});
    let (status, body) = call(&http, Method::POST, &url, Some(ingest_token()), None, Some(&stranger)).await;
    assert_eq!((status, code_of(&body)), (StatusCode::CONFLICT, "unknown_code"), "{body}");

    let me = format!("{}/v1/coupons/single/claims/me", ep.http);
    settled(&http, &me, "alice", &proc_, |b| b["redeemed"] == true).await;
    common::sigterm(&mut proc_).await;
}

/// Past `--coupon-max-waiting` nothing waits: a claim is produced and answers 202 at once (its
/// decision is found later under `claims/me`), a redemption answers 503 and is not produced.
#[tokio::test(flavor = "multi_thread")]
async fn past_the_waiting_bound_claims_answer_pending_and_redemptions_are_refused() {
    let (mut proc_, ep, http) = start(&[("TIDINGS_COUPON_MAX_WAITING", "0")]).await;
    create(&http, &ep, &coupon("bounded", 1), &proc_).await;
    let started = std::time::Instant::now();
    let resp = http
        .post(format!("{}/v1/coupons/bounded/claims", ep.http))
        .bearer_auth(user_token("alice"))
        .header("idempotency-key", "k")
        .send()
        .await
        .unwrap();
    let location = resp.headers().get("location").map(|v| v.to_str().unwrap().to_string());
    let (status, body) = (resp.status(), resp.json::<Value>().await.unwrap());
    assert_eq!((status, body["status"].as_str()), (StatusCode::ACCEPTED, Some("pending")), "{body}");
    assert_eq!(location.as_deref(), Some("/v1/coupons/bounded/claims/me"));
    assert!(started.elapsed() < Duration::from_secs(10), "answered without the 15 s claim wait");
    let me = format!("{}/v1/coupons/bounded/claims/me", ep.http);
    let mine = settled(&http, &me, "alice", &proc_, |b| b["status"] == "issued").await;

    let claims_topic = format!("{}coupon-claims", ep.topic_prefix);
    let before = common::high_watermarks(&ep.brokers, &claims_topic).await;
    let url = format!("{}/v1/coupons/bounded/redemptions", ep.http);
    let order = json!({"user_id": "alice", "code": mine["code"], "order_id": "o-1"});
    let resp = http.post(&url).bearer_auth(ingest_token()).json(&order).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string()), Some("1".into()));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(code_of(&body), "decision_pending", "{body}");
    assert_eq!(common::high_watermarks(&ep.brokers, &claims_topic).await, before, "the redemption was not produced");
    common::sigterm(&mut proc_).await;
}
