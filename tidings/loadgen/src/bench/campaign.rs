//! `campaign`: one CampaignLaunched over HTTP ingest to every connected user, through
//! templating's fan-out.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{json, Value};

use super::cpu::CpuWindow;
use super::load::{campaign as campaign_body, now_micros};
use super::users::{wait_samples, Users};

/// One campaign whose audience is the `connected` users; `servers`: the tidings processes, for the
/// CPU they spend per delivered notification.
pub(super) async fn campaign(
    users: &Users,
    connected: usize,
    ingest: &str,
    http: &reqwest::Client,
    servers: &[u32],
) -> anyhow::Result<Value> {
    let samples = &users.samples;
    samples.phase.store(2, Ordering::Relaxed);
    let audience: Vec<String> = (0..connected).map(|i| users.user(i)).collect();
    let id = format!("bench-camp-{}", uuid::Uuid::new_v4().simple());
    let cpu = CpuWindow::start(servers);
    let t = Instant::now();
    let r = http
        .post(format!("{ingest}/v1/events/coupons"))
        .bearer_auth(tidings_gateway::service_auth::DEV_SERVICE_TOKEN)
        .header("content-type", "application/json")
        .body(campaign_body(&id, &audience, now_micros()).to_string())
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("campaign ingest failed: {} {}", r.status(), r.text().await.unwrap_or_default());
    }
    let complete = wait_samples(samples, 2, connected, Duration::from_secs(180)).await;
    let cpu = cpu.end(samples.count(2));
    let mut v = samples.summary(2);
    v["cpu"] = cpu;
    v["scenario"] = json!("campaign_broadcast");
    v["audience"] = json!(connected);
    v["complete"] = json!(complete);
    v["wall_secs"] = json!(t.elapsed().as_secs_f64());
    v["path"] = json!("HTTP ingest → coupons → templating fan-out → notifications → delivery");
    Ok(v)
}
