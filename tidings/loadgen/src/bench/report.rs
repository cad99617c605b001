//! The JSON lines: each scenario's (with the load average), and the tidings ÷ nchan comparison.

use std::collections::HashMap;

use serde_json::{json, Value};

/// tidings ÷ nchan latency for each pair of scenarios that both ran.
pub(super) fn comparison(results: &HashMap<String, Value>) -> Option<Value> {
    let pairs = [
        ("ingest_latency", "nchan_fanout"),
        ("ingest_latency_kafka", "nchan_fanout"),
        ("ingest_latency_embedded", "nchan_fanout"),
        ("broadcast", "nchan_broadcast"),
        ("broadcast_kafka", "nchan_broadcast"),
    ];
    let mut out = serde_json::Map::new();
    for (ours, theirs) in pairs {
        let (Some(a), Some(b)) = (results.get(ours), results.get(theirs)) else { continue };
        let q = |v: &Value, k: &str| v["latency_ms"][k].as_f64();
        let ratio = |k: &str| Some(q(a, k)? / q(b, k)?);
        out.insert(
            format!("{ours}/{theirs}"),
            json!({
                "p50_ratio": ratio("p50"), "p99_ratio": ratio("p99"),
                "tidings_ms": {"p50": q(a, "p50"), "p99": q(a, "p99")},
                "nchan_ms": {"p50": q(b, "p50"), "p99": q(b, "p99")},
            }),
        );
    }
    if out.is_empty() {
        return None;
    }
    out.insert("scenario".into(), json!("comparison"));
    out.insert(
        "note".into(),
        json!(
            "latency ratio tidings / nchan (> 1: tidings slower); nchan publishes straight to its subscribers, \
               tidings goes through Kafka twice (orders, notifications) plus templating"
        ),
    );
    Some(Value::Object(out))
}

/// Prints a JSON line, with the 1-minute load average: the clients, broker and servers share the
/// machine, and anything else running on it shows up in the latencies.
pub(super) fn emit(mut v: Value) {
    let load = std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| s.split(' ').next()?.parse::<f64>().ok());
    v["load_avg_1m"] = json!(load);
    println!("{v}");
}

/// Prints a scenario's line (an `error` line if it failed, so the other scenarios still run) and
/// keeps it for the comparison.
pub(super) fn report(results: &mut HashMap<String, Value>, name: &str, outcome: anyhow::Result<Value>) {
    let v = outcome.unwrap_or_else(|e| json!({"scenario": name, "error": format!("{e:#}")}));
    emit(v.clone());
    if v.get("error").is_none() {
        results.insert(name.to_string(), v);
    }
}
