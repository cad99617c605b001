//! Tests of the registry over real HTTP on 127.0.0.1: schema_registry_converter as an unchanged
//! client, the REST subset with Confluent's error codes, and persistence across restarts (and
//! across instances sharing a database) on PostgreSQL and SQLite.

use std::time::Duration;

use apache_avro::types::Value;
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::schema_registry_common::{SchemaType, SubjectNameStrategy, SuppliedSchema};
use serde_json::{json, Value as Json};
use tidings_store::testing::{fresh_postgres, fresh_sqlite};
use tidings_store::Store;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::*;

const ORDER_EVENT: &str = include_str!("../../../schemas/order_event.avsc");

const THING_V1: &str = r#"{"type":"record","name":"Thing","namespace":"t","fields":[{"name":"a","type":"string"}]}"#;
/// V1 with the same content written differently: must map to the same id.
const THING_V1_REFORMATTED: &str = r#"{
  "namespace": "t", "name": "Thing", "type": "record",
  "fields": [ { "type": "string", "name": "a" } ]
}"#;
/// Adds a field with a default: compatible both ways.
const THING_V2: &str = r#"{"type":"record","name":"Thing","namespace":"t","fields":[{"name":"a","type":"string"},{"name":"b","type":"int","default":0}]}"#;
/// Adds a field without a default: the new schema cannot read V2 data (not BACKWARD).
const THING_V3_NO_DEFAULT: &str = r#"{"type":"record","name":"Thing","namespace":"t","fields":[{"name":"a","type":"string"},{"name":"b","type":"int","default":0},{"name":"c","type":"string"}]}"#;
/// Drops `a`, which has no default: V2 readers cannot read its data (not FORWARD).
const THING_WITHOUT_A: &str =
    r#"{"type":"record","name":"Thing","namespace":"t","fields":[{"name":"b","type":"int","default":0}]}"#;

struct Server {
    base: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(registry: Registry) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(listener, registry, shutdown.clone()));
        Server { base, shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// A raw HTTP client that checks every answer carries the registry content type.
struct Http {
    client: reqwest::Client,
    base: String,
}

impl Http {
    fn new(server: &Server) -> Http {
        Http { client: reqwest::Client::builder().no_proxy().build().unwrap(), base: server.base.clone() }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<(&str, Json)>) -> (u16, Json) {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some((content_type, body)) = body {
            request = request.header("content-type", content_type).body(body.to_string());
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_string());
        assert_eq!(content_type.as_deref(), Some("application/vnd.schemaregistry.v1+json"), "{path}");
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Json::String(text)))
    }

    async fn get(&self, path: &str) -> (u16, Json) {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn delete(&self, path: &str) -> (u16, Json) {
        self.call(reqwest::Method::DELETE, path, None).await
    }

    async fn post(&self, path: &str, body: Json) -> (u16, Json) {
        self.call(reqwest::Method::POST, path, Some(("application/vnd.schemaregistry.v1+json", body))).await
    }

    async fn put(&self, path: &str, body: Json) -> (u16, Json) {
        self.call(reqwest::Method::PUT, path, Some(("application/vnd.schemaregistry.v1+json", body))).await
    }

    async fn register(&self, subject: &str, schema: &str) -> (u16, Json) {
        self.post(&format!("/subjects/{subject}/versions"), json!({ "schema": schema })).await
    }
}

/// Asserts a Confluent error body with `code`, returning its message.
fn error_message(answer: &(u16, Json), status: u16, code: u64) -> String {
    assert_eq!(answer.0, status, "{answer:?}");
    assert_eq!(answer.1["error_code"], json!(code), "{answer:?}");
    answer.1["message"].as_str().expect("message is a string").to_string()
}

fn order_placed() -> Value {
    let item = Value::Record(vec![
        ("sku".into(), Value::String("SKU-1".into())),
        ("name".into(), Value::String("Kimchi".into())),
        ("quantity".into(), Value::Int(2)),
        ("unit_price_cents".into(), Value::Long(625)),
    ]);
    Value::Record(vec![
        ("event_id".into(), Value::String("evt-1".into())),
        ("occurred_at".into(), Value::TimestampMicros(1_700_000_000_123_456)),
        ("order_id".into(), Value::String("order-7".into())),
        ("buyer_id".into(), Value::String("user-3".into())),
        ("locale".into(), Value::Union(1, Box::new(Value::String("ko".into())))),
        (
            "payload".into(),
            Value::Union(
                0,
                Box::new(Value::Record(vec![
                    ("amount_cents".into(), Value::Long(1250)),
                    ("currency".into(), Value::String("KRW".into())),
                    ("items".into(), Value::Array(vec![item])),
                ])),
            ),
        ),
    ])
}

