//! One trace per event from ingest to the browser's stream, on Apache Kafka (`TIDINGS_TEST_BROKERS`):
//! HTTP ingest, templating, persistence and delivery run in this process under an OpenTelemetry
//! layer with an in-memory exporter. An event posted over HTTP, and one a Kafka client produced
//! with its own `traceparent` (Avro in the Confluent wire format, as upstream services write),
//! each give one trace id with the messaging conventions' spans: `send orders` → `process orders`
//! → `send notifications` → `process notifications` (delivery) → `sse write`, and persistence's
//! batch `process notifications` linked to the record's context. A group record (a room message
//! for two members) gives each member's `sse write` a trace of its own, linked to the record's span.

use opentelemetry::trace::{SpanId, SpanKind, TraceId, TracerProvider as _};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidings_core::client_stats::{reporting, ClientStats};
use tidings_core::json_avro::json_to_avro;
use tidings_core::kafka::KafkaConfig;
use tidings_core::{FramedEncoder, RegistryClient};
use tidings_gateway::auth::{AuthConfig, Key};
use tidings_gateway::browser::BrowserAccess;
use tidings_gateway::delivery::{self, DeliveryConfig, Hub, HubConfig, Owners};
use tidings_gateway::produce::EventProducer;
use tidings_gateway::service_auth::ServiceTokens;
use tidings_gateway::{IngestState, IngestTopic, Readiness, StreamState};
use tidings_pipeline::registry::Registry;
use tidings_pipeline::stages::templating::{self, TemplatingConfig};
use tidings_pipeline::topology::Topology;
use tidings_sinks::persistence::{self, PersistenceConfig};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

const SECRET: &[u8] = b"traces-test-secret";
const SERVICE_TOKEN: &str = "traces-test-service-token-0123456789";
const WAIT: Duration = Duration::from_secs(30);

/// The in-memory exporter behind the process's subscriber, built as `tidings up` builds it: the
/// log (here WARN) and `tidings_core::trace::otel_layer`, each with its own filter.
fn install_tracing() -> InMemorySpanExporter {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    let log = tracing_subscriber::fmt::layer()
        .with_test_writer()
        .with_filter(tracing_subscriber::EnvFilter::new("warn,librdkafka=off,rdkafka=off"));
    tracing_subscriber::registry().with(log).with(tidings_core::trace::otel_layer(provider.tracer("tidings"))).init();
    exporter
}

fn attr<'a>(s: &'a SpanData, key: &str) -> Option<&'a Value> {
    s.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| &kv.value)
}

fn str_attr(s: &SpanData, key: &str) -> String {
    match attr(s, key) {
        Some(Value::String(v)) => v.to_string(),
        other => panic!("span {:?}: {key} is {other:?}, not a string", s.name),
    }
}

fn int_attr(s: &SpanData, key: &str) -> i64 {
    match attr(s, key) {
        Some(Value::I64(v)) => *v,
        other => panic!("span {:?}: {key} is {other:?}, not an integer", s.name),
    }
}

/// The attributes every messaging span has, with its operation.
fn assert_messaging(s: &SpanData, kind: SpanKind, op: &str, destination: &str) {
    assert_eq!(s.span_kind, kind, "{:?}", s.name);
    assert_eq!(str_attr(s, "messaging.system"), "kafka", "{:?}", s.name);
    assert_eq!(str_attr(s, "messaging.operation.type"), op, "{:?}", s.name);
    assert_eq!(str_attr(s, "messaging.operation.name"), op, "{:?}", s.name);
    assert_eq!(str_attr(s, "messaging.destination.name"), destination, "{:?}", s.name);
}

/// A consumer's `process` span of one record: where it was read, and by which group.
fn assert_process_record(s: &SpanData, topic: &str, group: &str) {
    assert_eq!(s.name, format!("process {topic}"));
    assert_messaging(s, SpanKind::Consumer, "process", topic);
    assert_eq!(str_attr(s, "messaging.consumer.group.name"), group, "{:?}", s.name);
    let partition = str_attr(s, "messaging.destination.partition.id");
    assert!(partition.parse::<i32>().is_ok_and(|p| p >= 0), "{:?}: partition {partition:?}", s.name);
    assert!(int_attr(s, "messaging.kafka.offset") >= 0, "{:?}", s.name);
}

/// The spans of one event's trace, found by their parents from its first span in tidings.
struct Trace {
    send_event: Option<SpanData>,
    templating: SpanData,
    send_notification: SpanData,
    delivery: SpanData,
    write: SpanData,
    batch: SpanData,
}

