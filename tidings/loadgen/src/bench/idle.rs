//! `idle`: one gateway process holding many idle streams, and its RSS per stream.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::cpu::CpuWindow;
use super::metrics::metric;
use super::stack::{rss_bytes, Proc};
use super::users::Users;

/// Opens `idle` streams on the gateway `gw` (at `url`); answers how many opened and the line.
/// `servers`: the tidings processes, for the CPU opening and holding the streams took.
pub(super) async fn idle(
    gw: &Proc,
    url: &str,
    users: &mut Users,
    idle: usize,
    servers: &[u32],
    http: &reqwest::Client,
) -> (usize, Value) {
    let baseline = rss_bytes(gw.pid());
    let cpu = CpuWindow::start(servers);
    let t = Instant::now();
    let connected = users.grow(idle, Duration::from_secs(300)).await;
    let connect_secs = t.elapsed().as_secs_f64();
    // Let allocations settle (heartbeat timers armed, buffers shrunk) before reading RSS.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = rss_bytes(gw.pid());
    let server_side = metric(http, url, "tidings_gateway_connections").await;
    // Nothing is delivered: the window shows what opening and holding the streams cost.
    let cpu = cpu.end(0);
    let v = json!({
        "scenario": "idle_connections",
        "gateway_processes": 1,
        "connections": connected,
        "connections_per_gateway_metric": server_side,
        "connect_secs": connect_secs,
        "rss_baseline_mib": baseline as f64 / 1048576.0,
        "rss_mib": rss as f64 / 1048576.0,
        "rss_per_connection_bytes": (rss.saturating_sub(baseline)) as f64 / connected.max(1) as f64,
        "cpu": cpu,
        "note": "one gateway process; the clients run in the benchmark process (open-files limit 20,000 each)",
    });
    (connected, v)
}