/// The order envelope with one more event type appended to the `payload` union.
fn order_event_with_refund() -> String {
    let mut schema: Json = serde_json::from_str(ORDER_EVENT).unwrap();
    let payload = schema["fields"].as_array_mut().unwrap().iter_mut().find(|f| f["name"] == "payload").unwrap();
    payload["type"].as_array_mut().unwrap().push(json!({
        "type": "record", "name": "OrderRefunded",
        "fields": [{"name": "amount_cents", "type": "long"}]
    }));
    schema.to_string()
}

#[tokio::test]
async fn converter_round_trips_through_the_registry() {
    let (store, _dir) = fresh_sqlite().await.unwrap();
    let registry = Registry::open(store).await.unwrap();
    let server = Server::start(registry.clone()).await;
    let settings = SrSettings::new_builder(server.base.clone()).no_proxy().build().unwrap();
    let strategy = SubjectNameStrategy::TopicNameStrategyWithSchema(
        "orders".into(),
        false,
        SuppliedSchema::new(Some("tidings.orders.OrderEvent".into()), SchemaType::Avro, ORDER_EVENT.into()),
    );

    let value = order_placed();
    let bytes = AvroEncoder::new(settings.clone()).encode_value(value.clone(), &strategy).await.unwrap();

    // The encoder auto-registered the schema; registering it again is a no-op returning its id.
    let id = registry.register("orders-value", ORDER_EVENT).await.unwrap();
    assert_eq!(id, 1);
    assert_eq!(registry.versions("orders-value", true).await.unwrap(), vec![1]);
    assert_eq!(bytes[0], 0, "magic byte");
    assert_eq!(bytes[1..5], id.to_be_bytes(), "schema id prefix");

    // A fresh encoder (no cache) gets the same id and produces the same bytes.
    let again = AvroEncoder::new(settings.clone()).encode_value(value.clone(), &strategy).await.unwrap();
    assert_eq!(again, bytes);

    let decoded = AvroDecoder::new(settings).decode(Some(&bytes)).await.unwrap();
    assert_eq!(decoded.value, value);
    server.stop().await;
}

