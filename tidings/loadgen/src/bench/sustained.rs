//! `sustained`: notifications produced straight to the notifications topic at a fixed rate for a
//! while, spread over the connected users.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::cpu::CpuWindow;
use super::load::{notification, pace, NotificationSender};
use super::users::{wait_samples, Users};

/// `rate` notifications a second for `secs` seconds; `servers`: the tidings processes, for the CPU
/// they spend per delivered notification.
pub(super) async fn sustained(
    users: &Users,
    sender: &NotificationSender,
    connected: usize,
    rate: usize,
    secs: u64,
    servers: &[u32],
) -> Value {
    let samples = &users.samples;
    samples.phase.store(3, Ordering::Relaxed);
    let cpu = CpuWindow::start(servers);
    let total = rate * secs as usize;
    let t = Instant::now();
    let mut acks = Vec::with_capacity(total);
    for k in 0..total {
        acks.push(sender.send(notification(&users.user((k * 7919) % connected.max(1)), 1_000_000 + k)));
        pace(t, k, rate).await;
    }
    let produce_secs = t.elapsed().as_secs_f64();
    let acked = futures::future::join_all(acks).await.into_iter().filter(|ok| *ok).count();
    let complete = wait_samples(samples, 3, total, Duration::from_secs(120)).await;
    let cpu = cpu.end(samples.count(3));
    let mut v = samples.summary(3);
    v["cpu"] = cpu;
    v["scenario"] = json!("sustained");
    v["target_rate"] = json!(rate);
    v["achieved_produce_rate"] = json!(total as f64 / produce_secs);
    v["events"] = json!(total);
    v["acked"] = json!(acked);
    v["complete"] = json!(complete);
    v["connections"] = json!(connected);
    v
}
