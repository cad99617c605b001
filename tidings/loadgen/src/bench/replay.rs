//! The replay benchmark on Apache Kafka and PostgreSQL (`.ci/bench-replay`): a campaign persists N
//! notifications through a running `tidings up`, a tenth of the rows is deleted, and `tidings replay
//! --stage persistence --execute` restores them over the whole range while a live SSE load runs.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use serde_json::{json, Value};
use tidings_loadgen::percentiles;

use super::campaigns::{
    copy_peer, import_segment, migrate, run_watched, segment_name, wait_stored, watch_stored, Beside, Env, Up,
    USER_PREFIX,
};
use super::claims::{drop_database, fresh_database, with_log};
use super::cpu::CpuWindow;
use super::load::{order_paid, pace};
use super::produce::EventProducer;
use super::users::Users;
use super::{now_micros, Proc};

/// The size and ratios issue 26 states its aims for.
const AIM_EVENTS: usize = 1_000_000;
const AIM_EVENTS_PER_SEC: f64 = 100_000.0;
const AIM_P99_RATIO: f64 = 1.2;

/// Phases of the SSE users' arrivals: the live load's warm-up, its window without a replay, and
/// the window the replay runs in.
const WARM: u8 = 30;
const WITHOUT: u8 = 31;
const DURING: u8 = 32;

/// replay_1m's settings (flags of `bench`).
#[derive(Debug, Clone)]
pub struct ReplayOpts {
    /// Notifications persisted (a campaign to a segment of this size) and replayed.
    pub notifications: usize,
    /// Connected SSE users receiving the live load.
    pub sse_users: usize,
    /// Live events per second produced to `orders` (one per user in turn).
    pub live_rate: usize,
    /// Seconds of live load measured without a replay.
    pub baseline_secs: u64,
    /// Percent of the persisted rows deleted before the replay.
    pub delete_percent: u32,
}

/// Runs replay_1m and answers its line.
pub async fn run(
    bin: &Path,
    root: &Path,
    topology: &Path,
    brokers: &str,
    prefix: &str,
    o: &ReplayOpts,
) -> anyhow::Result<Value> {
    ensure!(o.notifications > 0 && o.sse_users > 0 && o.live_rate > 0, "sizes and the live rate must be positive");
    ensure!((1..=100).contains(&o.delete_percent), "--replay-delete-percent must be 1 to 100");
    let (pool, db) = fresh_database(4).await.context("a fresh PostgreSQL database")?;
    let mut env = Env { bin, root, topology, brokers, prefix, db, pool, imported: HashSet::new() };
    let v = scenario(&mut env, o).await;
    drop_database(env.pool.clone(), &env.db).await;
    v
}