#[tokio::test]
async fn rest_api_follows_confluent() {
    let (store, _dir) = fresh_sqlite().await.unwrap();
    let server = Server::start(Registry::open(store).await.unwrap()).await;
    let http = Http::new(&server);

    assert_eq!(http.get("/subjects").await, (200, json!([])));
    assert_eq!(http.get("/").await, (200, json!({})));

    // Idempotent registration, same id across subjects, ids from 1.
    assert_eq!(http.register("things-value", THING_V1).await, (200, json!({"id": 1})));
    assert_eq!(http.register("things-value", THING_V1_REFORMATTED).await, (200, json!({"id": 1})));
    for content_type in ["application/json", "application/vnd.schemaregistry+json"] {
        let answer = http
            .call(
                reqwest::Method::POST,
                "/subjects/things-value/versions",
                Some((content_type, json!({"schema": THING_V1, "schemaType": "AVRO"}))),
            )
            .await;
        assert_eq!(answer, (200, json!({"id": 1})), "{content_type}");
    }
    assert_eq!(http.get("/subjects/things-value/versions").await, (200, json!([1])));
    assert_eq!(http.register("other-value", THING_V1).await, (200, json!({"id": 1})));
    assert_eq!(http.get("/schemas/ids/1").await, (200, json!({"schema": THING_V1})));
    assert_eq!(
        http.get("/schemas/ids/1/versions").await,
        (200, json!([{"subject": "other-value", "version": 1}, {"subject": "things-value", "version": 1}]))
    );

    // Compatibility endpoint, both outcomes.
    let ok = http.post("/compatibility/subjects/things-value/versions/latest", json!({"schema": THING_V2})).await;
    assert_eq!(ok, (200, json!({"is_compatible": true})));
    let bad =
        http.post("/compatibility/subjects/things-value/versions/1", json!({"schema": THING_V3_NO_DEFAULT})).await;
    assert_eq!(bad.0, 200);
    assert_eq!(bad.1["is_compatible"], json!(false));
    let messages = bad.1["messages"].as_array().unwrap();
    assert!(messages.iter().any(|m| m.as_str().unwrap().contains("'c'")), "{messages:?}");

    // A second version, latest, raw schema.
    assert_eq!(http.register("things-value", THING_V2).await, (200, json!({"id": 2})));
    assert_eq!(http.get("/subjects/things-value/versions").await, (200, json!([1, 2])));
    assert_eq!(
        http.get("/subjects/things-value/versions/latest").await,
        (200, json!({"subject": "things-value", "version": 2, "id": 2, "schema": THING_V2}))
    );
    let raw = http.get("/subjects/things-value/versions/1/schema").await;
    assert_eq!(raw, (200, serde_json::from_str::<Json>(THING_V1).unwrap()));

    // Incompatible under BACKWARD: 409 naming the reason, and no version created.
    let rejected = http.register("things-value", THING_V3_NO_DEFAULT).await;
    let message = error_message(&rejected, 409, 409);
    assert!(
        message.starts_with(
            "Schema being registered is incompatible with an earlier schema for subject \"things-value\", details: ["
        ),
        "{message}"
    );
    assert!(message.contains("'c'") && message.contains("default"), "{message}");
    assert_eq!(http.get("/subjects/things-value/versions").await, (200, json!([1, 2])));

    // Lookup.
    assert_eq!(
        http.post("/subjects/things-value", json!({"schema": THING_V1_REFORMATTED})).await,
        (200, json!({"subject": "things-value", "version": 1, "id": 1, "schema": THING_V1}))
    );
    error_message(&http.post("/subjects/things-value", json!({"schema": THING_WITHOUT_A})).await, 404, 40403);
    error_message(&http.post("/subjects/nope", json!({"schema": THING_V1})).await, 404, 40401);

    // Config: global and per subject; a subject level takes effect on registration.
    assert_eq!(http.get("/config").await, (200, json!({"compatibilityLevel": "BACKWARD"})));
    error_message(&http.get("/config/things-value").await, 404, 40408);
    assert_eq!(
        http.get("/config/things-value?defaultToGlobal=true").await,
        (200, json!({"compatibilityLevel": "BACKWARD"}))
    );
    assert_eq!(
        http.put("/config/things-value", json!({"compatibility": "NONE"})).await,
        (200, json!({"compatibility": "NONE"}))
    );
    assert_eq!(http.get("/config/things-value").await, (200, json!({"compatibilityLevel": "NONE"})));
    assert_eq!(http.register("things-value", THING_V3_NO_DEFAULT).await, (200, json!({"id": 3})));
    assert_eq!(http.delete("/config/things-value").await, (200, json!({"compatibilityLevel": "NONE"})));
    error_message(&http.get("/config/things-value").await, 404, 40408);
    error_message(&http.put("/config", json!({"compatibility": "SIDEWAYS"})).await, 422, 42203);
    assert_eq!(http.put("/config", json!({"compatibility": "FULL"})).await, (200, json!({"compatibility": "FULL"})));
    assert_eq!(http.get("/config").await, (200, json!({"compatibilityLevel": "FULL"})));

    // FULL also checks the forward direction: the old schema must read the new data.
    assert_eq!(http.register("full-value", THING_V2).await, (200, json!({"id": 2})));
    let message = error_message(&http.register("full-value", THING_WITHOUT_A).await, 409, 409);
    assert!(message.contains("FULL: version 1 cannot read data written with the new schema"), "{message}");
    assert!(message.contains("'a'"), "{message}");

    // Soft deletes.
    assert_eq!(http.delete("/subjects/things-value/versions/3").await, (200, json!(3)));
    assert_eq!(http.get("/subjects/things-value/versions").await, (200, json!([1, 2])));
    assert_eq!(http.get("/subjects/things-value/versions?deleted=true").await, (200, json!([1, 2, 3])));
    error_message(&http.get("/subjects/things-value/versions/3").await, 404, 40402);
    assert_eq!(http.get("/subjects/things-value/versions/3?deleted=true").await.1["id"], json!(3));
    error_message(&http.delete("/subjects/things-value/versions/3").await, 404, 40406);
    assert_eq!(http.get("/subjects/things-value/versions/latest").await.1["version"], json!(2));
    assert_eq!(http.delete("/subjects/other-value").await, (200, json!([1])));
    assert_eq!(http.get("/subjects").await, (200, json!(["full-value", "things-value"])));
    assert_eq!(http.get("/subjects?deleted=true").await, (200, json!(["full-value", "other-value", "things-value"])));
    error_message(&http.get("/subjects/other-value/versions").await, 404, 40401);
    assert_eq!(http.get("/schemas/ids/1/versions").await, (200, json!([{"subject": "things-value", "version": 1}])));
    // Permanent deletion only after a soft delete.
    error_message(&http.delete("/subjects/things-value/versions/1?permanent=true").await, 404, 40407);
    assert_eq!(http.delete("/subjects/other-value?permanent=true").await, (200, json!([1])));
    assert_eq!(http.get("/subjects?deleted=true").await, (200, json!(["full-value", "things-value"])));
    // The schema itself outlives its versions, as ids are referenced by data on Kafka.
    assert_eq!(http.get("/schemas/ids/1").await.0, 200);

    // Invalid input and unknown things.
    error_message(&http.register("things-value", "{not avro").await, 422, 42201);
    error_message(&http.register("things-value", r#"{"type":"record","fields":[]}"#).await, 422, 42201);
    error_message(
        &http
            .post(
                "/subjects/things-value/versions",
                json!({"schema": "syntax = \"proto3\";", "schemaType": "PROTOBUF"}),
            )
            .await,
        422,
        42202,
    );
    error_message(&http.get("/subjects/things-value/versions/abc").await, 422, 42202);
    error_message(&http.get("/subjects/things-value/versions/0").await, 422, 42202);
    error_message(&http.get("/subjects/things-value/versions/99").await, 404, 40402);
    error_message(&http.get("/subjects/nope/versions").await, 404, 40401);
    error_message(&http.get("/subjects/nope/versions/latest").await, 404, 40401);
    error_message(&http.get("/schemas/ids/999").await, 404, 40403);
    error_message(&http.get("/schemas/ids/999/versions").await, 404, 40403);
    let wrong_type = http
        .call(reqwest::Method::POST, "/subjects/x/versions", Some(("text/plain", json!({"schema": THING_V1}))))
        .await;
    error_message(&wrong_type, 415, 415);
    error_message(&http.get("/no/such/path").await, 404, 404);

    server.stop().await;
}

#[tokio::test]
async fn appending_a_union_branch_is_backward_but_not_forward_compatible() {
    let (store, _dir) = fresh_sqlite().await.unwrap();
    let registry = Registry::open(store).await.unwrap();
    let with_refund = order_event_with_refund();
    assert_eq!(registry.register("orders-value", ORDER_EVENT).await.unwrap(), 1);
    // Old readers would meet an unknown branch: a partial match, which FORWARD must reject.
    registry.set_level(Some("orders-value"), CompatibilityLevel::Forward).await.unwrap();
    let problems = registry.check_compatibility("orders-value", None, &with_refund, None).await.unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].starts_with("FORWARD: version 1 cannot read"), "{problems:?}");
    let err = registry.register("orders-value", &with_refund).await.unwrap_err();
    assert!(matches!(err, RegistryServerError::Incompatible { .. }), "{err}");
    assert!(!err.is_retriable());

    registry.set_level(Some("orders-value"), CompatibilityLevel::Backward).await.unwrap();
    assert_eq!(registry.register("orders-value", &with_refund).await.unwrap(), 2);
    let again = registry.register("orders-value", ORDER_EVENT).await.unwrap();
    assert_eq!(again, 1, "v1 is still a live version, so registering it is idempotent");
    // Once v1 is gone, going back to the narrower union is checked against v2 and is not
    // BACKWARD (the new reader lacks a branch); under NONE nothing is checked.
    registry.delete_version("orders-value", VersionSelector::Number(1), false).await.unwrap();
    assert!(matches!(
        registry.register("orders-value", ORDER_EVENT).await,
        Err(RegistryServerError::Incompatible { .. })
    ));
    registry.set_level(Some("orders-value"), CompatibilityLevel::None).await.unwrap();
    // Re-registering a soft-deleted schema creates a new version with its old id.
    assert_eq!(registry.register("orders-value", ORDER_EVENT).await.unwrap(), 1);
    assert_eq!(registry.versions("orders-value", false).await.unwrap(), vec![2, 3]);
}

