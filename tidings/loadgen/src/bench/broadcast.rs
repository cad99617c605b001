//! `broadcast`: bursts of CampaignLaunched events over HTTP ingest, each to every connected user,
//! through templating's fan-out.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidings_loadgen::percentiles;

use super::cpu::{wakeups_late, CpuWindow};
use super::load::{campaign, now_micros, pace};
use super::produce::{Sent, Via};
use super::record_times::RecordTimes;
use super::stack::Stack;
use super::users::{round_p99s, wait_samples, Users};

pub(super) const PHASE_BROADCAST: u8 = 12;

pub(super) const PHASE_BROADCAST_WARM: u8 = 13;

/// Between broadcast bursts: the store writes a burst's 100,000 inbox rows after it arrived (its
/// batches linger 1 s; about 1.4 s of SQLite), which would otherwise land in the next burst.
pub(super) const BURST_PAUSE: Duration = Duration::from_secs(3);

/// `broadcast`: `campaigns` CampaignLaunched at `rate`/s, each with all `n` users as its inline
/// audience (10,000 ids are about 110 KB, under ingest's 1 MiB body limit and Kafka's 1 MB
/// record), by `POST /v1/events/coupons` or produced straight to `coupons` (`via`); latency from
/// just before each send to each user's receipt, over every receipt.
pub(super) async fn broadcast(
    name: &str,
    stack: &Stack,
    users: &mut Users,
    n: usize,
    campaigns: usize,
    (rate, rounds, warm): (usize, usize, Duration),
    via: Via<'_>,
) -> anyhow::Result<Value> {
    let rounds = rounds.max(1);
    let (coupons, notifications) = (format!("{}coupons", stack.prefix), format!("{}notifications", stack.prefix));
    let times = RecordTimes::start(&stack.brokers, &[&coupons, &notifications])?;
    let connected = users.grow(n, Duration::from_secs(300)).await;
    let audience: Vec<String> = (0..n).map(|i| users.user(i)).collect();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let per_round = n * campaigns;
    let send_all = |round: String| {
        let t = Instant::now();
        let (audience, run) = (&audience, &run);
        async move {
            let mut sent = Sent::default();
            for k in 0..campaigns {
                let id = format!("bench-bcast-{run}-{round}-{k}");
                let at = now_micros();
                via.send(&mut sent, "coupons", &id, &campaign(&id, audience, at), at);
                pace(t, k, rate).await;
            }
            sent
        }
    };
    // Unmeasured bursts first, for the same reason as in `ingest_latency` (a cold broker JIT
    // compiles through its first minute: seen here as 17% of all CPU samples of one burst).
    users.samples.phase.store(PHASE_BROADCAST_WARM, Ordering::Relaxed);
    let (started, mut warm_rounds, mut warmed_up) = (Instant::now(), 0, true);
    while warm_rounds == 0 || started.elapsed() < warm {
        via.settle(send_all(format!("warm{warm_rounds}")).await).await;
        warm_rounds += 1;
        let want = warm_rounds * per_round;
        warmed_up &= wait_samples(&users.samples, PHASE_BROADCAST_WARM, want, Duration::from_secs(120)).await;
        tokio::time::sleep(BURST_PAUSE).await;
    }
    users.samples.take(PHASE_BROADCAST_WARM);
    users.samples.phase.store(PHASE_BROADCAST, Ordering::Relaxed);
    wakeups_late();
    let cpu = CpuWindow::start(&[stack.proc.pid()]);
    let (mut sent, mut complete, mut wall_secs) = (Sent::default(), true, Vec::new());
    for r in 0..rounds {
        if r > 0 {
            tokio::time::sleep(BURST_PAUSE).await;
        }
        let t = Instant::now();
        sent.merge(send_all(format!("m{r}")).await);
        let want = (r + 1) * per_round;
        complete &= wait_samples(&users.samples, PHASE_BROADCAST, want, Duration::from_secs(120)).await;
        wall_secs.push(t.elapsed().as_secs_f64());
    }
    let late = wakeups_late();
    let cpu = cpu.end(users.samples.count(PHASE_BROADCAST));
    let sent = via.settle(sent).await;
    let expected = rounds * per_round;
    let mut v = users.samples.summary(PHASE_BROADCAST);
    v["client_wakeups_late"] = late;
    v["cpu"] = cpu;
    // Per hop, from the records' CreateTimes (the timestamp consumer may trail a little).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let arrivals = users.samples.take(PHASE_BROADCAST);
    let in_round = format!("bench-bcast-{run}-m");
    v["round_p99_ms"] =
        round_p99s(&arrivals, rounds, |a| a.source_event_id.strip_prefix(&in_round)?.split_once('-')?.0.parse().ok());
    let (mut produce, mut templating, mut delivery) = (Vec::new(), Vec::new(), Vec::new());
    for a in arrivals {
        let (Some(c), Some(nt)) = (times.get(&coupons, &a.source_event_id), times.get(&notifications, &a.position))
        else {
            continue;
        };
        produce.push(c * 1000 - a.occurred_us);
        templating.push((nt - c) * 1000);
        delivery.push(a.received_us - nt * 1000);
    }
    let first_hop = match via {
        Via::Http(..) => "post_to_coupons_record",
        Via::Kafka(..) => "send_to_coupons_record",
    };
    v["hops_ms"] = json!({
        "matched": produce.len(),
        first_hop: percentiles(produce),
        "coupons_to_notifications_record": percentiles(templating),
        "notifications_record_to_stream": percentiles(delivery),
        "note": "from Kafka CreateTime, whole milliseconds: each hop is ±1 ms",
    });
    v["scenario"] = json!(name);
    v["via"] = json!(via.name());
    v["users"] = json!(n);
    v["connected"] = json!(connected);
    v["campaigns"] = json!(campaigns);
    v["campaign_rate"] = json!(rate);
    v["measured_rounds"] = json!(rounds);
    v["expected"] = json!(expected);
    match via {
        Via::Http(..) => v["posts"] = sent,
        Via::Kafka(..) => v["produced"] = sent,
    }
    v["warmed_up"] = json!(warmed_up);
    v["warm_rounds"] = json!(warm_rounds);
    v["complete"] = json!(complete);
    v["wall_secs"] = json!(wall_secs);
    v["path"] = json!(match via {
        Via::Http(..) => "POST /v1/events/coupons → coupons → templating fan-out → notifications → delivery → streams",
        Via::Kafka(..) => {
            "produce (Avro, registry schema id) → coupons → templating fan-out → notifications → delivery → streams"
        }
    });
    Ok(v)
}