struct Names {
    orders: String,
    notifications: String,
    templating_group: String,
    delivery_group: String,
    persistence_group: String,
}

/// The trace `trace_id` once all its spans are exported: the first is the child of `root_parent`
/// (the ingest span when None, else the Kafka client's span).
fn find_trace(spans: &[SpanData], n: &Names, trace_id: TraceId, root_parent: Option<SpanId>) -> Option<Trace> {
    let mine: Vec<&SpanData> = spans.iter().filter(|s| s.span_context.trace_id() == trace_id).collect();
    let child_of = |parent: SpanId, name: &str| {
        mine.iter().find(|s| s.parent_span_id == parent && s.name == name).map(|s| (*s).clone())
    };
    let (send_event, first_parent) = match root_parent {
        Some(p) => (None, p),
        None => {
            let send = mine.iter().find(|s| s.name == format!("send {}", n.orders))?;
            (Some((*send).clone()), send.span_context.span_id())
        }
    };
    let templating = child_of(first_parent, &format!("process {}", n.orders))?;
    let send_notification = child_of(templating.span_context.span_id(), &format!("send {}", n.notifications))?;
    let delivery = mine.iter().find(|s| {
        s.parent_span_id == send_notification.span_context.span_id()
            && attr(s, "messaging.consumer.group.name").is_some_and(|g| g.as_str() == n.delivery_group.as_str())
    })?;
    let delivery = (*delivery).clone();
    let write = child_of(delivery.span_context.span_id(), "sse write")?;
    // The batch starts a trace of its own, linked to each of its records' contexts.
    let batch = spans
        .iter()
        .find(|s| {
            attr(s, "messaging.consumer.group.name").is_some_and(|g| g.as_str() == n.persistence_group.as_str())
                && s.links.iter().any(|l| {
                    let (l, to) = (&l.span_context, &send_notification.span_context);
                    (l.trace_id(), l.span_id()) == (to.trace_id(), to.span_id())
                })
        })?
        .clone();
    Some(Trace { send_event, templating, send_notification, delivery, write, batch })
}

/// Reads an SSE stream until an event whose data holds `needle`; returns its `id:` (partition.offset).
async fn sse_event_with(resp: &mut reqwest::Response, needle: &str) -> String {
    let mut text = String::new();
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(frame) = text.split("\n\n").find(|f| f.contains("\ndata: ") && f.contains(needle)) {
            let id = frame.lines().find_map(|l| l.strip_prefix("id: ")).expect("an event frame has an id");
            return id.to_string();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, resp.chunk())
            .await
            .unwrap_or_else(|_| panic!("no event with {needle} on the stream within {WAIT:?}; got {text:?}"))
            .expect("reading the stream")
            .expect("the stream ended");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
}

/// An OrderPlaced event of `buyer`.
fn order(event_id: &str, buyer: &str) -> serde_json::Value {
    serde_json::json!({"event_id": event_id, "occurred_at": chrono::Utc::now().timestamp_micros(),
        "order_id": format!("o-{event_id}"), "buyer_id": buyer, "locale": "en",
        "payload": {"OrderPlaced": {"amount_cents": 1400, "currency": "EUR",
            "items": [{"sku": "tea-01", "name": "Green tea", "quantity": 1, "unit_price_cents": 1400}]}}})
}

