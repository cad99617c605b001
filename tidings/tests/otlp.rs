//! OTLP export end to end: `tidings up` on its embedded defaults, with OTEL_EXPORTER_OTLP_ENDPOINT
//! pointing at a fake collector in this test, turns one ingested event into one trace: `send orders`
//! (ingest, child of the caller's traceparent) → `process orders` (templating) → `send
//! notifications`, and persistence's batch `process notifications` linked to the last.

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The child process, SIGKILLed if the test ends (or panics) while it still runs.
struct Guard {
    child: Child,
    log: PathBuf,
}

impl Guard {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!("---- tidings log (last 40 lines) ----\n{}\n----", lines[lines.len().saturating_sub(40)..].join("\n"))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A collector that keeps every body POSTed to /v1/traces.
type Bodies = Arc<Mutex<Vec<Bytes>>>;

async fn collect(State(bodies): State<Bodies>, body: Bytes) -> ([(&'static str, &'static str); 1], Vec<u8>) {
    bodies.lock().unwrap().push(body);
    // An empty ExportTraceServiceResponse: full success.
    ([("content-type", "application/x-protobuf")], Vec::new())
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The length-delimited fields (messages, strings, bytes) of one protobuf message, by number;
/// numeric fields are skipped. Enough of the wire format for OTLP traces.
fn fields(mut buf: &[u8]) -> Vec<(u32, &[u8])> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let Some(tag) = varint(&mut buf) else { break };
        let skip = match tag & 7 {
            0 => varint(&mut buf).map(|_| 0),
            1 => Some(8),
            5 => Some(4),
            2 => {
                let Some(len) = varint(&mut buf) else { break };
                let len = len as usize;
                if buf.len() < len {
                    break;
                }
                out.push(((tag >> 3) as u32, &buf[..len]));
                Some(len)
            }
            _ => None,
        };
        match skip {
            Some(n) if n <= buf.len() => buf = &buf[n..],
            _ => break,
        }
    }
    out
}

