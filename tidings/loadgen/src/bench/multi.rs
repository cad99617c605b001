//! `multi`: several gateway processes in one consumer group and as many `hold` client processes,
//! holding many streams between them.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{json, Value};

use super::cpu::CpuWindow;
use super::metrics::metric;
use super::stack::{rss_bytes, wait_ready, Proc};

/// `gateways` gateway processes (arguments `gw_args`) holding `connections` streams.
pub(super) async fn multi(
    bin: &Path,
    root: &Path,
    gw_args: &[String],
    gateways: usize,
    connections: usize,
    http: &reqwest::Client,
) -> anyhow::Result<Value> {
    let mut gws = Vec::new();
    let mut urls = Vec::new();
    for i in 0..gateways {
        let mut g = Proc::spawn(bin, &format!("gateway-{i}"), root, gw_args, &[])?;
        urls.push(g.endpoints().await?["http"].as_str().unwrap_or_default().to_string());
        gws.push(g);
    }
    for u in &urls {
        wait_ready(http, u, Duration::from_secs(180)).await?;
    }
    // Wait for the group to settle: every partition owned once.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut owned = 0.0;
        for u in &urls {
            owned += metric(http, u, "tidings_gateway_owned_partitions").await;
        }
        let ready = futures::future::join_all(urls.iter().map(|u| http.get(format!("{u}/readyz")).send())).await;
        if owned == 12.0 && ready.iter().all(|r| r.as_ref().is_ok_and(|r| r.status() == 200)) {
            break;
        }
        if Instant::now() > deadline {
            bail!("gateways did not settle on an assignment (owned {owned})");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let me = std::env::current_exe()?;
    let per = connections.div_ceil(gateways);
    let mut holders = Vec::new();
    let pids: Vec<u32> = gws.iter().map(Proc::pid).collect();
    let cpu = CpuWindow::start(&pids);
    let t = Instant::now();
    for k in 0..gateways {
        let count = per.min(connections - k * per);
        let child = Command::new(&me)
            .args(["hold", "--gateways", &urls.join(","), "--user-prefix", "m", "--from"])
            .arg((k * per).to_string())
            .args(["--count", &count.to_string(), "--ramp", "1500"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        holders.push(child);
    }
    let cpu = cpu.with_clients(&holders.iter().map(std::process::Child::id).collect::<Vec<_>>());
    let mut lines: Vec<_> = holders
        .iter_mut()
        .map(|c| {
            use std::io::BufRead;
            let out = c.stdout.take().expect("piped");
            let last = Arc::new(Mutex::new(0u64));
            let l = last.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        *l.lock().unwrap() = v["connected"].as_u64().unwrap_or(0);
                    }
                }
            });
            last
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut held = 0;
    while Instant::now() < deadline {
        held = lines.iter_mut().map(|l| *l.lock().unwrap()).sum::<u64>();
        if held as usize >= connections {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let connect_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut per_gateway = Vec::new();
    let mut server_total = 0.0;
    for (g, u) in gws.iter().zip(&urls) {
        let c = metric(http, u, "tidings_gateway_connections").await;
        server_total += c;
        per_gateway.push(json!({"connections": c, "rss_mib": rss_bytes(g.pid()) as f64 / 1048576.0}));
    }
    let v = json!({
        "scenario": "multi_process_connections",
        "gateway_processes": gateways,
        "client_processes": holders.len(),
        "target": connections,
        "client_side_connected": held,
        "server_side_connections": server_total,
        "connect_secs": connect_secs,
        "per_gateway": per_gateway,
        "cpu": cpu.end(0),
    });
    for h in &mut holders {
        let _ = Command::new("kill").arg("-TERM").arg(h.id().to_string()).status();
    }
    for h in &mut holders {
        let _ = h.wait();
    }
    for g in &gws {
        g.term();
    }
    Ok(v)
}
