//! `GET /v1/stream` served for real on a local port, with the hub fed directly (no broker): token
//! checks (missing, expired, forged, other user), per-user isolation, redirects to the owner, 503
//! before assignment, resume from the ring and from the store, and 1,000 clients that stop reading.

use bytes::Bytes;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tidings_core::Notification;
use tidings_gateway::auth::{AuthConfig, Key};
use tidings_gateway::delivery::events::event_from_notification;
use tidings_gateway::delivery::hub::StoreResume;
use tidings_gateway::delivery::{partition_for, Event, Hub, HubConfig, Owners};
use tidings_gateway::{Limits, Parts, Readiness, StreamState};
use tidings_store::{Batch, OffsetUpdate, StoredNotification};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

const SECRET: &[u8] = b"stream-test-secret";
const PARTITIONS: i32 = 4;

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn token_with(sub: &str, exp: i64, secret: &[u8]) -> String {
    let claims = json!({"sub": sub, "iat": now(), "exp": exp});
    let h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    jsonwebtoken::encode(&h, &claims, &jsonwebtoken::EncodingKey::from_secret(secret)).unwrap()
}

fn token(sub: &str) -> String {
    token_with(sub, now() + 600, SECRET)
}

/// A stream credential for `user`, as `POST /v1/session` on any gateway with [`SECRET`] makes it.
fn stream_credential(user: &str) -> String {
    let auth = AuthConfig { keys: vec![Key::hs256(SECRET)], ..Default::default() };
    auth.mint_stream(user, (now() + 600) as u64).unwrap()
}

fn notification(user: &str, n: usize) -> Notification {
    let event = format!("ev-{user}-{n}");
    Notification {
        notification_id: Notification::id_for(&event, user),
        user_id: user.into(),
        kind: "order.paid".into(),
        title: format!("title {n}"),
        body: "body".into(),
        link: None,
        source_event_id: event,
        occurred_at: 1_700_000_000_000_000,
        source_topic: "orders".into(),
        source_partition: 0,
        source_offset: n as i64,
        data: None,
        inbox: true,
        category: String::new(),
        recipients: vec![],
    }
}

/// Users `prefix-i` that land on `partition`.
fn users_on(partition: i32, prefix: &str, count: usize) -> Vec<String> {
    (0..).map(|i| format!("{prefix}-{i}")).filter(|u| partition_for(u, PARTITIONS) == partition).take(count).collect()
}

struct Gw {
    url: String,
    hub: Arc<Hub>,
    owners: Arc<Owners>,
    stop: CancellationToken,
    /// Next offset per partition, as a consumer would see them.
    next: std::sync::Mutex<HashMap<i32, i64>>,
}

impl Gw {
    /// A gateway serving streams straight from the socket, as `tidings up` does.
    async fn start(owned: &[i32], cfg: HubConfig, store: Option<StoreResume>) -> Gw {
        Self::start_with(owned, cfg, store, true).await
    }

    /// `direct: false` serves every request through axum (the router alone, as a host app would).
    async fn start_with(owned: &[i32], cfg: HubConfig, store: Option<StoreResume>, direct: bool) -> Gw {
        // This test process's recorder, before the hub takes its metric handles (/metrics is read).
        tidings_gateway::metrics::install();
        // A fixed 16 KiB kernel send buffer per connection, as `tidings up` sets by default (64 KiB).
        let listener = tidings_gateway::bind("127.0.0.1:0".parse().unwrap(), Some(16 << 10)).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let hub = Hub::new(cfg, store);
        hub.set_partition_count(PARTITIONS);
        for &p in owned {
            hub.assign(p, 0, 0);
        }
        let owners = Owners::new(&url, "notifications");
        let auth = Arc::new(AuthConfig { keys: vec![Key::hs256(SECRET)], ..Default::default() });
        let state = StreamState { hub: hub.clone(), owners: owners.clone(), auth, browser: Default::default() };
        let app =
            tidings_gateway::app(Parts { stream: Some(state.clone()), ..Default::default() }, Readiness::default());
        let stop = CancellationToken::new();
        if direct {
            tokio::spawn(tidings_gateway::serve_gateway(listener, app, Some(state), Limits::default(), stop.clone()));
        } else {
            tokio::spawn(tidings_gateway::serve(listener, app, Limits::default(), stop.clone()));
        }
        Gw { url, hub, owners, stop, next: Default::default() }
    }

