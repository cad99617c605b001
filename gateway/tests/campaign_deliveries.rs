//! Campaign delivered counts end to end within the gateway (the hub fed directly, no broker):
//! users connected over `GET /v1/stream` get a campaign notification, and `campaign_deliveries`
//! holds one per stream that wrote it (live, or resumed from the store), flushed every period and
//! once more on shutdown.

use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tidings_core::Notification;
use tidings_gateway::auth::{AuthConfig, Key};
use tidings_gateway::delivery::campaigns::flush_counts;
use tidings_gateway::delivery::hub::StoreResume;
use tidings_gateway::delivery::{partition_for, Hub, HubConfig, Owners};
use tidings_gateway::{Limits, Parts, Readiness, StreamState};
use tidings_store::{Batch, OffsetUpdate, Store, StoredNotification};
use tokio_util::sync::CancellationToken;

const SECRET: &[u8] = b"campaign-deliveries-test-secret";
const PARTITIONS: i32 = 2;

fn token(sub: &str) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let claims = json!({"sub": sub, "iat": now, "exp": now + 600});
    let h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    jsonwebtoken::encode(&h, &claims, &jsonwebtoken::EncodingKey::from_secret(SECRET)).unwrap()
}

fn notification(campaign: &str, user: &str, kind: &str) -> Notification {
    let event = format!("campaign:{campaign}");
    Notification {
        notification_id: Notification::id_for(&event, user),
        user_id: user.into(),
        kind: kind.into(),
        title: "Spring sale".into(),
        body: "20% off".into(),
        link: Some(format!("/campaigns/{campaign}")),
        source_event_id: event,
        occurred_at: 1_700_000_000_000_000,
        source_topic: "campaigns".into(),
        source_partition: 0,
        source_offset: 0,
        data: None,
        inbox: true,
        category: "campaigns".into(),
        recipients: vec![],
    }
}

struct Gw {
    url: String,
    hub: Arc<Hub>,
    stop: CancellationToken,
    next: std::sync::Mutex<[i64; PARTITIONS as usize]>,
}

impl Gw {
    async fn start() -> Gw {
        Self::start_with(HubConfig::default(), None).await
    }

    async fn start_with(cfg: HubConfig, store: Option<StoreResume>) -> Gw {
        let listener = tidings_gateway::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let hub = Hub::new(cfg, store);
        hub.set_partition_count(PARTITIONS);
        for p in 0..PARTITIONS {
            hub.assign(p, 0, 0);
        }
        let owners = Owners::new(&url, "notifications");
        let auth = Arc::new(AuthConfig { keys: vec![Key::hs256(SECRET)], ..Default::default() });
        let state = StreamState { hub: hub.clone(), owners, auth, browser: Default::default() };
        let app =
            tidings_gateway::app(Parts { stream: Some(state.clone()), ..Default::default() }, Readiness::default());
        let stop = CancellationToken::new();
        tokio::spawn(tidings_gateway::serve_gateway(listener, app, Some(state), Limits::default(), stop.clone()));
        Gw { url, hub, stop, next: Default::default() }
    }

    /// Consumes `n` at the next offset of its user's partition, as the delivery consumer does.
    fn consume(&self, n: Notification) -> (i32, i64) {
        let p = partition_for(&n.user_id, PARTITIONS);
        let offset = {
            let mut next = self.next.lock().unwrap();
            next[p as usize] += 1;
            next[p as usize] - 1
        };
        self.hub.push_all(self.hub.events_of(p, offset, n, 0));
        (p, offset)
    }

    async fn open(&self, user: &str) -> reqwest::Response {
        let r = reqwest::Client::new()
            .get(format!("{}/v1/stream", self.url))
            .bearer_auth(token(user))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r
    }
}

/// `flush_counts` of a gateway's hub into a store, running in the background.
struct Flusher {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), std::convert::Infallible>>,
}

impl Flusher {
    fn start(gw: &Gw, store: &Store, every: Duration) -> Flusher {
        let stop = CancellationToken::new();
        let task = tokio::spawn(flush_counts(gw.hub.clone(), store.clone(), "gw-test".into(), every, stop.clone()));
        Flusher { stop, task }
    }