async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_event_is_one_trace_from_ingest_to_the_sse_write() {
    let exporter = install_tracing();
    let Some(brokers) = tidings_core::testing::brokers_or_skip() else { return };
    let run = uuid::Uuid::new_v4().simple().to_string();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let topo = Topology::load(&root.join("topology.yaml")).unwrap().with_prefix(&format!("tr-{}-", &run[..8]));
    let kafka = KafkaConfig::new(&brokers);
    let admin: AdminClient<DefaultClientContext> = kafka.admin().create().unwrap();
    tidings_pipeline::topology::apply::apply(&topo, &admin, WAIT).await.expect("topics");
    let names = Names {
        orders: topo.topic_name("orders"),
        notifications: topo.topic_name(&topo.stages.templating.output),
        templating_group: topo.group_name(&topo.stages.templating.group),
        delivery_group: topo.group_name("tidings-delivery"),
        persistence_group: topo.group_name(&topo.stages.persistence.group),
    };

    // The store (SQLite) and the embedded registry with the topology's schemas.
    let (store, _dir) = tidings_store::testing::fresh_sqlite().await.unwrap();
    let registry = Registry::open(store.clone()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let registry_url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(tidings_pipeline::registry::serve(listener, registry.clone(), stop.clone()));
    for name in topo.topics.keys() {
        if let Some(text) = topo.schema_text(name) {
            registry.register(&format!("{}-value", topo.topic_name(name)), text).await.unwrap();
        }
    }
    let topo = Arc::new(topo);

    // The stages, as `tidings up` starts them.
    let health = tidings_core::shutdown::StageHealth::default;
    let tcfg = TemplatingConfig {
        kafka: kafka.clone(),
        registry: registry_url.clone().into(),
        topology: topo.clone(),
        health: health(),
    };
    tokio::spawn(templating::run(tcfg, store.clone(), stop.clone()));
    let pcfg = PersistenceConfig::new(kafka.clone(), registry_url.clone().into(), &topo);
    tokio::spawn(persistence::run(pcfg, store.clone(), stop.clone()));
    let hub = Hub::new(HubConfig::default(), None);
    let gateway_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway = format!("http://{}", gateway_listener.local_addr().unwrap());
    let owners = Owners::new(&gateway, &names.notifications);
    let owners_topic = topo.topic_name("tidings.gateway.owners");
    let dcfg = DeliveryConfig::new(
        kafka.clone(),
        registry_url.clone().into(),
        names.notifications.clone(),
        names.delivery_group.clone(),
        owners_topic,
    );
    tokio::spawn(delivery::consumer::run(dcfg, hub.clone(), owners.clone(), stop.clone()));
    let auth = Arc::new(AuthConfig { keys: vec![Key::hs256(SECRET)], ..Default::default() });
    let browser = BrowserAccess {
        cors_allow: Default::default(),
        cookie_secure: false,
        cookie_domain: None,
        session_ttl: Duration::from_secs(60),
    };
    let stream = StreamState { hub: hub.clone(), owners, auth: auth.clone(), browser: Arc::new(browser) };
    let app = delivery::stream::router(stream);
    tokio::spawn(async move { axum::serve(gateway_listener, app).await });
    let registry_client = RegistryClient::new(&registry_url).unwrap();
    let producer: FutureProducer<ClientStats> =
        reporting(kafka.producer()).create_with_context(ClientStats::new("ingest-producer")).unwrap();
    let events = Arc::new(EventProducer::new(registry_client.clone(), producer));
    let topics = HashMap::from([(
        "orders".to_string(),
        IngestTopic { physical: names.orders.clone(), key_field: topo.topics["orders"].key.clone() },
    )]);
    let tokens = ServiceTokens::new([SERVICE_TOKEN]).unwrap();
    let ingest = Arc::new(IngestState { topics, events, tokens, users: Some(auth) });
    let ingest = serve(tidings_gateway::ingest_app(ingest, Readiness::default())).await;

    // A stream for each buyer, open before their event (a first stream starts from now).
    let http = reqwest::Client::new();
    let (http_buyer, kafka_buyer) = (format!("u-http-{run}"), format!("u-kafka-{run}"));
    // Two members of a room whose message is one group record on their common partition.
    let partitions = topo.topics["notifications"].partitions;
    let members: Vec<String> = {
        let on = |u: &String| tidings_core::kafka::partition_for(u, partitions);
        let first = format!("u-room-{run}-0");
        let p = on(&first);
        let second = (1..).map(|i| format!("u-room-{run}-{i}")).find(|u| on(u) == p).unwrap();
        vec![first, second]
    };
    let mut streams = Vec::new();
    for user in [&http_buyer, &kafka_buyer, &members[0], &members[1]] {
        let token = tidings_gateway::auth::mint_hs256(SECRET, user, Duration::from_secs(600), None, None).unwrap();
        let deadline = Instant::now() + Duration::from_secs(45);
        let mut resp = loop {
            let r = http.get(format!("{gateway}/v1/stream")).bearer_auth(&token).send().await.unwrap();
            // 503 (or a `retry:` stream for EventSource clients) until delivery owns the partition.
            if r.status() == 200 && r.headers().get("retry-after").is_none() {
                break r;
            }
            assert!(Instant::now() < deadline, "no stream for {user}: {}", r.status());
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let first = tokio::time::timeout(WAIT, resp.chunk()).await.unwrap().unwrap().unwrap();
        assert!(first.starts_with(b"retry:"), "{}", String::from_utf8_lossy(&first));
        streams.push(resp);
    }

    // One event over HTTP ingest, without a traceparent: the ingest span starts the trace.
    let http_event = format!("ev-http-{run}");
    let resp = http
        .post(format!("{ingest}/v1/events/orders"))
        .bearer_auth(SERVICE_TOKEN)
        .json(&order(&http_event, &http_buyer))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let answer: serde_json::Value = resp.json().await.unwrap();
    let traceparent = answer["traceparent"].as_str().unwrap().to_string();
    let (http_trace, ingest_span) = tidings_core::trace::parse_traceparent(&traceparent).expect("a traceparent");
    let (http_trace, ingest_span) = (TraceId::from_hex(http_trace).unwrap(), SpanId::from_hex(ingest_span).unwrap());

    // One event produced by a Kafka client with its own traceparent.
    let (kafka_trace, client_span) = (TraceId::from_hex(&run).unwrap(), SpanId::from_hex(&run[..16]).unwrap());
    let kafka_event = format!("ev-kafka-{run}");
    let (id, schema) = registry_client.latest(&format!("{}-value", names.orders)).await.unwrap();
    let payload = FramedEncoder::new(id, schema)
        .unwrap()
        .encode(json_to_avro(schema, &order(&kafka_event, &kafka_buyer)).unwrap())
        .unwrap();
    let client: FutureProducer = kafka.producer().create().unwrap();
    let tp = format!("00-{kafka_trace}-{client_span}-01");
    let headers = OwnedHeaders::new().insert(Header { key: "traceparent", value: Some(&tp) });
    let key = format!("o-{kafka_event}");
    let rec = FutureRecord::to(&names.orders).key(&key).payload(&payload).headers(headers);
    client.send(rec, WAIT).await.expect("producing the Kafka client's event");

    // Each reaches its buyer's stream.
    let http_id = sse_event_with(&mut streams[0], &http_event).await;
    let kafka_id = sse_event_with(&mut streams[1], &kafka_event).await;

    // And each is one trace through every stage.
    let deadline = Instant::now() + WAIT;
    let (by_http, by_kafka) = loop {
        let spans = exporter.get_finished_spans().unwrap();
        let by_http = find_trace(&spans, &names, http_trace, None);
        let by_kafka = find_trace(&spans, &names, kafka_trace, Some(client_span));
        if let (Some(h), Some(k)) = (by_http, by_kafka) {
            break (h, k);
        }
        if Instant::now() > deadline {
            let seen: Vec<String> = spans
                .iter()
                .map(|s| {
                    format!(
                        "{} {} {} <- {}",
                        s.name,
                        s.span_context.trace_id(),
                        s.span_context.span_id(),
                        s.parent_span_id
                    )
                })
                .collect();
            panic!("the traces {http_trace} and {kafka_trace} are not complete within {WAIT:?}; spans: {seen:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // The ingest span: the producer span of the event, at the record's coordinates.
    let send = by_http.send_event.as_ref().unwrap();
    assert_eq!(send.span_context.span_id(), ingest_span, "the record carries the ingest span's context");
    assert_eq!(send.parent_span_id, SpanId::INVALID, "without a traceparent the ingest span is the root");
    assert_eq!(send.name, format!("send {}", names.orders));
    assert_messaging(send, SpanKind::Producer, "send", &names.orders);
    assert_eq!(str_attr(send, "messaging.destination.partition.id"), answer["partition"].to_string());
    assert_eq!(int_attr(send, "messaging.kafka.offset"), answer["offset"].as_i64().unwrap());

    for (t, sse_id) in [(&by_http, &http_id), (&by_kafka, &kafka_id)] {
        assert_process_record(&t.templating, &names.orders, &names.templating_group);
        assert_eq!(t.send_notification.name, format!("send {}", names.notifications));
        assert_messaging(&t.send_notification, SpanKind::Producer, "send", &names.notifications);
        assert_process_record(&t.delivery, &names.notifications, &names.delivery_group);
        // The write is of the record delivery processed, at the position the stream sent.
        let position = format!(
            "{}.{}",
            str_attr(&t.delivery, "messaging.destination.partition.id"),
            int_attr(&t.delivery, "messaging.kafka.offset")
        );
        assert_eq!(&position, sse_id, "the delivered record is the one the stream wrote");
        assert_eq!(int_attr(&t.write, "messaging.kafka.offset"), int_attr(&t.delivery, "messaging.kafka.offset"));
        // Persistence's batch: a consumer span of its own trace, linked to the record's context.
        assert_eq!(t.batch.name, format!("process {}", names.notifications));
        assert_messaging(&t.batch, SpanKind::Consumer, "process", &names.notifications);
        assert_eq!(str_attr(&t.batch, "messaging.consumer.group.name"), names.persistence_group);
        assert_ne!(t.batch.span_context.trace_id(), t.send_notification.span_context.trace_id());
    }
    if by_http.templating.span_context.trace_id() == by_kafka.templating.span_context.trace_id() {
        panic!("the two events share a trace");
    }

    // The tree, as the report shows it.
    for (label, t) in [("HTTP", &by_http), ("Kafka client", &by_kafka)] {
        let root = match &t.send_event {
            Some(s) => format!("{} [{:?}]", s.name, s.span_kind),
            None => format!("(the client's span {})", t.templating.parent_span_id),
        };
        eprintln!(
            "{label} trace {}:\n  {root}\n    {} [{:?}]\n      {} [{:?}]\n        {} [{:?}]\n          {} [{:?}]\n  \
             linked from {} [{:?}] (trace {})",
            t.templating.span_context.trace_id(),
            t.templating.name,
            t.templating.span_kind,
            t.send_notification.name,
            t.send_notification.span_kind,
            t.delivery.name,
            t.delivery.span_kind,
            t.write.name,
            t.write.span_kind,
            t.batch.name,
            t.batch.span_kind,
            t.batch.span_context.trace_id(),
        );
    }

    // A group record: delivery's span is the record's child, and each member's write starts a
    // trace of its own linked to it.
    let (group_trace, group_parent) =
        (TraceId::from_hex(&format!("{:032x}", 7)).unwrap(), SpanId::from_hex(&format!("{:016x}", 7)).unwrap());
    let message = format!("ev-room-{run}");
    let n = tidings_core::Notification {
        notification_id: uuid::Uuid::nil(),
        user_id: String::new(),
        kind: "chat.message".into(),
        title: "Tea room".into(),
        body: message.clone(),
        link: None,
        source_event_id: message.clone(),
        occurred_at: chrono::Utc::now().timestamp_micros(),
        source_topic: topo.topic_name("chat"),
        source_partition: 0,
        source_offset: 0,
        data: None,
        inbox: true,
        category: String::new(),
        recipients: members.clone(),
    };
    let (id, schema) = registry_client.latest(&format!("{}-value", names.notifications)).await.unwrap();
    let payload = FramedEncoder::new(id, schema).unwrap().encode(n.to_value()).unwrap();
    let tp = format!("00-{group_trace}-{group_parent}-01");
    let headers = OwnedHeaders::new().insert(Header { key: "traceparent", value: Some(&tp) });
    let partition = tidings_core::kafka::partition_for(&members[0], partitions);
    let rec = FutureRecord::<(), _>::to(&names.notifications).partition(partition).payload(&payload).headers(headers);
    client.send(rec, WAIT).await.expect("producing the group record");
    for s in &mut streams[2..] {
        sse_event_with(s, &message).await;
    }
    let deadline = Instant::now() + WAIT;
    let (record, writes) = loop {
        let spans = exporter.get_finished_spans().unwrap();
        let record = spans.iter().find(|s| {
            s.parent_span_id == group_parent
                && attr(s, "messaging.consumer.group.name").is_some_and(|g| g.as_str() == names.delivery_group.as_str())
        });
        if let Some(record) = record {
            let linked =
                |s: &&SpanData| s.links.iter().any(|l| l.span_context.span_id() == record.span_context.span_id());
            let writes: Vec<SpanData> =
                spans.iter().filter(|s| s.name == "sse write").filter(linked).cloned().collect();
            if writes.len() == members.len() {
                break (record.clone(), writes);
            }
        }
        assert!(Instant::now() < deadline, "no write spans linked to the group record within {WAIT:?}: {spans:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(record.span_context.trace_id(), group_trace);
    assert_process_record(&record, &names.notifications, &names.delivery_group);
    for w in &writes {
        assert_eq!(w.parent_span_id, SpanId::INVALID, "a recipient's write is the root of its own trace");
        assert_ne!(w.span_context.trace_id(), group_trace);
        assert_eq!(int_attr(w, "messaging.kafka.offset"), int_attr(&record, "messaging.kafka.offset"));
    }
    assert_ne!(writes[0].span_context.trace_id(), writes[1].span_context.trace_id(), "a trace per recipient");
    eprintln!(
        "Group record trace {group_trace}:\n  (the producer's span {group_parent})\n    {} [{:?}]\n  \
         linked from {} sse write spans, each the root of its own trace",
        record.name,
        record.span_kind,
        writes.len()
    );
    stop.cancel();
}