#[tokio::test]
async fn transitive_levels_check_every_live_version() {
    let (store, _dir) = fresh_sqlite().await.unwrap();
    let registry = Registry::open(store).await.unwrap();
    // Numeric promotions: int -> long -> float -> double, never the other way round.
    let int_v = r#"{"type":"record","name":"N","fields":[{"name":"n","type":"int"}]}"#;
    let long_v = r#"{"type":"record","name":"N","fields":[{"name":"n","type":"long"}]}"#;
    let float_v = r#"{"type":"record","name":"N","fields":[{"name":"n","type":"float"}]}"#;
    let double_v = r#"{"type":"record","name":"N","fields":[{"name":"n","type":"double"}]}"#;
    registry.register("n-value", int_v).await.unwrap();
    registry.register("n-value", long_v).await.unwrap();
    // No reader among int, long and float reads double: FORWARD only looks at the latest
    // version, FORWARD_TRANSITIVE at all three.
    registry.register("n-value", float_v).await.unwrap();
    registry.set_level(Some("n-value"), CompatibilityLevel::Forward).await.unwrap();
    let latest_only = registry.check_compatibility("n-value", None, double_v, None).await.unwrap();
    assert_eq!(latest_only.len(), 1, "{latest_only:?}");
    registry.set_level(Some("n-value"), CompatibilityLevel::ForwardTransitive).await.unwrap();
    let all = registry.check_compatibility("n-value", None, double_v, None).await.unwrap();
    assert_eq!(all.len(), 3, "{all:?}");
    assert!(all.iter().any(|p| p.contains("version 1")) && all.iter().any(|p| p.contains("version 3")), "{all:?}");
}