    /// Shuts down as the delivery consumer does: the streams end with `reconnect`, then the
    /// flusher stops after its last flush.
    async fn shut_down(self, gw: &Gw) {
        gw.hub.close_all();
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// Reads the stream into `seen` until it holds an event named `kind` (panics after 10 s).
async fn read_until(resp: &mut reqwest::Response, seen: &mut String, kind: &str) {
    read_until_n(resp, seen, kind, 1).await
}

/// Reads the stream into `seen` until it holds `n` events named `kind` (panics after 10 s).
async fn read_until_n(resp: &mut reqwest::Response, seen: &mut String, kind: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.matches(&format!("\nevent: {kind}\n")).count() < n {
        match tokio::time::timeout_at(deadline.into(), resp.chunk()).await {
            Ok(Ok(Some(c))) => seen.push_str(std::str::from_utf8(&c).unwrap()),
            other => panic!("not {n} {kind} events on the stream ({other:?}); got {seen:?}"),
        }
    }
}

/// Polls the store until `campaign`'s delivered count is `want` (panics with the last one after 10 s).
async fn delivered_becomes(store: &Store, campaign: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = store.campaign_delivered(campaign).await.unwrap();
        if n == want {
            return;
        }
        assert!(Instant::now() < deadline, "{campaign}: {n} delivered in the store, expected {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn connected_users_getting_a_campaign_are_counted_in_the_store() {
    let (store, _dir) = tidings_store::testing::fresh_sqlite().await.unwrap();
    let gw = Gw::start().await;
    let flusher = Flusher::start(&gw, &store, Duration::from_millis(100));
    // ann has two tabs open: each stream that writes it counts.
    let mut streams = Vec::new();
    for user in ["ann", "ann", "bob", "cy"] {
        streams.push(gw.open(user).await);
    }
    for user in ["ann", "bob", "cy", "dee"] {
        gw.consume(notification("spring", user, "campaign"));
    }
    // The same notification again (templating replayed it): dropped by the hub, counted once.
    gw.consume(notification("spring", "bob", "campaign"));
    // Another kind from the same event id is not a campaign's.
    let mut other = notification("spring", "cy", "order.paid");
    other.notification_id = Notification::id_for("order-1", "cy");
    gw.consume(other);
    let mut seen = vec![String::new(); streams.len()];
    for (s, seen) in streams.iter_mut().zip(&mut seen) {
        read_until(s, seen, "campaign").await;
        assert_eq!(seen.matches("\nevent: campaign\n").count(), 1, "{seen}");
    }
    read_until(&mut streams[3], &mut seen[3], "order.paid").await;
    delivered_becomes(&store, "spring", 4).await;
    // Several flush periods later, still 4 (dee was not connected; nothing counted twice).
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(store.campaign_delivered("spring").await.unwrap(), 4);
    flusher.shut_down(&gw).await;
    gw.stop.cancel();
}

#[tokio::test]
async fn counts_written_since_the_last_flush_are_flushed_on_shutdown() {
    let (store, _dir) = tidings_store::testing::fresh_sqlite().await.unwrap();
    let gw = Gw::start().await;
    // A period no test waits out: only the shutdown's flush writes.
    let flusher = Flusher::start(&gw, &store, Duration::from_secs(3600));
    let (mut stream, mut seen) = (gw.open("eve").await, String::new());
    gw.consume(notification("autumn", "eve", "campaign"));
    read_until(&mut stream, &mut seen, "campaign").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(store.campaign_delivered("autumn").await.unwrap(), 0, "flushed before the shutdown");
    flusher.shut_down(&gw).await;
    assert_eq!(store.campaign_delivered("autumn").await.unwrap(), 1);
    read_until(&mut stream, &mut seen, "reconnect").await;
    gw.stop.cancel();
}

#[tokio::test]
async fn a_resume_from_the_store_counts_what_it_writes() {
    let (store, _dir) = tidings_store::testing::fresh_sqlite().await.unwrap();
    let resume = StoreResume { store: store.clone(), group: "persist".into(), topic: "notifications".into() };
    // A ring of 2: of 5 notifications, the first 3 come back from the store.
    let gw = Gw::start_with(HubConfig { ring_events: 2, ..HubConfig::default() }, Some(resume)).await;
    let flusher = Flusher::start(&gw, &store, Duration::from_millis(100));
    // Consumed while fay was away (no stream wrote them), and persisted.
    let mut batch = Batch::default();
    for i in 0..5 {
        let n = notification(&format!("c{i}"), "fay", "campaign");
        let (p, o) = gw.consume(n.clone());
        batch.notifications.push(StoredNotification { notification: n, stream_partition: p, stream_offset: o });
        batch.offsets = vec![OffsetUpdate { topic: "notifications".into(), partition: p, next_offset: o + 1 }];
    }
    store.write_batch("persist", &batch).await.unwrap();
    let p = partition_for("fay", PARTITIONS);
    let mut resp = reqwest::Client::new()
        .get(format!("{}/v1/stream", gw.url))
        .bearer_auth(token("fay"))
        .header("last-event-id", format!("{p}.-1"))
        .send()
        .await
        .unwrap();
    let mut seen = String::new();
    // Three from the store, `resync`, two from the ring.
    read_until(&mut resp, &mut seen, "resync").await;
    read_until_n(&mut resp, &mut seen, "campaign", 5).await;
    for i in 0..5 {
        delivered_becomes(&store, &format!("c{i}"), 1).await;
    }
    flusher.shut_down(&gw).await;
    gw.stop.cancel();
}
