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

/// Per stage, the p50/p99 (ms) of `tidings_stage_record_age_seconds` and, as `delivered`, of
/// `tidings_end_to_end_seconds{to="delivered"}` from the gateway's /metrics, estimated from their
/// buckets as Prometheus' `histogram_quantile` does (linear within a bucket).
pub(super) async fn stage_ages(http: &reqwest::Client, url: &str) -> Value {
    let Some(text) = metrics_text(http, url).await else { return Value::Null };
    let mut buckets: std::collections::BTreeMap<&str, Vec<(f64, f64)>> = Default::default();
    for line in text.lines() {
        let key = if line.starts_with("tidings_stage_record_age_seconds_bucket{") {
            label(line, "stage")
        } else if line.starts_with("tidings_end_to_end_seconds_bucket{") && label(line, "to") == Some("delivered") {
            Some("delivered")
        } else {
            None
        };
        let (Some(key), Some(le), Some(v)) = (key, label(line, "le"), sample_value(line)) else { continue };
        let Ok(le) = le.parse::<f64>() else { continue };
        buckets.entry(key).or_default().push((le, v));
    }
    let mut out = serde_json::Map::new();
    for (key, mut b) in buckets {
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        if let (Some(p50), Some(p99)) = (quantile(&b, 0.5), quantile(&b, 0.99)) {
            out.insert(key.to_string(), json!({"p50": (p50 * 1000.0).round(), "p99": (p99 * 1000.0).round()}));
        }
    }
    Value::Object(out)
}

/// The `q` quantile of cumulative buckets `(upper bound, count)` sorted by bound (the last one
/// `+Inf`): interpolated within its bucket; the highest finite bound when it falls in `+Inf`.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let within = count - below;
            let frac = if within > 0.0 { (rank - below) / within } else { 0.0 };
            return Some(lower + (le - lower) * frac);
        }
        (lower, below) = (le, count);
    }
    None
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

#[cfg(test)]
mod tests {
    #[test]
    fn quantiles_interpolate_within_buckets() {
        let b = [(0.01, 50.0), (0.1, 90.0), (1.0, 100.0), (f64::INFINITY, 100.0)];
        assert_eq!(super::quantile(&b, 0.5), Some(0.01));
        assert!((super::quantile(&b, 0.7).unwrap() - 0.055).abs() < 1e-9);
        assert!((super::quantile(&b, 0.99).unwrap() - 0.91).abs() < 1e-9);
        assert_eq!(super::quantile(&[(1.0, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
        assert_eq!(super::quantile(&[(1.0, 1.0), (f64::INFINITY, 4.0)], 0.9), Some(1.0));
    }
}