/// Registers, drops the registry, reopens it from the database URL: everything is still there
/// and ids continue; also a second instance on the same database sees the first one's writes.
async fn survives_restart(store: Store, url: &str) {
    let registry = Registry::open(store).await.unwrap();
    assert_eq!(registry.register("orders-value", ORDER_EVENT).await.unwrap(), 1);
    assert_eq!(registry.register("things-value", THING_V1).await.unwrap(), 2);
    assert_eq!(registry.register("things-value", THING_V2).await.unwrap(), 3);
    registry.delete_version("things-value", VersionSelector::Number(1), false).await.unwrap();
    registry.set_level(Some("things-value"), CompatibilityLevel::FullTransitive).await.unwrap();
    registry.set_level(None, CompatibilityLevel::Forward).await.unwrap();
    // A subject deleted for good, with the level it had: neither comes back.
    assert_eq!(registry.register("gone-value", THING_V1).await.unwrap(), 2, "the same schema keeps its id");
    registry.set_level(Some("gone-value"), CompatibilityLevel::None).await.unwrap();
    registry.delete_level(Some("gone-value")).await.unwrap();
    registry.delete_version("gone-value", VersionSelector::Number(1), false).await.unwrap();
    registry.delete_version("gone-value", VersionSelector::Number(1), true).await.unwrap();
    drop(registry);

    let reopened = Registry::open(Store::connect(url).await.unwrap()).await.unwrap();
    assert_eq!(reopened.schema_by_id(1).await.unwrap(), ORDER_EVENT);
    assert_eq!(reopened.schema_by_id(3).await.unwrap(), THING_V2);
    assert_eq!(reopened.versions("things-value", false).await.unwrap(), vec![2]);
    assert_eq!(reopened.versions("things-value", true).await.unwrap(), vec![1, 2]);
    assert_eq!(reopened.subjects(false), vec!["orders-value".to_string(), "things-value".to_string()]);
    assert_eq!(reopened.subjects(true), vec!["orders-value".to_string(), "things-value".to_string()]);
    assert_eq!(reopened.subject_level("gone-value"), None);
    assert_eq!(reopened.subject_level("things-value"), Some(CompatibilityLevel::FullTransitive));
    assert_eq!(reopened.global_level(), CompatibilityLevel::Forward);
    assert_eq!(reopened.register("orders-value", ORDER_EVENT).await.unwrap(), 1);
    assert_eq!(reopened.versions("orders-value", false).await.unwrap(), vec![1]);
    // The REST view of the reopened registry.
    let server = Server::start(reopened.clone()).await;
    let http = Http::new(&server);
    assert_eq!(
        http.get("/subjects/things-value/versions/latest").await,
        (200, json!({"subject": "things-value", "version": 2, "id": 3, "schema": THING_V2}))
    );
    server.stop().await;

    // A second instance on the same database: its writes take the next id, and the first
    // instance finds them once its rate-limited refresh on a miss is due.
    let other = Registry::open(Store::connect(url).await.unwrap()).await.unwrap();
    let with_refund = order_event_with_refund();
    other.set_level(None, CompatibilityLevel::Backward).await.unwrap();
    assert_eq!(other.register("orders-value", &with_refund).await.unwrap(), 4);
    // Writes reload under the lock before allocating, so the stale instance does not reuse 4.
    assert_eq!(reopened.register("x-value", THING_WITHOUT_A).await.unwrap(), 5);
    assert_eq!(other.register("y-value", THING_V3_NO_DEFAULT).await.unwrap(), 6);
    tokio::time::sleep(MISS_REFRESH_INTERVAL + Duration::from_millis(100)).await;
    assert_eq!(reopened.schema_by_id(6).await.unwrap(), THING_V3_NO_DEFAULT);
    assert_eq!(reopened.versions("y-value", false).await.unwrap(), vec![1]);
    assert_eq!(reopened.versions("orders-value", false).await.unwrap(), vec![1, 2]);
}

