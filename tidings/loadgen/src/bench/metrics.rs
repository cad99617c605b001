//! Figures read from tidings' Prometheus `/metrics` page: gauges and counters, the stages' record
//! ages and librdkafka's windows and request counts.

use serde_json::{json, Value};

/// A gauge or counter summed over its label sets, from a Prometheus text page.
pub(super) async fn metric(http: &reqwest::Client, url: &str, name: &str) -> f64 {
    let Some(text) = metrics_text(http, url).await else { return 0.0 };
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(sample_value)
        .sum()
}

/// A Prometheus text page, if it could be fetched.
pub(super) async fn metrics_text(http: &reqwest::Client, url: &str) -> Option<String> {
    http.get(format!("{url}/metrics")).send().await.ok()?.text().await.ok()
}

/// The value of `key` in a sample line's label set.
pub(super) fn label<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(&format!("{key}=\"")).nth(1)?.split('"').next()
}

/// A sample line's value.
pub(super) fn sample_value(line: &str) -> Option<f64> {
    line.split_whitespace().last()?.parse().ok()
}

/// Per stage, the p50/p99 (ms) of `tidings_stage_record_age_seconds` from the gateway's /metrics.
pub(super) async fn stage_ages(http: &reqwest::Client, url: &str) -> Value {
    let Some(text) = metrics_text(http, url).await else { return Value::Null };
    let mut out = serde_json::Map::new();
    let ages = |l: &&str| {
        l.starts_with("tidings_stage_record_age_seconds{")
            || l.starts_with("tidings_gateway_event_age_at_write_seconds{")
    };
    for line in text.lines().filter(ages) {
        let stage = match line.starts_with("tidings_gateway") {
            true => Some("gateway_write"),
            false => label(line, "stage"),
        };
        let (Some(stage), Some(q), Some(v)) = (stage, label(line, "quantile"), sample_value(line)) else {
            continue;
        };
        if q == "0.5" || q == "0.99" {
            let e = out.entry(stage.to_string()).or_insert_with(|| json!({}));
            e[format!("p{}", if q == "0.5" { "50" } else { "99" })] = json!((v * 1000.0).round());
        }
    }
    Value::Object(out)
}

/// Requests tidings' clients sent (librdkafka's counts, its last report) per event posted in the
/// whole run, per client and kind: what the partition count costs each hop.
pub(super) async fn client_requests(http: &reqwest::Client, url: &str, events: usize) -> Value {
    let Some(text) = metrics_text(http, url).await else { return Value::Null };
    let mut out = json!({});
    for line in text.lines().filter(|l| l.starts_with("tidings_kafka_requests{")) {
        if let (Some(client), Some(kind), Some(v)) = (label(line, "client"), label(line, "request"), sample_value(line))
        {
            let sum = out[client][kind].as_f64().unwrap_or(0.0) + v / events.max(1) as f64;
            out[client][kind] = json!(sum);
        }
    }
    out
}

/// librdkafka's own windows from tidings' `/metrics` (its clients' last statistics report, the
/// previous 10 s): per client, each window's p50 / p99 / max in ms.
pub(super) async fn client_windows(http: &reqwest::Client, url: &str) -> Value {
    let Some(text) = metrics_text(http, url).await else { return Value::Null };
    let mut out = serde_json::Map::new();
    for (metric, window) in [
        ("tidings_kafka_rtt_seconds{", "rtt"),
        ("tidings_kafka_producer_queue_seconds{", "producer_queue"),
        ("tidings_kafka_request_queue_seconds{", "request_queue"),
    ] {
        for line in text.lines().filter(|l| l.starts_with(metric)) {
            let (Some(client), Some(stat), Some(v)) = (label(line, "client"), label(line, "stat"), sample_value(line))
            else {
                continue;
            };
            let e = out.entry(client.to_string()).or_insert_with(|| json!({}));
            if e.get(window).is_none() {
                e[window] = json!({});
            }
            e[window][stat] = json!((v * 1e6).round() / 1000.0);
        }
    }
    Value::Object(out)
}
