//! A plain EventSource in headless Chromium (no library, no retry code: `tests/browser/eventsource.mjs`)
//! keeps every notification of its user exactly once and in order while gateway A, whose origin
//! the page is on, is stopped with SIGTERM and started again on the same port, while the user's
//! partition moves to gateway B (the browser follows A's 307 there), and through the rebalances of
//! A stopping and starting again beside B. Notifications come in through HTTP ingest all along.

mod common;

use common::{browser_dir, browser_or_skip, chromium, eventually, free_port, metric, ready, sigterm, Tidings, Up};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;

/// Gap between two ingested events.
const EVERY: Duration = Duration::from_millis(300);
/// The whole test, beyond which it fails (every process is killed on the way out).
const WHOLE: Duration = Duration::from_secs(200);

/// Waits until the gateways at `urls` own `want[i]` partitions each (None: any number).
async fn await_owned(http: &reqwest::Client, urls: &[(&str, Option<u64>)], what: &str, procs: &[&Tidings]) {
    eventually(what, Duration::from_secs(60), Duration::from_millis(250), procs, || async {
        let mut owned = Vec::new();
        for (u, want) in urls {
            ready(http, u).await?;
            let n = metric(http, u, "tidings_gateway_owned_partitions").await? as u64;
            owned.push(n);
            if want.is_some_and(|w| w != n) {
                return Err(format!("owned partitions {owned:?}"));
            }
        }
        Ok(())
    })
    .await;
}

/// What the page reported, line by line.
#[derive(Default)]
struct Page {
    lines: Vec<Value>,
}

impl Page {
    fn notifications(&self) -> Vec<&Value> {
        self.lines.iter().filter(|l| l["kind"] == "event" && l["event"] == "order.placed").collect()
    }
    fn count(&self, kind: &str, event: &str) -> usize {
        self.lines.iter().filter(|l| l["kind"] == kind && (event.is_empty() || l["event"] == event)).count()
    }
}

/// Gateway `name` on `port`; `client_id` orders the group's members (see the test).
fn gateway(name: &str, up: &Up<'_>, port: u16, client_id: &str) -> Tidings {
    let opts = format!("client.id={client_id}");
    Tidings::spawn_at(
        name,
        up,
        // Reconnects 50 ms after a stream ends: every window in which a gateway is up but cannot
        // serve the partition yet (a restart's first 100+ ms, a rebalance) is met by the browser.
        &[("TIDINGS_SSE_RETRY_MS", "50"), ("TIDINGS_GRACE_SECS", "5"), ("TIDINGS_KAFKA_OPTS", &opts)],
        &format!("127.0.0.1:{port}"),
    )
}