    /// Appends a notification for `user` to its partition, as the consumer would.
    fn push(&self, user: &str, n: usize) -> (i32, i64) {
        let p = partition_for(user, PARTITIONS);
        let mut next = self.next.lock().unwrap();
        let o = next.entry(p).or_insert(0);
        let ev: Event = event_from_notification(p, *o, &notification(user, n), 0);
        *o += 1;
        self.hub.push(ev);
        (p, *o - 1)
    }
}

/// `user`'s notifications at `positions` as the persistence stage stores them, with its offsets.
fn stored(user: &str, positions: &[(i32, i64)]) -> Batch {
    let next = positions.iter().map(|(_, o)| o + 1).max().unwrap_or(0);
    Batch {
        notifications: positions
            .iter()
            .enumerate()
            .map(|(i, (p, o))| StoredNotification {
                notification: notification(user, i),
                stream_partition: *p,
                stream_offset: *o,
            })
            .collect(),
        chat_messages: Vec::new(),
        chat_changes: Vec::new(),
        offsets: vec![OffsetUpdate {
            topic: "notifications".into(),
            partition: positions.first().map_or(0, |(p, _)| *p),
            next_offset: next,
        }],
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// Reads SSE blocks from a streaming response until `want` blocks matched `keep`, or `timeout`.
/// The memory test measures the whole process: it runs alone (write), every other test of this
/// file beside the others (read).
static RSS_ALONE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

async fn read_events(resp: reqwest::Response, want: usize, timeout: Duration) -> Vec<HashMap<String, String>> {
    let mut resp = resp;
    let mut buf = String::new();
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while out.len() < want {
        let chunk = match tokio::time::timeout_at(deadline.into(), resp.chunk()).await {
            Ok(Ok(Some(c))) => c,
            _ => break,
        };
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut fields = HashMap::new();
            for line in block.lines() {
                if let Some((k, v)) = line.split_once(':') {
                    if !k.is_empty() {
                        fields.insert(k.to_string(), v.trim_start().to_string());
                    }
                }
            }
            if fields.contains_key("event") || fields.contains_key("data") {
                out.push(fields);
            }
        }
    }
    out
}

#[tokio::test]
async fn tokens_are_checked_and_users_only_see_their_own_notifications() {
    let _alone = RSS_ALONE.read().await;
    for direct in [true, false] {
        tokens_and_isolation(direct).await;
    }
}

async fn tokens_and_isolation(direct: bool) {
    let gw = Gw::start_with(&[0, 1, 2, 3], HubConfig::default(), None, direct).await;
    let http = client();
    let url = format!("{}/v1/stream", gw.url);

    // Missing, expired, forged and garbage tokens: 401 with the JSON error shape, nothing streamed.
    let cases = [
        (None, "missing_token"),
        (Some(token_with("alice", now() - 3600, SECRET)), "token_expired"),
        (Some(token_with("alice", now() + 600, b"not-the-secret")), "invalid_token"),
        (Some("not.a.jwt".to_string()), "invalid_token"),
    ];
    for (tok, code) in cases {
        let mut req = http.get(&url);
        if let Some(t) = &tok {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "{code}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], code);
    }

    // Alice's and Bob's streams (token by header, by query, by cookie) see only their own events,
    // even when both users share a partition.
    let bob = users_on(partition_for("alice", PARTITIONS), "bob", 1).remove(0);
    let alice_resp = http.get(&url).bearer_auth(token("alice")).send().await.unwrap();
    assert_eq!(alice_resp.status(), 200);
    assert_eq!(alice_resp.headers()["content-type"], "text/event-stream");
    let bob_resp = http.get(format!("{url}?access_token={}", token(&bob))).send().await.unwrap();
    assert_eq!(bob_resp.status(), 200);
    // The cookie holds a stream credential (from POST /v1/session), never a user token.
    let cookie = format!("tidings_stream={}", stream_credential(&bob));
    let cookie_resp = http.get(&url).header("cookie", cookie).send().await.unwrap();
    assert_eq!(cookie_resp.status(), 200);
    for cookie in [format!("tidings_stream={}", token(&bob)), format!("tidings_session={}", token(&bob))] {
        assert_eq!(http.get(&url).header("cookie", &cookie).send().await.unwrap().status(), 401, "{cookie}");
    }
    for i in 0..3 {
        gw.push("alice", i);
        gw.push(&bob, i);
    }
    let alice = read_events(alice_resp, 3, Duration::from_secs(5)).await;
    let bob_seen = read_events(bob_resp, 3, Duration::from_secs(5)).await;
    let bob_cookie = read_events(cookie_resp, 3, Duration::from_secs(5)).await;
    for (seen, user) in [(&alice, "alice"), (&bob_seen, bob.as_str()), (&bob_cookie, bob.as_str())] {
        assert_eq!(seen.len(), 3, "{user}: {seen:?}");
        for (i, ev) in seen.iter().enumerate() {
            let data: Value = serde_json::from_str(&ev["data"]).unwrap();
            assert_eq!(data["id"], notification(user, i).notification_id.to_string(), "{user} got {data}");
            assert_eq!(ev["event"], "order.paid");
            assert_eq!(data["occurred_at"], "2023-11-14T22:13:20Z");
            assert_eq!(ev["id"], data["position"]);
        }
    }

    // A Last-Event-ID that is not a position is refused, not silently ignored.
    let r = http.get(&url).bearer_auth(token("alice")).header("last-event-id", "garbage").send().await.unwrap();
    assert_eq!(r.status(), 422);
    // One at (or next to) the largest offset is after everything: a stream, no overflow (it
    // panicked the connection's task in debug builds, wrapped around in release).
    let p = partition_for("alice", PARTITIONS);
    for offset in [i64::MAX, i64::MAX - 1] {
        let last = format!("{p}.{offset}");
        let r = http.get(&url).bearer_auth(token("alice")).header("last-event-id", &last).send().await;
        let r = r.unwrap_or_else(|e| panic!("{last}: {e}"));
        assert_eq!(r.status(), 200, "{last}");
        let mut r = r;
        let first = tokio::time::timeout(Duration::from_secs(5), r.chunk()).await.expect("the stream opens");
        let first = first.unwrap().expect("a chunk");
        assert!(first.starts_with(b"retry:"), "{last}: {first:?}");
    }
    // Past i64 it is no position at all.
    let r = http.get(&url).bearer_auth(token("alice")).header("last-event-id", format!("{p}.9223372036854775808"));
    assert_eq!(r.send().await.unwrap().status(), 422);
    gw.stop.cancel();
}

#[tokio::test]
async fn unowned_partitions_redirect_to_the_owner_and_unknown_owners_answer_503() {
    let _alone = RSS_ALONE.read().await;
    let a = Gw::start(&[0, 1], HubConfig::default(), None).await;
    let b = Gw::start(&[2, 3], HubConfig::default(), None).await;
    let http = client();
    let on_b = users_on(2, "u", 1).remove(0);
    // Nobody has announced partition 2 to `a` yet: 503 + Retry-After.
    let r = http.get(format!("{}/v1/stream?access_token={}", a.url, token(&on_b))).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    // An announced owner outside the allow-list (here: not this host) is never a redirect target.
    a.owners.apply(&tidings_gateway::delivery::owners::OwnerRecord {
        topic: "notifications".into(),
        partition: 2,
        url: "http://evil.example:8080".into(),
        instance: "mallory".into(),
        at_ms: 0,
    });
    let r = http.get(format!("{}/v1/stream", a.url)).bearer_auth(token(&on_b)).send().await.unwrap();
    assert_eq!(r.status(), 503, "redirected to a URL outside the allow-list");
    assert!(r.headers().get("location").is_none());
    // Once `b`'s announcement is read, `a` redirects there, keeping the query but the token.
    a.owners.apply(&tidings_gateway::delivery::owners::OwnerRecord {
        topic: "notifications".into(),
        partition: 2,
        url: b.url.clone(),
        instance: "b".into(),
        at_ms: 0,
    });
    let bearer = token(&on_b);
    let r = http.get(format!("{}/v1/stream?access_token={bearer}&last_event_id=2.-1", a.url)).send().await.unwrap();
    assert_eq!(r.status(), 307);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(location, format!("{}/v1/stream?last_event_id=2.-1", b.url));
    assert!(!location.contains(&bearer), "the token was copied into Location");
    // The name is compared decoded, as the owner's query parser reads it.
    for name in ["access%5Ftoken", "%61ccess_token", "access_to%6Ben"] {
        let r = http.get(format!("{}/v1/stream?x=1&{name}={bearer}&last_event_id=2.-1", a.url)).send().await.unwrap();
        assert_eq!(r.status(), 307, "{name}");
        let location = r.headers()["location"].to_str().unwrap();
        assert_eq!(location, format!("{}/v1/stream?x=1&last_event_id=2.-1", b.url), "{name}");
    }
    // Without a token the owner refuses; the client attaches it again (header or cookie).
    assert_eq!(http.get(&location).send().await.unwrap().status(), 401);
    let r = http.get(&location).bearer_auth(&bearer).send().await.unwrap();
    assert_eq!(r.status(), 200);
    a.push(&on_b, 0); // a does not own 2: ignored
    b.push(&on_b, 0);
    let seen = read_events(r, 1, Duration::from_secs(5)).await;
    assert_eq!(seen.len(), 1);

    // Before the partition count is known (no assignment yet), every stream is 503.
    let fresh = Gw::start(&[], HubConfig::default(), None).await;
    fresh.hub.set_partition_count(0);
    let r = http.get(format!("{}/v1/stream", fresh.url)).bearer_auth(token("x")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));

    // Prometheus text at /metrics, with what this test did in it.
    let text = http.get(format!("{}/metrics", a.url)).send().await.unwrap().text().await.unwrap();
    for metric in [
        "tidings_gateway_connections",
        "tidings_gateway_events_delivered_total",
        "tidings_gateway_resumes_total{outcome=",
        "tidings_gateway_owned_partitions",
        "tidings_gateway_partition_lag{partition=",
        "tidings_gateway_queued_events",
    ] {
        assert!(text.contains(metric), "{metric} missing from /metrics:\n{text}");
    }
}

#[tokio::test]
async fn resume_comes_from_the_ring_then_the_store_else_reset() {
    let _alone = RSS_ALONE.read().await;
    let (store, _dir) = tidings_store::testing::fresh_sqlite().await.unwrap();
    let resume = StoreResume { store: store.clone(), group: "persist".into(), topic: "notifications".into() };
    // Queues of 4: the store part of a resume is read in pages of 4.
    let cfg = HubConfig { ring_events: 5, queue_events: 4, ..HubConfig::default() };
    let gw = Gw::start(&[0, 1, 2, 3], cfg, Some(resume)).await;
    let http = client();
    let url = format!("{}/v1/stream", gw.url);
    let p = partition_for("carol", PARTITIONS);
    // 20 events for carol; the ring keeps only the last 5.
    let positions: Vec<(i32, i64)> = (0..20).map(|i| gw.push("carol", i)).collect();

    // From the ring: after position 16, events 17..19.
    let r = http.get(&url).bearer_auth(token("carol")).header("last-event-id", format!("{p}.16")).send().await.unwrap();
    let seen = read_events(r, 3, Duration::from_secs(5)).await;
    let got: Vec<&str> = seen.iter().map(|e| e["id"].as_str()).collect();
    assert_eq!(got, vec![format!("{p}.17"), format!("{p}.18"), format!("{p}.19")]);

    // Older than the ring, store empty: reset, telling where to continue.
    let r = http.get(&url).bearer_auth(token("carol")).header("last-event-id", format!("{p}.2")).send().await.unwrap();
    let seen = read_events(r, 1, Duration::from_secs(5)).await;
    assert_eq!(seen[0]["event"], "reset", "{seen:?}");
    assert_eq!(seen[0]["id"], format!("{p}.19"));

    // Persist everything (as the persistence stage would, offsets included): now the gap comes
    // from the store and the rest from the ring, without a duplicate at the seam.
    let batch = stored("carol", &positions);
    store.write_batch("persist", &batch).await.unwrap();
    let r = http.get(&url).bearer_auth(token("carol")).header("last-event-id", format!("{p}.2")).send().await.unwrap();
    let seen = read_events(r, 18, Duration::from_secs(5)).await;
    // The store part ends with `resync`: chat copies are not stored, so rooms are refetched.
    let resync = seen.iter().position(|e| e["event"] == "resync").expect("a resync after the store part");
    assert_eq!(resync, 12, "after the 12 stored notifications (3..=14), before the ring's: {seen:?}");
    assert!(!seen[resync].contains_key("id"), "resync moves no position");
    let seen: Vec<_> = seen.into_iter().filter(|e| e["event"] != "resync").collect();
    let got: Vec<String> = seen.iter().map(|e| e["id"].clone()).collect();
    let want: Vec<String> = (3..20).map(|o| format!("{p}.{o}")).collect();
    assert_eq!(got, want);
    let titles: Vec<String> = seen
        .iter()
        .map(|e| serde_json::from_str::<Value>(&e["data"]).unwrap()["title"].as_str().unwrap().into())
        .collect();
    assert_eq!(titles, (3..20).map(|i| format!("title {i}")).collect::<Vec<_>>());

    // Live events keep coming after a resume from the store, once, in order.
    let r = http.get(&url).bearer_auth(token("carol")).header("last-event-id", format!("{p}.9")).send().await.unwrap();
    let live = gw.push("carol", 20);
    let seen = read_events(r, 12, Duration::from_secs(5)).await;
    let got: Vec<String> = seen.iter().filter(|e| e["event"] != "resync").map(|e| e["id"].clone()).collect();
    let mut want: Vec<String> = (10..20).map(|o| format!("{p}.{o}")).collect();
    want.push(format!("{}.{}", live.0, live.1));
    assert_eq!(got, want);
}

/// A resume longer than `max_store_resume` streams that many from the store, then says `reset`
/// (refetch the inbox) and goes on from the ring: bounded work per resume, and no gap unannounced.
#[tokio::test]
async fn a_resume_longer_than_the_limit_ends_its_store_part_with_reset() {
    let _alone = RSS_ALONE.read().await;
    let (store, _dir) = tidings_store::testing::fresh_sqlite().await.unwrap();
    let resume = StoreResume { store: store.clone(), group: "persist".into(), topic: "notifications".into() };
    let cfg = HubConfig { ring_events: 5, queue_events: 4, max_store_resume: 6, ..HubConfig::default() };
    let gw = Gw::start(&[0, 1, 2, 3], cfg, Some(resume)).await;
    let p = partition_for("dave", PARTITIONS);
    let positions: Vec<(i32, i64)> = (0..20).map(|i| gw.push("dave", i)).collect();
    let batch = stored("dave", &positions);
    store.write_batch("persist", &batch).await.unwrap();
    let url = format!("{}/v1/stream", gw.url);
    let r =
        client().get(&url).bearer_auth(token("dave")).header("last-event-id", format!("{p}.0")).send().await.unwrap();
    // Store: 1..=6 (the limit, in pages of 4), then reset at the ring's start (15), then 15..19.
    let seen = read_events(r, 12, Duration::from_secs(5)).await;
    let got: Vec<String> = seen.iter().map(|e| format!("{} {}", e["event"], e["id"])).collect();
    let mut want: Vec<String> = (1..=6).map(|o| format!("order.paid {p}.{o}")).collect();
    want.push(format!("reset {p}.14"));
    want.extend((15..20).map(|o| format!("order.paid {p}.{o}")));
    assert_eq!(got, want);
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// 1,000 clients open a stream and never read; each is sent 600 events of ~1 KiB (630 MiB in all
/// if anything buffered without bound). The gateway closes them as slow once their queue (64
/// events / 64 KiB) is full; memory grows by far less than what was sent; a reading client on the
/// same partitions gets every one of its events, each within a second of being pushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_stalled_clients_are_cut_off_and_do_not_hold_up_the_rest() {
    let _alone = RSS_ALONE.write().await;
    const SLOW: usize = 1_000;
    const EVENTS: usize = 600;
    let cfg = HubConfig { queue_events: 64, queue_bytes: 64 << 10, ..HubConfig::default() };
    let gw = Gw::start(&[0, 1, 2, 3], cfg, None).await;
    let addr = gw.url.trim_start_matches("http://").to_string();
    let baseline = rss_bytes();

    // Stalled clients: a raw socket with a tiny receive buffer that sends the request and then
    // never reads, like a frozen tab.
    let mut stalled = Vec::with_capacity(SLOW);
    for i in 0..SLOW {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let mut s = sock.connect(addr.parse().unwrap()).await.unwrap();
        let req = format!(
            "GET /v1/stream HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nAccept: text/event-stream\r\n\r\n",
            token(&format!("slow-{i}"))
        );
        s.write_all(req.as_bytes()).await.unwrap();
        stalled.push(s);
    }
    // Wait until all are registered.
    let t = Instant::now();
    while gw.hub.connections() < SLOW {
        assert!(t.elapsed() < Duration::from_secs(30), "only {} streams open", gw.hub.connections());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // One reader per partition keeps reading throughout.
    let readers: Vec<String> = (0..PARTITIONS).map(|p| users_on(p, "fast", 1).remove(0)).collect();
    let http = client();
    let mut reading = Vec::new();
    let pushed_at = Arc::new(std::sync::Mutex::new(HashMap::<String, Instant>::new()));
    for r in &readers {
        let resp = http.get(format!("{}/v1/stream", gw.url)).bearer_auth(token(r)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let pushed_at = pushed_at.clone();
        reading.push(tokio::spawn(async move {
            let mut resp = resp;
            let mut buf = String::new();
            let mut worst = Duration::ZERO;
            let mut got = 0;
            while got < EVENTS {
                let Ok(Ok(Some(chunk))) = tokio::time::timeout(Duration::from_secs(30), resp.chunk()).await else {
                    break;
                };
                buf.push_str(std::str::from_utf8(&chunk).unwrap());
                while let Some(end) = buf.find("\n\n") {
                    let block: String = buf.drain(..end + 2).collect();
                    if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) {
                        let v: Value = serde_json::from_str(data).unwrap();
                        let id = v["id"].as_str().unwrap().to_string();
                        let at = pushed_at.lock().unwrap().get(&id).copied().expect("pushed before received");
                        worst = worst.max(at.elapsed());
                        got += 1;
                    }
                }
            }
            (got, worst)
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let padding = "x".repeat(1000);
    let mut next: HashMap<i32, i64> = HashMap::new();
    for n in 0..EVENTS {
        for user in (0..SLOW).map(|i| format!("slow-{i}")).chain(readers.iter().cloned()) {
            let mut notif = notification(&user, n);
            notif.body = padding.clone();
            let p = partition_for(&user, PARTITIONS);
            let o = next.entry(p).or_insert(0);
            let ev = event_from_notification(p, *o, &notif, 0);
            *o += 1;
            if readers.contains(&user) {
                pushed_at.lock().unwrap().insert(notif.notification_id.to_string(), Instant::now());
            }
            gw.hub.push(ev);
        }
        if n % 10 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let sent_bytes = (SLOW * EVENTS * 1100) as u64;
    for (i, r) in reading.into_iter().enumerate() {
        let (got, worst) = r.await.unwrap();
        assert_eq!(got, EVENTS, "reader {i} got {got} of {EVENTS}");
        assert!(worst < Duration::from_secs(1), "reader {i}: an event took {worst:?}");
    }
    // Every stalled stream was closed as slow; only the readers are left.
    let t = Instant::now();
    while gw.hub.connections() > readers.len() {
        assert!(t.elapsed() < Duration::from_secs(10), "{} streams still open", gw.hub.connections());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let grown = rss_bytes().saturating_sub(baseline);
    eprintln!(
        "RSS grew {:.1} MiB with {SLOW} stalled clients sent {:.0} MiB (bound asserted: 160 MiB)",
        grown as f64 / (1 << 20) as f64,
        sent_bytes as f64 / (1 << 20) as f64
    );
    // Rings: 4 partitions × 4 MiB; queues: 1,000 × 64 KiB; ~4 KiB per stream; allocator slack.
    assert!(grown < 160 << 20, "RSS grew by {grown} bytes");
    drop(stalled);
    gw.stop.cancel();
    let _ = Bytes::new();
}

/// Shutdown does not wait for a client that connected but never sent its request (the front
/// would otherwise hold it for its 10 s head timeout), and open streams end with `reconnect`.
#[tokio::test]
async fn shutdown_ends_streams_and_does_not_wait_for_silent_connections() {
    let _alone = RSS_ALONE.read().await;
    let listener = tidings_gateway::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let addr = listener.local_addr().unwrap();
    let hub = Hub::new(HubConfig::default(), None);
    hub.set_partition_count(PARTITIONS);
    for p in 0..PARTITIONS {
        hub.assign(p, 0, 0);
    }
    let owners = Owners::new(&format!("http://{addr}"), "notifications");
    let auth = Arc::new(AuthConfig { keys: vec![Key::hs256(SECRET)], ..Default::default() });
    let state = StreamState { hub: hub.clone(), owners, auth, browser: Default::default() };
    let app = tidings_gateway::app(Parts { stream: Some(state.clone()), ..Default::default() }, Readiness::default());
    let stop = CancellationToken::new();
    let server =
        tokio::spawn(tidings_gateway::serve_gateway(listener, app, Some(state), Limits::default(), stop.clone()));

    let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = client().get(format!("http://{addr}/v1/stream")).bearer_auth(token("dave")).send().await.unwrap();
    assert_eq!(stream.status(), 200);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let t = Instant::now();
    stop.cancel();
    // What the delivery stage does on SIGTERM.
    hub.close_all();
    let seen = read_events(stream, 1, Duration::from_secs(5)).await;
    assert_eq!(seen.first().map(|e| e["event"].as_str()), Some("reconnect"), "{seen:?}");
    tokio::time::timeout(Duration::from_secs(3), server).await.expect("serve_gateway ended").unwrap().unwrap();
    assert!(t.elapsed() < Duration::from_secs(3));
}