fn sub<'a>(msg: &'a [u8], num: u32) -> impl Iterator<Item = &'a [u8]> + 'a {
    fields(msg).into_iter().filter(move |(n, _)| *n == num).map(|(_, b)| b)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What the test needs of one exported span.
#[derive(Debug, Clone, Default)]
struct SpanInfo {
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    /// (trace id, span id) of each link.
    links: Vec<(String, String)>,
    /// service.name of the span's resource.
    service: String,
}

/// ExportTraceServiceRequest{resource_spans=1} → ResourceSpans{resource=1, scope_spans=2} →
/// ScopeSpans{spans=2} → Span{trace_id=1, span_id=2, parent_span_id=4, name=5, links=13{1,2}}.
fn spans_of(body: &[u8]) -> Vec<SpanInfo> {
    let mut out = Vec::new();
    for rs in sub(body, 1) {
        let mut service = String::new();
        for resource in sub(rs, 1) {
            for kv in sub(resource, 1) {
                let key = sub(kv, 1).next().unwrap_or_default();
                if key == b"service.name" {
                    if let Some(s) = sub(kv, 2).next().and_then(|any| sub(any, 1).next()) {
                        service = String::from_utf8_lossy(s).into_owned();
                    }
                }
            }
        }
        for ss in sub(rs, 2) {
            for span in sub(ss, 2) {
                let mut info = SpanInfo { service: service.clone(), ..Default::default() };
                for (n, b) in fields(span) {
                    match n {
                        1 => info.trace_id = hex(b),
                        2 => info.span_id = hex(b),
                        4 => info.parent_span_id = hex(b),
                        5 => info.name = String::from_utf8_lossy(b).into_owned(),
                        13 => {
                            let t = sub(b, 1).next().map(hex).unwrap_or_default();
                            let s = sub(b, 2).next().map(hex).unwrap_or_default();
                            info.links.push((t, s));
                        }
                        _ => {}
                    }
                }
                out.push(info);
            }
        }
    }
    out
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_is_one_trace_from_ingest_through_persistence() {
    let bodies: Bodies = Arc::default();
    let collector = axum::Router::new().route("/v1/traces", post(collect)).with_state(bodies.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, collector).await });

    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("tidings.log");
    let out = std::fs::File::create(&log).unwrap();
    let err = out.try_clone().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tidings"))
        .arg("up")
        .arg("--database-url")
        .arg(format!("sqlite://{}/t.db", tmp.path().display()))
        .args(["--http", "127.0.0.1:0", "--registry-listen", "127.0.0.1:0", "--ingest-listen", "127.0.0.1:0", "--dev"])
        .arg("--data-dir")
        .arg(tmp.path())
        .arg("--topology")
        .arg(repo_root().join("topology.yaml"))
        .current_dir(repo_root())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_COMPRESSION")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION")
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("TIDINGS_BROKERS")
        .env_remove("TIDINGS_SCHEMA_REGISTRY_URL")
        .env_remove("TIDINGS_TOPIC_PREFIX")
        .env("TIDINGS_LOG", "info,librdkafka=warn,rdkafka=warn,sqlx=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .expect("spawning tidings up");
    let mut up = Guard { child, log };

    // The gateway's address, once `up` has written it.
    let endpoints = tmp.path().join("endpoints.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    let gateway = loop {
        if let Some(http) = std::fs::read(&endpoints)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["ingest"].as_str().map(str::to_string))
        {
            break http;
        }
        if let Some(status) = up.child.try_wait().unwrap() {
            panic!("tidings up exited ({status}) before it was up\n{}", up.log_tail());
        }
        assert!(Instant::now() < deadline, "tidings up did not write endpoints.json within 60 s\n{}", up.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let caller_span = &uuid::Uuid::new_v4().simple().to_string()[..16];
    let traceparent = format!("00-{trace_id}-{caller_span}-01");
    let event = json!({"event_id": uuid::Uuid::new_v4().to_string(), "occurred_at": chrono::Utc::now().timestamp_micros(),
        "order_id": "o-otlp-1", "buyer_id": "u-otlp", "locale": "en", "payload": {"OrderPlaced": {"amount_cents": 1400,
        "currency": "EUR", "items": [{"sku": "tea-01", "name": "Green tea", "quantity": 1, "unit_price_cents": 1400}]}}});
    let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().unwrap();
    let resp = http
        .post(format!("{gateway}/v1/events/orders"))
        .bearer_auth(tidings_gateway::service_auth::DEV_SERVICE_TOKEN)
        .header("traceparent", &traceparent)
        .json(&event)
        .send()
        .await
        .expect("POST to the gateway");
    let status = resp.status().as_u16();
    let answer: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 202, "ingest answered {status}: {answer}\n{}", up.log_tail());

    // Wait until the collector holds the whole trace.
    let raw_trace_id: Vec<u8> = (0..16).map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap()).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (ingest, templating, batch) = loop {
        let received: Vec<Bytes> = bodies.lock().unwrap().clone();
        let spans: Vec<SpanInfo> = received
            .iter()
            .filter(|b| b.windows(16).any(|w| w == raw_trace_id.as_slice()))
            .flat_map(|b| spans_of(b))
            .collect();
        let ingest = spans.iter().find(|s| s.name == "send orders" && s.trace_id == trace_id).cloned();
        let templating = spans.iter().find(|s| s.name == "process orders" && s.trace_id == trace_id).cloned();
        let send = templating.as_ref().and_then(|t| {
            spans.iter().find(|s| s.name == "send notifications" && s.parent_span_id == t.span_id).cloned()
        });
        let batch = send.as_ref().and_then(|t| {
            spans
                .iter()
                .find(|s| s.name == "process notifications" && s.links.contains(&(trace_id.clone(), t.span_id.clone())))
                .cloned()
        });
        if let (Some(i), Some(t), Some(b)) = (&ingest, &templating, &batch) {
            break (i.clone(), t.clone(), b.clone());
        }
        if Instant::now() > deadline {
            let names: HashSet<String> =
                received.iter().flat_map(|b| spans_of(b)).map(|s| format!("{} {}", s.name, s.trace_id)).collect();
            panic!(
                "within 30 s the collector got {} export(s) but not the full trace {trace_id}: ingest {:?}, templating {:?}, \
                 batch {:?}; spans seen: {names:?}\n{}",
                received.len(),
                ingest,
                templating,
                batch,
                up.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // ingest is the caller's child, templating is ingest's child, the batch links to templating.
    assert_eq!(ingest.parent_span_id, caller_span, "ingest's parent is the request's traceparent");
    assert_eq!(templating.parent_span_id, ingest.span_id, "templating's parent is the ingest span");
    assert_ne!(templating.span_id, ingest.span_id);
    assert_eq!(ingest.service, "tidings");
    assert_eq!(batch.service, "tidings");
    // The record got the ingest span's context, and the gateway says so.
    assert_eq!(answer["traceparent"], format!("00-{trace_id}-{}-01", ingest.span_id), "{answer}");

    let kill = Command::new("kill").arg("-TERM").arg(up.child.id().to_string()).status().expect("running kill");
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(40);
    let exit = loop {
        if let Some(s) = up.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "tidings up did not exit within 40 s of SIGTERM\n{}", up.log_tail());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "tidings up exited with {exit} after SIGTERM\n{}", up.log_tail());
    let log = std::fs::read_to_string(&up.log).unwrap_or_default();
    assert!(!log.contains("flushing spans"), "span flush on exit failed\n{}", up.log_tail());
    server.abort();
}