#[tokio::test]
async fn persists_in_postgres() {
    let (store, url) = fresh_postgres().await.unwrap();
    survives_restart(store, &url).await;
}

#[tokio::test]
async fn persists_in_sqlite() {
    let (store, dir) = fresh_sqlite().await.unwrap();
    let url = format!("sqlite://{}/tidings.db", dir.path().display());
    survives_restart(store, &url).await;
}

#[test]
fn versions_and_levels_parse_like_confluent() {
    assert_eq!(VersionSelector::parse("latest").unwrap(), VersionSelector::Latest);
    assert_eq!(VersionSelector::parse("-1").unwrap(), VersionSelector::Latest);
    assert_eq!(VersionSelector::parse("7").unwrap(), VersionSelector::Number(7));
    for bad in ["0", "-2", "x", "2147483648", ""] {
        assert!(matches!(VersionSelector::parse(bad), Err(RegistryServerError::InvalidVersion(_))), "{bad}");
    }
    for level in ["NONE", "BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE", "FULL", "FULL_TRANSITIVE"]
    {
        assert_eq!(CompatibilityLevel::parse(level).unwrap().as_str(), level);
    }
    assert!(CompatibilityLevel::parse("SOMETIMES").is_err());
}

#[test]
fn ids_distinguish_what_the_canonical_form_drops() {
    // The Parsing Canonical Form strips defaults, yet they decide compatibility (see THING_V3).
    let without_default = r#"{"type":"record","name":"T","fields":[{"name":"n","type":"int"}]}"#;
    let with_default = r#"{"type":"record","name":"T","fields":[{"name":"n","type":"int","default":0}]}"#;
    let without_default = parse_candidate(without_default, None).unwrap();
    let with_default = parse_candidate(with_default, None).unwrap();
    assert_eq!(without_default.parsed.canonical_form(), with_default.parsed.canonical_form());
    assert_ne!(without_default.key, with_default.key);
    // Formatting and attribute order do not matter.
    assert_eq!(
        parse_candidate(THING_V1, Some("AVRO")).unwrap().key,
        parse_candidate(THING_V1_REFORMATTED, None).unwrap().key
    );
}

const WRITE_TOKEN: &str = "write-token-0123456789abcdef0123";

/// Serves the guarded routes as `tidings up` does, on 127.0.0.1.
async fn start_guarded(registry: Registry, access: Access) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let limits = tidings_core::http::Limits::default();
    let task = tokio::spawn(serve_with(listener, registry, access, limits, shutdown.clone()));
    Server { base, shutdown, task }
}

impl Http {
    /// A raw request: `headers` as given, nothing added but what reqwest always sends.
    async fn raw(&self, method: reqwest::Method, path: &str, headers: &[(&str, &str)], body: Option<Json>) -> u16 {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.body(body.to_string());
        }
        request.send().await.unwrap().status().as_u16()
    }
}

