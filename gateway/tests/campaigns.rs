//! The campaign endpoints served for real on a local port over a SQLite store, producing to a mock
//! Kafka cluster under a stand-in schema registry holding schemas/campaign_event.avsc: a service
//! token only, 422 naming every problem with nothing written, dry-run counts (overlapping segments,
//! opt-outs, quiet hours now), one launch record, idempotent retries, 409, list, show and cancel.

use axum::routing::get;
use chrono::Timelike;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tidings_core::client_stats::ClientStats;
use tidings_core::RegistryClient;
use tidings_gateway::auth::{self, AuthConfig, Key};
use tidings_gateway::campaigns::{Campaigns, CampaignsConfig, CampaignsState};
use tidings_gateway::preferences::Category;
use tidings_gateway::produce::EventProducer;
use tidings_gateway::service_auth::ServiceTokens;
use tidings_gateway::{Parts, Readiness};
use tidings_store::preferences::{Preferences, QuietHours};
use tidings_store::segments::{self, OnError, SegmentChange};
use tidings_store::Store;

const SERVICE: &str = "svc-marketing-0123456789";
const SECRET: &[u8] = b"test-secret";
const TOPIC: &str = "campaigns";

/// A registry answering only what the producer asks: the latest `campaigns-value` and its id.
async fn registry() -> String {
    let schema =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas/campaign_event.avsc")).unwrap();
    let latest = json!({"subject": "campaigns-value", "version": 1, "id": 7, "schema": schema});
    let by_id = json!({"schema": schema});
    let app = axum::Router::new()
        .route("/subjects/campaigns-value/versions/latest", get(move || async move { axum::Json(latest) }))
        .route("/schemas/ids/7", get(move || async move { axum::Json(by_id) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

struct Server {
    base: String,
    http: reqwest::Client,
    store: Store,
    kafka: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    _dir: tempfile::TempDir,
}

async fn start() -> Server {
    let (store, dir) = tidings_store::testing::fresh_sqlite().await.unwrap();
    let kafka = MockCluster::new(1).unwrap();
    kafka.create_topic(TOPIC, 3, 1).unwrap();
    let producer: FutureProducer<ClientStats> = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .create_with_context(ClientStats::new("test"))
        .unwrap();
    let events = Arc::new(EventProducer::new(RegistryClient::new(registry().await.as_str()).unwrap(), producer));
    let categories = ["orders", "campaigns"]
        .into_iter()
        .map(|n| Category { name: n.into(), critical: false, description: String::new() })
        .chain([Category { name: "payment".into(), critical: true, description: String::new() }])
        .collect();
    let campaigns = Campaigns {
        store: store.clone(),
        events: Some(events),
        topic: TOPIC.into(),
        categories: Arc::new(categories),
        config: CampaignsConfig {
            max_inline_users: 5,
            max_segments: 3,
            max_body_bytes: 16 * 1024,
            ..CampaignsConfig::default()
        },
    };
    let users = AuthConfig { keys: vec![Key::hs256(SECRET)], ..Default::default() };
    let state =
        CampaignsState { campaigns, tokens: ServiceTokens::new([SERVICE]).unwrap(), users: Some(Arc::new(users)) };
    let app =
        tidings_gateway::app(Parts { campaigns: Some(Arc::new(state)), ..Default::default() }, Readiness::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Server { base, http: reqwest::Client::new(), store, kafka, _dir: dir }
}

impl Server {
    async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let r = self.http.post(format!("{}{path}", self.base)).bearer_auth(SERVICE).json(body).send().await.unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self.http.get(format!("{}{path}", self.base)).bearer_auth(SERVICE).send().await.unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn segment(&self, name: &str, ids: &[&str]) {
        let ids = ids.iter().map(|s| s.to_string()).collect();
        let batches = segments::batches_of(ids, 100);
        segments::import(
            &self.store,
            name,
            SegmentChange::Replace,
            batches,
            OnError::Refuse,
            10,
            Duration::from_secs(60),
            |_| {},
        )
        .await
        .unwrap();
    }

    /// Every record on the campaigns topic, as (key, event JSON without the wire header).
    fn records(&self) -> Vec<(String, Value)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.kafka.bootstrap_servers())
            .set("group.id", "test-reader")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let schema = apache_avro::Schema::parse_str(
            &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas/campaign_event.avsc")).unwrap(),
        )
        .unwrap();
        let reader = apache_avro::reader::datum::GenericDatumReader::builder(&schema).build().unwrap();
        let mut total = 0;
        let mut tpl = TopicPartitionList::new();
        for p in 0..3 {
            let (_, high) = consumer.fetch_watermarks(TOPIC, p, Duration::from_secs(5)).unwrap();
            total += high;
            tpl.add_partition_offset(TOPIC, p, Offset::Beginning).unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while (out.len() as i64) < total {
            assert!(std::time::Instant::now() < deadline, "read {} of {total} records", out.len());
            let Some(m) = consumer.poll(Duration::from_millis(200)) else { continue };
            let m = m.unwrap();
            let payload = m.payload().unwrap();
            assert_eq!(&payload[..5], &[0, 0, 0, 0, 7], "Confluent framing with the registry's id");
            let value = reader.read_value(&mut &payload[5..]).unwrap();
            let json: Value = serde_json::Value::try_from(value).unwrap();
            out.push((String::from_utf8(m.key().unwrap().to_vec()).unwrap(), json));
        }
        out
    }

    async fn sql(&self, statement: &str) {
        let Store::Sqlite(pool) = &self.store else { unreachable!() };
        sqlx::query(statement).execute(pool).await.unwrap();
    }
}

fn launch(id: &str) -> Value {
    json!({"campaign_id": id, "category": "campaigns", "title": "Hello {{ recipient }}", "body": "Sale ({{ locale }})",
           "locales": {"ko": {"title": "안녕 {{ recipient }}", "body": "세일"}}, "audience": {"user_ids": ["u1", "u2"]}})
}

/// The launched payload of a record (unions decode as their branch's value).
fn launched(event: &Value) -> &Value {
    &event["payload"]
}

#[tokio::test]
async fn only_a_service_token_reaches_campaigns() {
    let s = start().await;
    let user = auth::mint_hs256(SECRET, "u1", Duration::from_secs(60), None, None).unwrap();
    for (method, path) in [
        (reqwest::Method::POST, "/v1/campaigns"),
        (reqwest::Method::GET, "/v1/campaigns"),
        (reqwest::Method::GET, "/v1/campaigns/c1"),
        (reqwest::Method::POST, "/v1/campaigns/c1/cancel"),
    ] {
        let url = format!("{}{path}", s.base);
        let none = s.http.request(method.clone(), &url).json(&launch("c1")).send().await.unwrap();
        assert_eq!(none.status(), StatusCode::UNAUTHORIZED, "{method} {path} without a token");
        let wrong = s.http.request(method.clone(), &url).bearer_auth("svc-unknown-0123456789").send().await.unwrap();
        assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED, "{method} {path} with an unknown token");
        let as_user = s.http.request(method.clone(), &url).bearer_auth(&user).json(&launch("c1")).send().await.unwrap();
        assert_eq!(as_user.status(), StatusCode::FORBIDDEN, "{method} {path} with a user token");
    }
    assert!(s.store.campaign("c1").await.unwrap().is_none());
    assert!(s.records().is_empty());
}

#[tokio::test]
async fn a_bad_launch_names_every_problem_and_writes_nothing() {
    let s = start().await;
    s.segment("vip", &["u1"]).await;
    s.segment("gone", &["u9"]).await;
    s.segment("gone", &[]).await;
    let body = json!({"campaign_id": "c1", "category": "weather", "title": "{{ recipient", "body": "{{ nobody }}",
        "audience": {"segments": ["vip", "nosuch", "gone"], "user_ids": ["a", "b", "c", "d", "e", "f"]},
        "send_at": "2020-01-01T00:00:00Z"});
    let (status, answer) = s.post("/v1/campaigns", &body).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["error"]["code"], "invalid_campaign");
    let mut paths: Vec<&str> =
        answer["error"]["problems"].as_array().unwrap().iter().map(|p| p["path"].as_str().unwrap()).collect();
    paths.sort();
    assert_eq!(
        paths,
        ["audience.segments[1]", "audience.segments[2]", "audience.user_ids", "body", "category", "send_at", "title"],
        "{answer}"
    );
    let message = answer["error"]["message"].as_str().unwrap();
    for words in
        ["unknown category \"weather\"", "no segment \"nosuch\"", "segment \"gone\" has no members", "in the past"]
    {
        assert!(message.contains(words), "{words:?} in {message}");
    }
    // An empty audience, and a body that is not JSON.
    let (status, answer) =
        s.post("/v1/campaigns", &json!({"category": "campaigns", "title": "t", "body": "b", "audience": {}})).await;
    assert_eq!(
        (status, answer["error"]["problems"][0]["path"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, json!("audience"))
    );
    let r = s.http.post(format!("{}/v1/campaigns", s.base)).bearer_auth(SERVICE).body("{").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    // The limits on segments and on the body.
    let mut many = launch("c2");
    many["audience"] = json!({"segments": ["s1", "s2", "s3", "s4"]});
    let (status, answer) = s.post("/v1/campaigns", &many).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    let problems = answer["error"]["problems"].as_array().unwrap();
    assert_eq!(problems[0], json!({"path": "audience.segments", "message": "4 segments, more than 3"}), "{answer}");
    assert_eq!(problems.len(), 4, "the segments over the limit are not looked up: {answer}");
    let mut large = launch("c3");
    large["body"] = json!("x".repeat(16 * 1024));
    let (status, _) = s.post("/v1/campaigns", &large).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(s.store.campaigns(None, 10).await.unwrap().is_empty(), "a refused launch stored a campaign");
    assert!(s.records().is_empty(), "a refused launch produced a record");
}

/// A quiet-hours window holding the current UTC time (`inside`) or two hours away from it.
fn window_around_now(inside: bool) -> QuietHours {
    let now = chrono::Utc::now();
    let minute = (now.hour() * 60 + now.minute()) as u16;
    let shift = |d: i32| ((i32::from(minute) + d).rem_euclid(1440)) as u16;
    if inside {
        QuietHours { start_minute: shift(-60), end_minute: shift(60) }
    } else {
        QuietHours { start_minute: shift(120), end_minute: shift(180) }
    }
}

#[tokio::test]
async fn a_dry_run_counts_each_user_once_after_opt_outs_and_quiet_hours() {
    let s = start().await;
    s.segment("a", &["u1", "u2", "u3"]).await;
    s.segment("b", &["u3", "u4"]).await;
    let out = Preferences { opt_out: vec!["campaigns".into()], ..Preferences::default() };
    s.store.set_preferences("u2", &out, 1).await.unwrap();
    let quiet = Preferences { quiet_hours: Some(window_around_now(true)), ..Preferences::default() };
    s.store.set_preferences("u3", &quiet, 1).await.unwrap();
    let later = Preferences { quiet_hours: Some(window_around_now(false)), ..Preferences::default() };
    s.store.set_preferences("u5", &later, 1).await.unwrap();
    let mut body = launch("dry");
    body["audience"] = json!({"segments": ["a", "b"], "user_ids": ["u4", "u5"]});
    body["dry_run"] = json!(true);
    let (status, answer) = s.post("/v1/campaigns", &body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        answer,
        json!({"audience": 5, "opted_out": 1, "in_quiet_hours_now": 1, "will_receive": 4, "send_at": null,
               "estimated_send_ms": 1, "dry_run": true})
    );
    // A critical category holds nobody.
    body["category"] = json!("payment");
    let (_, answer) = s.post("/v1/campaigns", &body).await;
    assert_eq!((answer["in_quiet_hours_now"].clone(), answer["opted_out"].clone()), (json!(0), json!(0)), "{answer}");
    assert!(s.store.campaign("dry").await.unwrap().is_none(), "a dry run stored the campaign");
    assert!(s.records().is_empty(), "a dry run produced a record");
}

#[tokio::test]
async fn a_launch_produces_one_record_and_a_retry_is_idempotent() {
    let s = start().await;
    let (status, answer) = s.post("/v1/campaigns", &launch("spring")).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!((answer["campaign_id"].clone(), answer["status"].clone()), (json!("spring"), json!("sending")));
    assert_eq!((answer["audience"].clone(), answer["will_receive"].clone()), (json!(2), json!(2)));
    let records = s.records();
    assert_eq!(records.len(), 1, "{records:?}");
    let (key, event) = &records[0];
    assert_eq!((key.as_str(), event["event_id"].clone()), ("spring", json!("campaign:spring")));
    let p = launched(event);
    assert_eq!((p["category"].clone(), p["title"].clone()), (json!("campaigns"), json!("Hello {{ recipient }}")));
    assert_eq!((p["user_ids"].clone(), p["locales"][0]["locale"].clone()), (json!(["u1", "u2"]), json!("ko")));
    let stored = s.store.campaign("spring").await.unwrap().unwrap();
    assert_eq!(
        (stored.audience_estimate, stored.event_id.as_str(), stored.launched_by.as_str()),
        (Some(2), "campaign:spring", "api")
    );

    // Templating has picked it up: a retry stores and produces nothing.
    s.sql("INSERT INTO campaign_progress (campaign_id, event_id, started_at, updated_at) VALUES ('spring', 'campaign:spring', 1, 1)").await;
    let (status, answer) = s.post("/v1/campaigns", &launch("spring")).await;
    assert_eq!((status, answer["campaign_id"].clone()), (StatusCode::OK, json!("spring")), "{answer}");
    assert_eq!(s.records().len(), 1, "a retry after templating started produced again");
    // Another definition under the id.
    let mut other = launch("spring");
    other["title"] = json!("Other");
    let (status, answer) = s.post("/v1/campaigns", &other).await;
    assert_eq!((status, answer["error"]["code"].clone()), (StatusCode::CONFLICT, json!("campaign_exists")), "{answer}");
    assert_eq!(s.store.campaign("spring").await.unwrap().unwrap().definition, stored.definition);

    // Not picked up yet (the first answer may have been lost before Kafka had it): the retry
    // produces the launch again under the same event id, which downstream absorbs.
    let (status, _) = s.post("/v1/campaigns", &launch("autumn")).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = s.post("/v1/campaigns", &launch("autumn")).await;
    assert_eq!(status, StatusCode::OK);
    let autumn: Vec<Value> =
        s.records().into_iter().filter(|(k, _)| k == "autumn").map(|(_, e)| e["event_id"].clone()).collect();
    assert_eq!(autumn, [json!("campaign:autumn"), json!("campaign:autumn")]);
    assert_eq!(s.store.campaigns(None, 10).await.unwrap().len(), 2, "one row per campaign");
}

#[tokio::test]
async fn campaigns_are_listed_shown_and_cancelled_with_their_status() {
    let s = start().await;
    let (status, _) = s.post("/v1/campaigns", &launch("now")).await;
    assert_eq!(status, StatusCode::CREATED);
    let mut later = launch("later");
    later["send_at"] = json!((chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339());
    let (status, answer) = s.post("/v1/campaigns", &later).await;
    assert_eq!((status, answer["status"].clone()), (StatusCode::CREATED, json!("scheduled")), "{answer}");

    let (status, list) = s.get("/v1/campaigns").await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> =
        list["campaigns"].as_array().unwrap().iter().map(|c| c["campaign_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["later", "now"], "newest first");
    let (_, page) = s.get("/v1/campaigns?limit=1").await;
    assert_eq!((page["campaigns"][0]["campaign_id"].clone(), page["next"].clone()), (json!("later"), json!("later")));
    let (_, page) = s.get("/v1/campaigns?limit=1&after=later").await;
    assert_eq!(page["campaigns"][0]["campaign_id"], "now");

    let (status, shown) = s.get("/v1/campaigns/later").await;
    assert_eq!((status, shown["status"].clone()), (StatusCode::OK, json!("scheduled")), "{shown}");
    assert_eq!(shown["definition"]["title"], "Hello {{ recipient }}");
    s.sql(
        "INSERT INTO campaign_progress (campaign_id, event_id, produced, held, suppressed, started_at, updated_at) \
           VALUES ('now', 'campaign:now', 5, 2, 1, 1, 1)",
    )
    .await;
    s.sql("INSERT INTO campaign_deliveries (campaign_id, instance, delivered, updated_at) VALUES ('now', 'g1', 4, 1)")
        .await;
    let (_, shown) = s.get("/v1/campaigns/now").await;
    assert_eq!(shown["status"], "sending");
    assert_eq!(shown["counts"], json!({"produced": 5, "held": 2, "suppressed": 1, "stored": 0, "delivered": 4}));
    let (status, _) = s.get("/v1/campaigns/nosuch").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Cancel the scheduled one: its status, and a CampaignCancelled record after its launch.
    let (status, answer) = s.post("/v1/campaigns/later/cancel", &json!({"reason": "typo"})).await;
    assert_eq!((status, answer["status"].clone()), (StatusCode::OK, json!("cancelled")), "{answer}");
    let later_events: Vec<Value> = s.records().into_iter().filter(|(k, _)| k == "later").map(|(_, e)| e).collect();
    assert_eq!(later_events.len(), 2);
    assert_eq!(later_events[1]["payload"], json!({"reason": "typo"}));
    let (status, _) = s.post("/v1/campaigns/nosuch/cancel", &json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Done: nothing left to cancel.
    s.sql("UPDATE campaign_progress SET finished_at = 2 WHERE campaign_id = 'now'").await;
    let (_, shown) = s.get("/v1/campaigns/now").await;
    assert_eq!(shown["status"], "done");
    let (status, answer) = s.post("/v1/campaigns/now/cancel", &json!({})).await;
    assert_eq!(
        (status, answer["error"]["code"].clone()),
        (StatusCode::CONFLICT, json!("campaign_finished")),
        "{answer}"
    );
    assert_eq!(s.get("/v1/campaigns/now").await.1["status"], "done");
    // Failed: finished short of its audience (its launch dead-lettered on a later page), with why;
    // nothing left to cancel either.
    let reason = "template-error: template body: undefined value";
    s.sql(&format!("UPDATE campaign_progress SET failed_reason = '{reason}' WHERE campaign_id = 'now'")).await;
    let (status, shown) = s.get("/v1/campaigns/now").await;
    assert_eq!(
        (status, shown["status"].as_str(), shown["failed_reason"].as_str()),
        (StatusCode::OK, Some("failed"), Some(reason))
    );
    let (_, list) = s.get("/v1/campaigns").await;
    assert_eq!(list["campaigns"][1]["status"], "failed", "{list}");
    let (status, answer) = s.post("/v1/campaigns/now/cancel", &json!({})).await;
    assert_eq!(
        (status, answer["error"]["code"].clone()),
        (StatusCode::CONFLICT, json!("campaign_finished")),
        "{answer}"
    );
}

#[tokio::test]
async fn without_a_producer_only_dry_runs_go_through_and_nothing_is_stored() {
    let (store, _dir) = tidings_store::testing::fresh_sqlite().await.unwrap();
    let categories = vec![Category { name: "campaigns".into(), critical: false, description: String::new() }];
    let c = Campaigns {
        store: store.clone(),
        events: None,
        topic: TOPIC.into(),
        categories: Arc::new(categories),
        config: CampaignsConfig::default(),
    };
    let mut dry = launch("p1");
    dry["dry_run"] = json!(true);
    assert!(matches!(c.launch(&dry, "test").await, Ok(tidings_gateway::campaigns::Launched::DryRun(..))));
    let err = c.launch(&launch("p1"), "test").await.unwrap_err();
    assert!(err.to_string().contains("no_producer: campaigns cannot be launched"), "{err}");
    assert!(store.campaign("p1").await.unwrap().is_none(), "stored without a way to produce it");
}