/// Waits until the page has seen as many notifications as were posted so far (at least `min`).
async fn caught_up(
    page: &Mutex<Page>,
    posted: &Mutex<Vec<String>>,
    what: &str,
    min: usize,
    procs: &[&Tidings],
) -> usize {
    let want = posted.lock().unwrap().len().max(min);
    eventually(what, Duration::from_secs(60), Duration::from_millis(200), procs, || async {
        let p = page.lock().unwrap();
        // Closed for good (what a 503 does to an EventSource): nothing more will come.
        if let Some(l) = p.lines.iter().find(|l| l["readyState"] == 2) {
            panic!(
                "while waiting for {what}: the EventSource was closed for good ({l}); it saw {} of {want}",
                p.notifications().len()
            );
        }
        let seen = p.notifications().len();
        if seen >= want {
            Ok(seen)
        } else {
            Err(format!("the page saw {seen} of {want}"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_eventsource_keeps_every_notification_across_restarts_and_moves() {
    let Some(brokers) = common::brokers_or_skip() else { return };
    if !browser_or_skip() {
        return;
    }
    tokio::time::timeout(WHOLE, run(brokers)).await.expect("the browser test did not finish in time");
}

async fn run(brokers: String) {
    let (_pool, db_url) = common::fresh_pg().await;
    let prefix = common::unique_prefix();
    eprintln!("topic prefix {prefix}, database {db_url}");
    // Registry, topics, templating, persistence (for resumes from the store) and HTTP ingest: up
    // all along, so events keep coming in while the gateways stop and start.
    let mut core = Tidings::spawn("core", &Up::core(&brokers, &db_url, &prefix));
    let ep = core.endpoints(Duration::from_secs(60)).await;
    let gw_up = Up::gateway(&brokers, &db_url, &prefix, &ep.schema_registry_url);
    // The group's range assignor hands the first half of the partitions to the member whose id
    // sorts first, and member ids start with client.id: with B's sorting before A's, partition 0
    // (this user's) is B's whenever both run. So the move to B is certain, not left to chance.
    let (port_a, port_b) = (free_port(), free_port());
    let (url_a, url_b) = (format!("http://127.0.0.1:{port_a}"), format!("http://127.0.0.1:{port_b}"));
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();

    let mut a = gateway("gateway-a", &gw_up, port_a, "tidings-gw-z");
    a.endpoints(Duration::from_secs(60)).await;
    await_owned(&http, &[(&url_a, None)], "gateway A to be ready", &[&a]).await;
    // Read once A is up: right after the topics were created their metadata may still be settling.
    let all = common::high_watermarks(&brokers, &format!("{prefix}notifications")).await.len() as u64;
    await_owned(&http, &[(&url_a, Some(all))], "gateway A to own every partition", &[&a]).await;
    assert!(all >= 2 && all.is_multiple_of(2), "{all} partitions: the test needs an even number to split");
    let user = (0..)
        .map(|i| format!("browser-{i}"))
        .find(|u| tidings_gateway::delivery::partition_for(u, all as i32) == 0)
        .unwrap();

    // The browser: a page on A's origin, the session cookie, then a plain EventSource.
    let token = tidings_gateway::auth::mint_hs256(
        tidings_gateway::auth::DEV_SECRET.as_bytes(),
        &user,
        Duration::from_secs(3600),
        None,
        None,
    )
    .unwrap();
    let mut node = tokio::process::Command::new("node")
        .arg(browser_dir().join("eventsource.mjs"))
        .args([&url_a, &token, "order.placed,unavailable,reconnect,close,reset"])
        .env("CHROMIUM", chromium())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("starting node (is Node.js installed?)");
    let stdin = node.stdin.take().unwrap();
    let page = Arc::new(Mutex::new(Page::default()));
    let reader = {
        let (page, stdout) = (page.clone(), node.stdout.take().unwrap());
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut last_state = Value::Null;
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    eprintln!("page (not JSON): {line}");
                    continue;
                };
                // Everything but the notifications and unchanged states, to follow the story.
                let state_unchanged = v["kind"] == "state" && v["readyState"] == last_state;
                // Refused connections while a gateway is down come every 50 ms: not each one.
                let noise = v["kind"] == "console" || v["kind"] == "error" && v["readyState"] == 0;
                if v["kind"] == "state" {
                    last_state = v["readyState"].clone();
                }
                let notification = v["kind"] == "event" && v["event"] == "order.placed";
                if !(state_unchanged || noise || notification) {
                    eprintln!("page: {line}");
                }
                page.lock().unwrap().lines.push(v);
            }
        })
    };
    let procs = [&core, &a];
    eventually(
        "the page to hold a session and an open stream",
        Duration::from_secs(40),
        Duration::from_millis(200),
        &procs,
        || async {
            let p = page.lock().unwrap();
            if let Some(f) = p.lines.iter().find(|l| l["kind"] == "fatal") {
                panic!("the page failed: {f}");
            }
            let session = p.lines.iter().find(|l| l["kind"] == "session").map(|l| l["status"].clone());
            match (session, p.count("open", "")) {
                (Some(s), _) if s != 204 => panic!("POST /v1/session answered {s}"),
                (Some(_), n) if n > 0 => Ok(()),
                (s, _) => Err(format!("session {s:?}, no open yet")),
            }
        },
    )
    .await;

    // Events for this user, one at a time, in one order (one order_id: one orders partition, so
    // templating emits them in this order) until told to stop.
    let posted: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = CancellationToken::new();
    let producing = {
        let (posted, stop, ingest, user) = (posted.clone(), stop.clone(), ep.ingest.clone(), user.clone());
        let http = http.clone();
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.is_cancelled() {
                let event_id = format!("browser-ev-{i:04}");
                let body = json!({"event_id": event_id, "occurred_at": chrono::Utc::now().timestamp_micros(),
                    "order_id": "o-browser", "buyer_id": user, "locale": "en",
                    "payload": {"OrderPlaced": {"amount_cents": 100 + i, "currency": "EUR", "items": []}}});
                let r = http
                    .post(format!("{ingest}/v1/events/orders"))
                    .bearer_auth(common::ingest_token())
                    .json(&body)
                    .send()
                    .await
                    .expect("POST to ingest");
                assert_eq!(r.status(), 202, "ingest refused {event_id}: {}", r.text().await.unwrap_or_default());
                posted.lock().unwrap().push(event_id);
                i += 1;
                tokio::time::sleep(EVERY).await;
            }
        })
    };
    // (a) A, the only gateway and the page's origin, is stopped and started again on its port.
    caught_up(&page, &posted, "the first notifications", 5, &[&core, &a]).await;
    sigterm(&mut a).await;
    eprintln!("gateway A stopped (SIGTERM); {} events posted", posted.lock().unwrap().len());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut a = gateway("gateway-a2", &gw_up, port_a, "tidings-gw-z");
    a.endpoints(Duration::from_secs(60)).await;
    await_owned(&http, &[(&url_a, Some(all))], "restarted gateway A to own every partition", &[&a]).await;
    let seen = caught_up(&page, &posted, "the notifications across A's restart", 0, &[&core, &a]).await;
    eprintln!("the page caught up after A's restart: {seen} notifications");

    // (b) B joins: the user's partition moves to B; A answers the browser with a 307 to B.
    let mut b = gateway("gateway-b", &gw_up, port_b, "tidings-gw-a");
    b.endpoints(Duration::from_secs(60)).await;
    let half = Some(all / 2);
    await_owned(&http, &[(&url_a, half), (&url_b, half)], "A and B to share the partitions", &[&a, &b]).await;
    // From B's side: the page's stream is open there (B serves nobody else).
    eventually(
        "B to serve the page's stream",
        Duration::from_secs(30),
        Duration::from_millis(200),
        &[&a, &b],
        || async {
            let n = metric(&http, &url_b, "tidings_gateway_connections").await?;
            if n >= 1.0 {
                Ok(())
            } else {
                Err(format!("B has {n} streams"))
            }
        },
    )
    .await;
    let seen = caught_up(&page, &posted, "the notifications through B", 0, &[&core, &a, &b]).await;
    eprintln!("the page caught up through B: {seen} notifications");

    // (c) A stops while B runs (B owns everything), then comes back (they share again, B keeps
    // the user's partition): every rebalance ends the page's stream on B with `reconnect`.
    sigterm(&mut a).await;
    await_owned(&http, &[(&url_b, Some(all))], "B to own every partition", &[&b]).await;
    let mut a = gateway("gateway-a3", &gw_up, port_a, "tidings-gw-z");
    a.endpoints(Duration::from_secs(60)).await;
    await_owned(&http, &[(&url_a, half), (&url_b, half)], "A and B to share the partitions again", &[&a, &b]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    producing.await.expect("producer task");
    let seen = caught_up(&page, &posted, "every notification", 0, &[&core, &a, &b]).await;
    // A duplicate would arrive now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b_connections = metric(&http, &url_b, "tidings_gateway_connections").await.unwrap_or(-1.0);
    drop(stdin);
    let exit = tokio::time::timeout(Duration::from_secs(20), node.wait()).await;
    let _ = reader.await;
    eprintln!("node exited: {exit:?}");
    assert_eq!(b_connections, 1.0, "the page's stream is not on B, its partition's owner, at the end");

    let posted = posted.lock().unwrap().clone();
    let page = page.lock().unwrap();
    let got: Vec<&Value> = page.notifications();
    let data: Vec<Value> = got.iter().map(|l| serde_json::from_str(l["data"].as_str().unwrap()).unwrap()).collect();
    let sources: Vec<&str> = data.iter().map(|d| d["source_event_id"].as_str().unwrap()).collect();
    let ids: HashSet<&str> = data.iter().map(|d| d["id"].as_str().unwrap()).collect();
    let positions: Vec<(i32, i64)> = got
        .iter()
        .map(|l| tidings_gateway::delivery::parse_position(l["lastEventId"].as_str().unwrap()).expect("an id"))
        .collect();
    let redirected = page
        .lines
        .iter()
        .any(|l| l["kind"] == "http" && l["status"] == 307 && l["url"].as_str().is_some_and(|u| u.starts_with(&url_a)));
    let served_by_b = page
        .lines
        .iter()
        .any(|l| l["kind"] == "http" && l["status"] == 200 && l["url"].as_str().is_some_and(|u| u.starts_with(&url_b)));
    eprintln!(
        "{} posted, {} delivered ({seen} when caught up); page saw {} opens, {} errors, {} unavailable, {} reconnect, {} reset",
        posted.len(),
        got.len(),
        page.count("open", ""),
        page.count("error", ""),
        page.count("event", "unavailable"),
        page.count("event", "reconnect"),
        page.count("event", "reset"),
    );
    assert!(posted.len() >= 20, "only {} events posted", posted.len());
    assert_eq!(sources, posted, "the page did not get every notification exactly once, in order");
    assert_eq!(ids.len(), got.len(), "a notification id arrived twice");
    assert!(positions.iter().all(|(p, _)| *p == 0), "positions outside the user's partition: {positions:?}");
    assert!(positions.windows(2).all(|w| w[0].1 < w[1].1), "positions not increasing: {positions:?}");
    assert_eq!(page.count("event", "reset"), 0, "the stream was reset (a gap was admitted)");
    assert!(redirected, "the browser never got a 307 from A");
    assert!(served_by_b, "the browser never got a stream from B");
    assert!(page.count("event", "reconnect") >= 2, "no reconnect from A's SIGTERM and the move");
    // The point of the test: the browser met gateways that were up but could not serve it yet (a
    // 503 there would have closed the EventSource for good) and got through.
    assert!(page.count("event", "unavailable") >= 1, "the browser never met a transient state");
    assert!(
        page.lines.iter().all(|l| l["kind"] != "state" || l["readyState"] != 2),
        "the EventSource was closed for good at some point"
    );
    drop(core);
}