#[tokio::test]
async fn writes_need_the_write_token_even_from_loopback_and_reads_stay_open() {
    let (store, _dir) = fresh_sqlite().await.unwrap();
    let registry = Registry::open(store).await.unwrap();
    let server = start_guarded(registry.clone(), Access::new(WRITE_TOKEN, [])).await;
    let http = Http::new(&server);
    // A process on this host is no more trusted than one elsewhere: loopback is not a credential.
    let (status, body) = http.register("things-value", THING_V1).await;
    assert_eq!((status, body["error_code"].as_u64()), (401, Some(40101)), "{body}");
    for (method, path) in [(reqwest::Method::DELETE, "/subjects/things-value"), (reqwest::Method::PUT, "/config")] {
        let body = (method == reqwest::Method::PUT).then(|| ("application/json", json!({"compatibility": "NONE"})));
        assert_eq!(http.call(method, path, body).await.0, 401, "{path}");
    }
    assert_eq!(http.get("/config").await, (200, json!({"compatibilityLevel": "BACKWARD"})), "level changed");
    assert_eq!(http.get("/subjects").await, (200, json!([])), "reads stay open");
    let lookup = http.post("/subjects/things-value", json!({"schema": THING_V1})).await;
    assert_eq!(lookup.0, 404, "a lookup is a read: {lookup:?}");
    // With the token as a bearer, or as basic auth's password (Confluent clients' USER_INFO).
    let json_type = ("content-type", "application/json");
    let schema = || Some(json!({ "schema": THING_V1 }));
    let post = reqwest::Method::POST;
    let path = "/subjects/things-value/versions";
    assert_eq!(
        http.raw(post.clone(), path, &[json_type, ("authorization", "Bearer wrong-token-0123456789")], schema()).await,
        401
    );
    let bearer = format!("Bearer {WRITE_TOKEN}");
    assert_eq!(http.raw(post.clone(), path, &[json_type, ("authorization", &bearer)], schema()).await, 200);
    use base64::Engine as _;
    let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("svc:{WRITE_TOKEN}")));
    assert_eq!(http.raw(post.clone(), path, &[json_type, ("authorization", &basic)], schema()).await, 200);
    assert_eq!(registry.versions("things-value", false).await.unwrap(), vec![1]);
    server.stop().await;

    // An empty token matches nothing, not even an empty password (`Basic Og==` is ":").
    let open = start_guarded(registry, Access::new("", [])).await;
    let http = Http::new(&open);
    for auth in ["Basic Og==", "Bearer "] {
        let status = http
            .raw(post.clone(), "/subjects/other-value/versions", &[json_type, ("authorization", auth)], schema())
            .await;
        assert_eq!(status, 401, "{auth}");
    }
    open.stop().await;
}

