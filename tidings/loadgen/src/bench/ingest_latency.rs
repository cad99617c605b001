//! `ingest_latency` (and `ingest_latency_embedded`): one OrderPaid per user over HTTP ingest,
//! POST → stream latency and its per-hop split.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidings_loadgen::percentiles;

use super::cpu::{wakeups_late, CpuWindow};
use super::load::{now_micros, order_paid, pace};
use super::metrics::{client_requests, client_windows, stage_ages};
use super::produce::{Sent, Via};
use super::record_times::RecordTimes;
use super::stack::Stack;
use super::users::{round_p99s, wait_samples, Users};

pub(super) const PHASE_WARM: u8 = 10;

pub(super) const PHASE_LATENCY: u8 = 11;

/// The load of `ingest_latency`: `users` streams, `rate` events/s, `warm` unmeasured first, then
/// `rounds` measured rounds of one event per user.
pub(super) struct LatencyLoad {
    pub(super) users: usize,
    pub(super) rate: usize,
    pub(super) warm: Duration,
    pub(super) rounds: usize,
    pub(super) timeline: Option<PathBuf>,
}

/// `ingest_latency`: one OrderPaid per user at `rate`/s, by `POST /v1/events/orders` or produced
/// straight to `orders` (`via`); per user the time from just before its send to its notification
/// on its stream, split into hops by the CreateTime of its `orders` record (ingest or the
/// producer stamped it) and its `notifications` record (templating produced it).
pub(super) async fn ingest_latency(
    name: &str,
    stack: &Stack,
    users: &mut Users,
    load: LatencyLoad,
    via: Via<'_>,
    http: &reqwest::Client,
) -> anyhow::Result<Value> {
    let LatencyLoad { users: n, rate, warm, rounds: measured_rounds, timeline } = load;
    let measured_rounds = measured_rounds.max(1);
    let (orders, notifications) = (format!("{}orders", stack.prefix), format!("{}notifications", stack.prefix));
    let times = RecordTimes::start(&stack.brokers, &[&orders, &notifications])?;
    let connected = users.grow(n, Duration::from_secs(120)).await;
    // The same load, unmeasured, for `warm` first (whole rounds): connections, group assignments,
    // schema look-ups and the broker's JIT are then warm, as in a service that has been running.
    // A freshly started JVM compiles its hot paths for about a minute, its C2 threads taking up to
    // half a core here: a bare produce → consume hop at 2,000/s (`--example kafka_hop`,
    // Shenandoah) had p99 10.4, 4.5, 2.5, 2.8, 2.6 ms in consecutive 10 s runs after a start.
    users.samples.phase.store(PHASE_WARM, Ordering::Relaxed);
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut rounds = 0;
    let started = Instant::now();
    while rounds == 0 || started.elapsed() < warm {
        let t = Instant::now();
        let mut sent = Sent::default();
        for i in 0..n {
            let event = format!("warm-{run}-{rounds}-{i}");
            via.send(&mut sent, "orders", &event, &order_paid(&event, &users.user(i), now_micros()), now_micros());
            pace(t, i, rate).await;
        }
        via.settle(sent).await;
        rounds += 1;
    }
    let warmed_up = wait_samples(&users.samples, PHASE_WARM, rounds * n, Duration::from_secs(60)).await;
    users.samples.take(PHASE_WARM);

    users.samples.phase.store(PHASE_LATENCY, Ordering::Relaxed);
    wakeups_late();
    let cpu = CpuWindow::start(&[stack.proc.pid()]);
    let t = Instant::now();
    let mut sent = Sent::default();
    for k in 0..n * measured_rounds {
        let (round, user) = (k / n, users.user(k % n));
        let event = format!("lat-{run}-{round}-{user}");
        let at = now_micros();
        via.send(&mut sent, "orders", &event, &order_paid(&event, &user, at), at);
        pace(t, k, rate).await;
    }
    let post_secs = t.elapsed().as_secs_f64();
    let sent = via.settle(sent).await;
    let expected = n * measured_rounds;
    let complete = wait_samples(&users.samples, PHASE_LATENCY, expected, Duration::from_secs(60)).await;
    let late = wakeups_late();
    let cpu = cpu.end(users.samples.count(PHASE_LATENCY));
    let wall_secs = t.elapsed().as_secs_f64();
    // The timestamp consumer may trail the streams a little; it has seen the warm-up's records
    // and the measured ones of each topic (from where they ended when it started) when both
    // counts reach (rounds + measured_rounds) * n.
    let all = (rounds + measured_rounds) * n;
    let deadline = Instant::now() + Duration::from_secs(10);
    while (times.count(&orders) < all || times.count(&notifications) < all) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut v = users.samples.summary(PHASE_LATENCY);
    let arrivals = users.samples.take(PHASE_LATENCY);
    let measured = format!("lat-{run}-");
    v["round_p99_ms"] = round_p99s(&arrivals, measured_rounds, |a| {
        a.source_event_id.strip_prefix(&measured)?.split_once('-')?.0.parse().ok()
    });
    let (mut produce, mut templating, mut delivery) = (Vec::new(), Vec::new(), Vec::new());
    let mut lines = timeline
        .as_ref()
        .map(|_| String::from("post_us,orders_record_us,notifications_record_us,received_us,position\n"));
    for a in arrivals {
        // A user's notification records are keyed alike; its stream position tells them apart.
        let (Some(o), Some(nt)) = (times.get(&orders, &a.source_event_id), times.get(&notifications, &a.position))
        else {
            continue;
        };
        if let Some(lines) = lines.as_mut() {
            lines.push_str(&format!("{},{},{},{},{}\n", a.occurred_us, o * 1000, nt * 1000, a.received_us, a.position));
        }
        produce.push(o * 1000 - a.occurred_us);
        templating.push((nt - o) * 1000);
        delivery.push(a.received_us - nt * 1000);
    }
    if let (Some(path), Some(lines)) = (timeline, lines) {
        // A failed write is reported on the line; the measurement itself still counts.
        let path = path.to_string_lossy().replace("{scenario}", name);
        v["timeline"] = match std::fs::write(&path, lines) {
            Ok(()) => json!(path),
            Err(e) => json!({"path": path, "error": e.to_string()}),
        };
    }
    v["scenario"] = json!(name);
    v["via"] = json!(via.name());
    v["partitions"] = Value::Object(times.partitions.clone());
    v["users"] = json!(n);
    v["connected"] = json!(connected);
    v["target_rate"] = json!(rate);
    v["measured_rounds"] = json!(measured_rounds);
    v["expected"] = json!(expected);
    v["achieved_rate"] = json!(expected as f64 / post_secs);
    match via {
        Via::Http(..) => v["posts"] = sent,
        Via::Kafka(..) => v["produced"] = sent,
    }
    v["warmed_up"] = json!(warmed_up);
    v["warm_rounds"] = json!(rounds);
    v["complete"] = json!(complete);
    v["wall_secs"] = json!(wall_secs);
    let first_hop = match via {
        Via::Http(..) => "post_to_orders_record",
        Via::Kafka(..) => "send_to_orders_record",
    };
    v["hops_ms"] = json!({
        "matched": produce.len(),
        first_hop: percentiles(produce),
        "orders_to_notifications_record": percentiles(templating),
        "notifications_record_to_stream": percentiles(delivery),
        "note": "from Kafka CreateTime, whole milliseconds: each hop is ±1 ms",
        "consumed_after_ms": stage_ages(http, &stack.url).await,
        "consumed_after_note": "the stages' own tidings_stage_record_age_seconds (CreateTime → consumed) and, as delivered, tidings_end_to_end_seconds{to=\"delivered\"} (occurred_at → its stream takes it to write), over the whole run (warm-up included), from their buckets (histogram_quantile)",
        "kafka_clients_ms": client_windows(http, &stack.url).await,
        "kafka_requests_per_event": client_requests(http, &stack.url, (rounds + measured_rounds) * n).await,
        "kafka_requests_note": "requests each client sent (Produce, Fetch) per event posted in the run, warm-up included, counted to its last statistics report (up to 10 s before this line, so a little low); librdkafka puts one partition in a produce request",
        "kafka_clients_note": "librdkafka's statistics of tidings' clients (tidings_kafka_*_seconds), its last 10 s report: rtt = request → response (a consumer's include fetch long-polls), producer_queue = produce() → written into a request, request_queue = request ready → handed to the socket",
    });
    v["path"] = json!(match via {
        Via::Http(..) => "POST /v1/events/orders → orders → templating → notifications → delivery → stream",
        Via::Kafka(..) =>
            "produce (Avro, registry schema id) → orders → templating → notifications → delivery → stream",
    });
    v["client_wakeups_late"] = late;
    v["cpu"] = cpu;
    Ok(v)
}
