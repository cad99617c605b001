//! `fanout`: one notification to each of many connected users, produced straight to the
//! notifications topic.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::cpu::CpuWindow;
use super::load::{notification, NotificationSender};
use super::users::{wait_samples, Users};

/// One notification to each of the first `users` users.
/// `servers`: the tidings processes, for the CPU they spend per delivered notification.
pub(super) async fn fanout(bench_users: &Users, sender: &NotificationSender, users: usize, servers: &[u32]) -> Value {
    let samples = &bench_users.samples;
    samples.phase.store(1, Ordering::Relaxed);
    let cpu = CpuWindow::start(servers);
    let t = Instant::now();
    let mut acks = Vec::with_capacity(users);
    for i in 0..users {
        acks.push(sender.send(notification(&bench_users.user(i), i)));
    }
    let produced_secs = t.elapsed().as_secs_f64();
    let acked = futures::future::join_all(acks).await.into_iter().filter(|ok| *ok).count();
    let complete = wait_samples(samples, 1, users, Duration::from_secs(120)).await;
    let cpu = cpu.end(samples.count(1));
    let mut v = samples.summary(1);
    v["cpu"] = cpu;
    v["scenario"] = json!("fanout_one_each");
    v["users"] = json!(users);
    v["acked"] = json!(acked);
    v["produce_secs"] = json!(produced_secs);
    v["complete"] = json!(complete);
    v["wall_secs"] = json!(t.elapsed().as_secs_f64());
    v
}