#[tokio::test]
async fn writes_need_a_json_content_type() {
    let (store, _dir) = fresh_sqlite().await.unwrap();
    let registry = Registry::open(store).await.unwrap();
    let server = start_guarded(registry.clone(), Access::new(WRITE_TOKEN, [])).await;
    let http = Http::new(&server);
    let bearer = format!("Bearer {WRITE_TOKEN}");
    let auth = ("authorization", bearer.as_str());
    let (post, put) = (reqwest::Method::POST, reqwest::Method::PUT);
    let path = "/subjects/orders-value/versions";
    let schema = || Some(json!({ "schema": THING_V1 }));
    // What a web page may send cross-site without a preflight: no type, or a "simple" one.
    assert_eq!(http.raw(post.clone(), path, &[auth], schema()).await, 415, "no Content-Type");
    for simple in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"] {
        assert_eq!(http.raw(post.clone(), path, &[auth, ("content-type", simple)], schema()).await, 415, "{simple}");
    }
    assert_eq!(http.raw(put.clone(), "/config", &[auth], Some(json!({"compatibility": "NONE"}))).await, 415);
    assert_eq!(registry.versions("orders-value", true).await.ok(), None, "a version was registered");
    assert_eq!(registry.global_level(), CompatibilityLevel::Backward);
    // What Confluent clients send.
    for json_type in [
        "application/vnd.schemaregistry.v1+json",
        "application/vnd.schemaregistry+json",
        "application/json; charset=utf-8",
    ] {
        assert_eq!(
            http.raw(post.clone(), path, &[auth, ("content-type", json_type)], schema()).await,
            200,
            "{json_type}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn requests_from_web_pages_or_under_other_host_names_are_refused() {
    let (store, _dir) = fresh_sqlite().await.unwrap();
    let registry = Registry::open(store).await.unwrap();
    let access = Access::new(WRITE_TOKEN, ["Registry.Internal".to_string()]);
    let server = start_guarded(registry.clone(), access).await;
    let http = Http::new(&server);
    let bearer = format!("Bearer {WRITE_TOKEN}");
    let write = |extra: (&'static str, &'static str)| {
        let headers =
            [("authorization", bearer.clone()), ("content-type", "application/json".into()), (extra.0, extra.1.into())];
        let http = &http;
        async move {
            let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            http.raw(
                reqwest::Method::POST,
                "/subjects/things-value/versions",
                &headers,
                Some(json!({"schema": THING_V1})),
            )
            .await
        }
    };
    // A page's request carries its Origin, even a same-origin one after DNS rebinding.
    assert_eq!(write(("origin", "https://evil.example")).await, 403);
    assert_eq!(write(("origin", "null")).await, 403);
    assert_eq!(http.raw(reqwest::Method::GET, "/subjects", &[("origin", "https://evil.example")], None).await, 403);
    // A rebound name reaches the port, but the Host header still names the page's site.
    assert_eq!(write(("host", "evil.example:8081")).await, 421);
    assert_eq!(write(("host", "localhost.evil.example")).await, 421);
    assert_eq!(http.raw(reqwest::Method::GET, "/subjects", &[("host", "evil.example")], None).await, 421);
    assert_eq!(registry.versions("things-value", true).await.ok(), None, "a refused write registered a version");
    // Loopback names, the listen address and the configured names pass.
    for host in ["localhost:8081", "127.0.0.1", "[::1]:8081", "registry.internal:8081", "REGISTRY.internal"] {
        assert_eq!(write(("host", host)).await, 200, "{host}");
    }
    server.stop().await;
}

#[test]
fn allowed_hosts_are_loopback_the_listen_address_and_the_configured_names() {
    let access = Access::new(WRITE_TOKEN, ["gw.example.com".to_string()]);
    assert!(access.host_allowed("gw.example.com:8081") && access.host_allowed("localhost"));
    assert!(access.host_allowed("127.0.0.2") && access.host_allowed("[::1]"));
    assert!(!access.host_allowed("10.0.0.5:8081"), "no listen address set");
    assert!(!access.host_allowed("example.com") && !access.host_allowed("gw.example.com.evil"));
    let on_one = access.clone().with_listen("10.0.0.5".parse().unwrap());
    assert!(on_one.host_allowed("10.0.0.5:8081") && !on_one.host_allowed("10.0.0.6:8081"));
    // Listening on every address: any address names it (an address cannot be rebound), no name does.
    let on_all = access.with_listen("0.0.0.0".parse().unwrap());
    assert!(on_all.host_allowed("10.0.0.6:8081") && !on_all.host_allowed("evil.example"));
}

const COUPON_EVENT: &str = include_str!("../../../schemas/coupon_event.avsc");

/// `coupon_event.avsc` as it was before the claim stage's decisions: without `claim_id` on
/// CouponIssued and without the branches appended after CampaignLaunched.
fn coupon_event_before_claims() -> String {
    let mut schema: Json = serde_json::from_str(COUPON_EVENT).unwrap();
    let payload = schema["fields"].as_array_mut().unwrap().iter_mut().find(|f| f["name"] == "payload").unwrap();
    let branches = payload["type"].as_array_mut().unwrap();
    let launched = branches.iter().position(|b| b["name"] == "CampaignLaunched").unwrap();
    branches.truncate(launched + 1);
    let issued = branches.iter_mut().find(|b| b["name"] == "CouponIssued").unwrap();
    issued["fields"].as_array_mut().unwrap().retain(|f| f["name"] != "claim_id");
    schema.to_string()
}

#[tokio::test]
async fn the_claim_decisions_extend_the_coupons_schema_backward_compatibly() {
    let (store, _dir) = fresh_sqlite().await.unwrap();
    let registry = Registry::open(store).await.unwrap();
    let before = coupon_event_before_claims();
    assert_eq!(registry.register("coupons-value", &before).await.unwrap(), 1);
    let problems = registry.check_compatibility("coupons-value", None, COUPON_EVENT, None).await.unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(registry.register("coupons-value", COUPON_EVENT).await.unwrap(), 2);
    // The check can fail: a new field without a default is refused against the same version.
    let mut no_default: Json = serde_json::from_str(COUPON_EVENT).unwrap();
    no_default["fields"].as_array_mut().unwrap().push(json!({"name": "campaign", "type": "string"}));
    let problems = registry.check_compatibility("coupons-value", None, &no_default.to_string(), None).await.unwrap();
    assert!(!problems.is_empty(), "a field without a default must be refused");
}