/// RFC 3339 with milliseconds, as `tidings replay --from/--to` takes it.
fn rfc3339(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The first number after `label` in `text` (the replay's summary lines), commas allowed.
fn number_after(text: &str, label: &str) -> Option<i64> {
    let rest = &text[text.find(label)? + label.len()..];
    let digits: String =
        rest.trim_start().chars().take_while(|c| c.is_ascii_digit() || *c == ',').filter(|c| *c != ',').collect();
    digits.parse().ok()
}

async fn scenario(env: &mut Env<'_>, o: &ReplayOpts) -> anyhow::Result<Value> {
    let n = o.notifications;
    migrate(env).await?;
    let (w, _) = import_segment(env, n).await.with_context(|| format!("importing a {n}-user segment"))?;
    eprintln!("bench: segment {} imported in {:.1} s", segment_name(n), w.secs);
    let up = Up::start(env).await?;
    let v = with_up(env, &up, o).await.map_err(|e| with_log(e, &up.proc_));
    let mut up = up;
    up.proc_.shutdown().await;
    v
}

async fn with_up(env: &Env<'_>, up: &Up, o: &ReplayOpts) -> anyhow::Result<Value> {
    let n = o.notifications;
    let mut users = Users::new(&up.url, USER_PREFIX);
    let connected = users.grow(o.sse_users, Duration::from_secs(120)).await;
    ensure!(connected >= o.sse_users, "{connected} of {} SSE users connected", o.sse_users);
    // Warm-up, unmeasured, before the range: a campaign to 1,000 users nobody is connected as.
    let warm: Vec<String> = (0..1_000).map(|i| format!("w{i:06}")).collect();
    let warm_id = format!("bench-warm-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    users.samples.phase.store(1, Ordering::Relaxed);
    up.launch(&warm_id, &[], &warm, now_micros()).await?;
    wait_stored(env, up, &warm_id, warm.len(), Duration::from_secs(120)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The range: from just before the launch to just after every row is stored; nothing else is
    // produced to notifications in between (the live load starts after it).
    let from_us = now_micros() - 500_000;
    let id = format!("bench-replay-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let event_id = format!("campaign:{id}");
    let t0 = now_micros();
    up.launch(&id, &[segment_name(n)], &[], t0).await?;
    let (stored_us, _) = watch_stored(env, up, &id, Duration::from_secs(900), |_| {}).await?;
    let persisted_secs = (stored_us - t0) as f64 / 1e6;
    eprintln!("bench: {n} notifications persisted in {persisted_secs:.1} s");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let to_us = now_micros();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let stored = rows(env, &event_id).await?;
    ensure!(stored == (n as i64, n as i64), "the campaign stored {stored:?} rows (all, distinct users), not {n}");

    // A tenth (delete_percent) of the rows, spread over the whole range: users whose number
    // modulo 100 is below the percentage.
    let t = Instant::now();
    let deleted = sqlx::query(
        "DELETE FROM notifications WHERE kind = 'campaign' AND source_event_id = $1 \
         AND substr(user_id, 2)::bigint % 100 < $2",
    )
    .bind(&event_id)
    .bind(o.delete_percent as i64)
    .execute(&env.pool)
    .await?
    .rows_affected();
    sqlx::query("VACUUM ANALYZE notifications").execute(&env.pool).await?;
    eprintln!("bench: deleted {deleted} rows in {:.1} s", t.elapsed().as_secs_f64());

    // The live load: OrderPaid events produced straight to `orders` at a steady rate, one per
    // connected user in turn, until told to stop.
    let registry = up_registry(&up.proc_)?;
    let orders = format!("{}orders", env.prefix);
    let producer = Arc::new(EventProducer::new(env.brokers, &registry, &[orders.as_str()]).await?);
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (producer, stop, rate, sse) = (producer.clone(), stop.clone(), o.live_rate, o.sse_users);
        tokio::spawn(async move {
            let start = Instant::now();
            let mut k = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let user = crate::user_id(USER_PREFIX, k % sse);
                let eid = format!("live-{k}");
                let at = now_micros();
                producer.send(&orders, &eid, &order_paid(&eid, &user, at), at);
                pace(start, k, rate).await;
                k += 1;
            }
            k
        })
    };
    let samples = users.samples.clone();
    samples.phase.store(WARM, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(5)).await;
    samples.phase.store(WITHOUT, Ordering::Relaxed);
    let cpu_without = CpuWindow::start(&[up.proc_.pid()]);
    tokio::time::sleep(Duration::from_secs(o.baseline_secs)).await;
    let without_count = samples.count(WITHOUT);
    let cpu_without = cpu_without.end(without_count);

    // The replay, while the load goes on.
    samples.phase.store(DURING, Ordering::Relaxed);
    let cpu = CpuWindow::start(&[up.proc_.pid()]);
    let beside = Beside::start();
    let (from, to) = (rfc3339(from_us), rfc3339(to_us));
    let mut cmd = Command::new(env.bin);
    cmd.arg("replay")
        .args(["--topic", "notifications", "--stage", "persistence", "--from", &from, "--to", &to, "--execute"])
        .args(["--brokers", env.brokers, "--database-url", &env.db, "--schema-registry-url", &registry])
        .args(["--topic-prefix", env.prefix])
        .arg("--topology")
        .arg(env.topology)
        .env("TIDINGS_LOG", "warn");
    let log = env.root.join("replay.log");
    let watched = run_watched(cmd, &log).await;
    let during_count = samples.count(DURING);
    let cpu = cpu.end(during_count);
    let beside = beside.end();
    // A few seconds more of the same load, counted with the replay window's phase no longer.
    samples.phase.store(1, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let sent = load.await.unwrap_or(0);
    let acked = producer.acked(sent, Duration::from_secs(30)).await;
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    let watched = watched?;
    ensure!(watched.status.success(), "tidings replay exited {}: {}", watched.status, out.trim());
    let without = samples.take(WITHOUT);
    let during = samples.take(DURING);
    users.close().await;

    let after = rows(env, &event_id).await?;
    let read = number_after(&out, "Read ");
    let written = number_after(&out, "Written ");
    let present = number_after(&out, "already present ");
    let dead = number_after(&out, "dead-lettered ");
    let whole = after == (n as i64, n as i64) && written == Some(deleted as i64);
    let secs = watched.secs;
    let rate = n as f64 / secs;
    let lat = |a: &[super::users::Arrival]| percentiles(a.iter().map(|a| a.received_us - a.occurred_us).collect());
    let (lat_without, lat_during) = (lat(&without), lat(&during));
    let p99_ratio = lat_during["p99"]
        .as_f64()
        .zip(lat_without["p99"].as_f64())
        .filter(|(_, b)| *b > 0.0)
        .map(|(a, b)| (a / b * 100.0).round() / 100.0);

    let peer = match copy_peer(env, &event_id, n).await {
        Ok(mut v) => {
            v["note"] = json!("psql \\copy (CSV) of the same rows into a table LIKE notifications INCLUDING ALL (its primary key and indexes), one statement, after the replay with the live load stopped");
            v
        }
        Err(e) => json!({"error": format!("{e:#}")}),
    };
    let ratio = peer["rows_per_sec"].as_f64().map(|p| (rate / p * 100.0).round() / 100.0);
    let aimed = n == AIM_EVENTS;
    let rate_met = rate >= AIM_EVENTS_PER_SEC;
    let p99_met = p99_ratio.is_some_and(|r| r <= AIM_P99_RATIO);
    let met = aimed.then_some(rate_met && p99_met && whole);
    let replay_cpu_us = (watched.cpu_secs * 1e6 / n as f64 * 100.0).round() / 100.0;
    Ok(json!({
        "scenario": "replay_1m",
        "notifications": n, "campaign_id": id,
        "aim": {"events_per_sec": AIM_EVENTS_PER_SEC, "live_p99_ratio": AIM_P99_RATIO, "events": AIM_EVENTS,
            "counts": "rows restored = rows deleted, none doubled"},
        "met": met,
        "replay": {"secs": secs, "events_per_sec": rate.round(), "met": rate_met,
            "records_read": read, "records_per_sec": read.map(|r| (r as f64 / secs).round()),
            "from": from, "to": to, "batch_size": "default (2,000)"},
        "counts": {"deleted": deleted, "written": written, "already_present": present, "dead_lettered": dead,
            "rows_before": stored.0, "rows_after": after.0, "distinct_users_after": after.1, "whole": whole},
        "peer": peer,
        "ratio_to_psql_copy": ratio,
        "live": {
            "sse_users": o.sse_users, "rate_per_sec": o.live_rate, "produced": acked,
            "without_replay": {"secs": o.baseline_secs, "received": without.len(), "latency_ms": lat_without},
            "during_replay": {"secs": secs, "received": during.len(), "latency_ms": lat_during},
            "p99_ratio": p99_ratio, "met": p99_met,
        },
        "cpu": {
            "replay_process_secs": watched.cpu_secs, "replay_us_per_event": replay_cpu_us,
            "replay_peak_rss_mib": (watched.peak_rss_bytes as f64 / 1048576.0 * 10.0).round() / 10.0,
            "during_replay": cpu, "without_replay": cpu_without, "beside": beside,
        },
        "persisted": {"secs": persisted_secs, "note": "the campaign that made the rows, launch → all stored"},
        "note": "one `tidings up --stages templating,persistence,gateway` on Apache Kafka + PostgreSQL; a CampaignLaunched to an N-user segment persists N notifications (the range: just before the launch → 1 s after all were stored, nothing else produced to notifications in it); the rows of users whose number mod 100 < delete_percent are deleted (VACUUM ANALYZE after); then, with the live load on, `tidings replay --topic notifications --stage persistence --from … --to … --execute` as a child process: events_per_sec = N ÷ its wall time from spawn to exit (plan, read, decode, look up, store), records_read = Kafka records (a campaign page's record carries several recipients); counts from its summary and the table. Live load: OrderPaid events produced straight to `orders` at rate_per_sec, one per connected SSE user in turn (lean loadgen clients in this process), latency = SSE receipt − occurred_at (set just before producing), through templating and the gateway; without_replay = baseline_secs of it just before the replay, during_replay = while the replay process ran. cpu.during_replay.secs.server = `tidings up` (the live stages), clients = this process (SSE users, producer); replay_process_secs = the replay's own CPU. Peer: psql \\copy (CSV) of the same N rows into a table LIKE notifications INCLUDING ALL, after the replay, live load stopped; ratio = replay events/s ÷ psql rows/s.",
    }))
}

/// The schema registry `tidings up` serves (its endpoints file).
fn up_registry(p: &Proc) -> anyhow::Result<String> {
    let text = std::fs::read(p.dir.join("endpoints.json")).context("tidings up's endpoints.json")?;
    let v: Value = serde_json::from_slice(&text)?;
    Ok(v["schema_registry_url"].as_str().context("no schema_registry_url in endpoints.json")?.to_string())
}

/// The campaign's stored rows: (all, distinct users).
async fn rows(env: &Env<'_>, event_id: &str) -> anyhow::Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT count(*), count(DISTINCT user_id) FROM notifications WHERE kind = 'campaign' AND source_event_id = $1",
    )
    .bind(event_id)
    .fetch_one(&env.pool)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_numbers_are_read_after_their_label() {
        let out = "Read 1,000,000 records; 0 out of order.\nWritten 100000 rows, already present 900000, dead-lettered 0 records, passed by 0.";
        assert_eq!(number_after(out, "Read "), Some(1_000_000));
        assert_eq!(number_after(out, "Written "), Some(100_000));
        assert_eq!(number_after(out, "already present "), Some(900_000));
        assert_eq!(number_after(out, "dead-lettered "), Some(0));
        assert_eq!(number_after(out, "missing "), None);
    }

    #[test]
    fn times_are_rfc3339_with_milliseconds() {
        assert_eq!(rfc3339(1_796_601_600_123_456), "2026-12-07T00:00:00.123Z");
    }
}
