//! README's run command on its embedded defaults (mock Kafka, SQLite, embedded registry): `up`,
//! `demo`, notifications stored and readable with `stats`/`inbox`; SIGTERM stops it cleanly; a
//! second run over the same data directory stores the second demo's notifications too; `produce`
//! turns JSON lines into Avro events and reports a bad line with its field path; the gateway serves
//! the segment API with the dev service token.

// Only the embedded start of the shared helpers is used here.
#[allow(unused_imports)]
mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tidings(data: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tidings"));
    c.env("TIDINGS_DATA_DIR", data)
        .env("TIDINGS_TOPOLOGY", Path::new(env!("CARGO_MANIFEST_DIR")).join("../topology.yaml"))
        .env_remove("TIDINGS_BROKERS")
        .env_remove("TIDINGS_DATABASE_URL");
    c
}

fn up(data: &Path) -> Guard {
    let _ = std::fs::remove_file(data.join("endpoints.json"));
    let log = std::fs::File::create(data.join(format!("up-{}.log", uuid::Uuid::new_v4().simple()))).unwrap();
    let child = common::embedded_up(data, log).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !data.join("endpoints.json").exists() {
        assert!(Instant::now() < deadline, "tidings up did not start within 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    Guard(child)
}

fn stored(data: &Path) -> u64 {
    let out = tidings(data).arg("stats").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["notifications"].as_u64().unwrap()
}

/// Waits until the count stops changing for 3 s and is above `at_least`.
fn settled(data: &Path, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(90);
    let (mut last, mut since) = (u64::MAX, Instant::now());
    loop {
        let n = stored(data);
        if n != last {
            (last, since) = (n, Instant::now());
        } else if n > at_least && since.elapsed() > Duration::from_secs(3) {
            return n;
        }
        assert!(Instant::now() < deadline, "stored count did not settle above {at_least} (now {n})");
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn demo(data: &Path) {
    let out = tidings(data).args(["demo", "--events", "120", "--rate", "200"]).output().unwrap();
    assert!(out.status.success(), "demo failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn terminate(mut g: Guard) {
    let pid = g.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = g.0.try_wait().unwrap() {
            assert!(status.success(), "tidings up exited with {status} after SIGTERM");
            return;
        }
        assert!(Instant::now() < deadline, "tidings up did not exit within 30 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn up_demo_inbox_on_embedded_defaults_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();

    let first = up(data);
    demo(data);
    let n1 = settled(data, 0);
    let inbox = tidings(data).args(["inbox", "--user", "u0001"]).output().unwrap();
    let text = String::from_utf8_lossy(&inbox.stdout);
    assert!(inbox.status.success() && text.contains("u0001:") && text.contains("unread"), "{text}");

    // `tidings status` on the embedded cluster sees the running process and judges every stage OK.
    let out = tidings(data).args(["status", "--json", "--window", "1s"]).output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    let instances = report["instances"].as_array().expect("instances");
    assert_eq!(instances.len(), 1, "the one up process announced itself: {report:#}");
    assert_eq!(out.status.code(), Some(0), "every group OK on a running system: {report:#}");

    // `tidings produce`: JSON lines in, Avro out; a bad line is reported with its field path and skipped.
    let mut child =
        tidings(data).args(["produce", "orders"]).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, r#"{{"event_id":"cli-1","occurred_at":"2026-11-22T10:00:00Z","order_id":"o-cli","buyer_id":"u0001","payload":{{"OrderShipped":{{"carrier":"DHL","tracking_number":"T9"}}}}}}"#).unwrap();
        writeln!(stdin, r#"{{"event_id":"cli-2","occurred_at":1,"order_id":"o-cli","buyer_id":"u0001","payload":{{"OrderPaid":{{"amount_cents":"lots","currency":"EUR","payment_method":"card"}}}}}}"#).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "one rejected line gives exit code 4: {err}");
    assert!(err.contains("line 2") && err.contains("payload.amount_cents"), "{err}");
    let np = settled(data, n1);
    assert_eq!(np, n1 + 1, "the valid produced event became one notification");
    terminate(first);

    // Same data directory, fresh embedded broker: the same demo stores as many again.
    let second = up(data);
    demo(data);
    let n2 = settled(data, np);
    assert_eq!(n2 - np, n1, "the second run's demo stored {} notifications, the first {n1}", n2 - np);
    terminate(second);
}

/// The live stream on embedded defaults: a token from `tidings token`, `GET /v1/stream` once
/// `/readyz` says delivery caught up, the demo's notifications for one user arrive with their
/// positions in order, and SIGTERM ends the stream with `reconnect`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_on_embedded_defaults_ends_with_reconnect_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    let g = up(&data);
    let ep: serde_json::Value = serde_json::from_slice(&std::fs::read(data.join("endpoints.json")).unwrap()).unwrap();
    let http_url = ep["http"].as_str().unwrap().to_string();
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while http.get(format!("{http_url}/readyz")).send().await.map(|r| r.status() != 200).unwrap_or(true) {
        assert!(Instant::now() < deadline, "not ready within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = tidings(&data).args(["token", "--user", "u0001"]).output().unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let mut resp = http.get(format!("{http_url}/v1/stream")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let demo_dir = data.clone();
    let demo_run = tokio::task::spawn_blocking(move || demo(&demo_dir));

    // Read until the demo is done and a few events arrived, then stop the process.
    let mut text = String::new();
    let mut stopped = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let chunk = tokio::time::timeout(Duration::from_secs(2), resp.chunk()).await;
        match chunk {
            Ok(Ok(Some(c))) => text.push_str(std::str::from_utf8(&c).unwrap()),
            Ok(_) => break,
            Err(_) => {}
        }
        if !stopped && demo_run.is_finished() && text.matches("\ndata: ").count() >= 3 {
            let pid = g.0.id().to_string();
            assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
            stopped = true;
        }
        assert!(Instant::now() < deadline, "stream did not end within 60 s:\n{text}");
    }
    assert!(stopped, "the stream ended before SIGTERM:\n{text}");
    let blocks: Vec<&str> = text.split("\n\n").filter(|b| !b.trim().is_empty()).collect();
    assert!(blocks[0].starts_with("retry: ") && blocks[0].contains("\nid: "), "{}", blocks[0]);
    let mut last = (-1i32, -1i64);
    let mut events = 0;
    for b in &blocks[1..] {
        let field = |name: &str| b.lines().find_map(|l| l.strip_prefix(name)).map(str::to_string);
        let (Some(id), Some(data)) = (field("id: "), field("data: ")) else { continue };
        let v: serde_json::Value = serde_json::from_str(&data).unwrap();
        assert_eq!(v["position"], id.as_str());
        assert!(v["occurred_at"].is_string() && v["title"].is_string(), "{v}");
        let (p, o) = id.split_once('.').unwrap();
        let pos = (p.parse().unwrap(), o.parse().unwrap());
        assert!(pos > last, "positions out of order: {last:?} then {pos:?}");
        last = pos;
        events += 1;
    }
    assert!(events >= 3, "{text}");
    let final_block = blocks.last().unwrap();
    assert!(final_block.contains("event: reconnect") && final_block.contains("shutdown"), "{final_block}");
    let mut g = g;
    let deadline = Instant::now() + Duration::from_secs(30);
    while g.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "tidings up did not exit within 30 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(g.0.try_wait().unwrap().unwrap().success());
    demo_run.await.unwrap();
}

/// `up --dev` serves the segment API on the gateway with the service token it writes to its
/// endpoints file: a CSV replaces a segment that `tidings segment show` then reads from the same
/// store; a user token is refused with 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_the_segment_api_with_the_service_token() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    let g = up(&data);
    let ep: serde_json::Value = serde_json::from_slice(&std::fs::read(data.join("endpoints.json")).unwrap()).unwrap();
    let (http_url, service) = (ep["http"].as_str().unwrap(), ep["ingest_token"].as_str().unwrap());
    let http = reqwest::Client::new();
    let url = format!("{http_url}/v1/segments/vip");
    // 503 with Retry-After is the API's answer while SQLite's one writer is busy (stages starting on
    // a loaded machine): a client retries it, as this one does, for 15 s at most.
    let deadline = Instant::now() + Duration::from_secs(15);
    let resp = loop {
        let put = http.put(&url).bearer_auth(service).header("content-type", "text/csv").body("user_id\nu1\nu2\n");
        let resp = put.send().await.unwrap();
        if resp.status() != 503 || resp.headers().get("retry-after").is_none() || Instant::now() > deadline {
            break resp;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["segment"]["size"], 2, "{body}");
    let out = tidings(&data).args(["segment", "show", "vip"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("segment vip: 2 user(s)"), "{out:?}");
    let out = tidings(&data).args(["token", "--user", "u1"]).output().unwrap();
    let user = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(http.get(&url).bearer_auth(&user).send().await.unwrap().status(), 403);
    assert_eq!(http.get(&url).send().await.unwrap().status(), 401);
    terminate(g);
}
