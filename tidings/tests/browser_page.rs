//! The web page the gateway serves at `/`, in headless Chromium driven step by step through
//! `tests/browser/page.mjs`: its files and headers, dev sign-in, a live inbox (unread badge,
//! mark-read by keyboard), a reload and a page that went away resuming without loss or
//! duplicates, and a gateway restart (SIGTERM, start again on the same port) under an open page.
//! Notifications come in through HTTP ingest on a core process that stays up throughout.
//! Screenshots of the main screens go to `target/browser/`.

mod common;

use common::browser::Browser;
use common::{await_ready, browser_or_skip, eventually, free_port, sigterm, Tidings, Up};
use serde_json::{json, Value};
use std::time::Duration;

/// The whole test, beyond which it fails (every process is killed on the way out).
const WHOLE: Duration = Duration::from_secs(240);

/// What a test checks of the page: connection state, inbox (source event ids, newest first, with
/// read flags), the unread badge.
const SNAPSHOT: &str = r#"
    const items = [...document.querySelectorAll('#inbox-list li')];
    return {
        conn: document.getElementById('conn').dataset.state,
        signed_in: !document.getElementById('app').hidden,
        sources: items.map((li) => li.dataset.source),
        unread_items: items.filter((li) => li.classList.contains('unread')).map((li) => li.dataset.source),
        badge: document.getElementById('inbox-badge').textContent,
        badge_hidden: document.getElementById('inbox-badge').hidden,
        last_event_id: sessionStorage.getItem('tidings.lastEventId'),
    };
"#;

/// Posts one OrderPlaced for `user` over HTTP ingest: one `order.placed` notification.
async fn order(http: &reqwest::Client, ingest: &str, user: &str, event_id: &str) {
    let body = json!({"event_id": event_id, "occurred_at": chrono::Utc::now().timestamp_micros(),
        "order_id": format!("o-{event_id}"), "buyer_id": user, "locale": "en",
        "payload": {"OrderPlaced": {"amount_cents": 1250, "currency": "EUR", "items": []}}});
    let r = http
        .post(format!("{ingest}/v1/events/orders"))
        .bearer_auth(common::ingest_token())
        .json(&body)
        .send()
        .await
        .expect("POST to ingest");
    assert_eq!(r.status(), 202, "ingest refused {event_id}: {}", r.text().await.unwrap_or_default());
}

async fn unread_count(http: &reqwest::Client, url: &str, token: &str) -> i64 {
    let r = http.get(format!("{url}/v1/notifications/unread_count")).bearer_auth(token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["unread"].as_i64().unwrap()
}

/// Waits until the server's inbox unread count is `want`.
async fn inbox_unread(http: &reqwest::Client, url: &str, token: &str, want: i64, within: Duration, procs: &[&Tidings]) {
    let what = format!("the server's unread count to be {want}");
    eventually(&what, within, Duration::from_millis(200), procs, || async {
        match unread_count(http, url, token).await {
            n if n == want => Ok(()),
            n => Err(format!("{n}")),
        }
    })
    .await;
}

fn gateway(name: &str, up: &Up<'_>, port: u16) -> Tidings {
    // A quick browser retry (the gateway's `retry:`), so the restart below is short. Stream
    // cookies that expire after 3 s: every reconnect after that (a gateway restart, a move to
    // another gateway) needs the page to renew its cookie.
    Tidings::spawn_at(
        name,
        up,
        &[("TIDINGS_SSE_RETRY_MS", "250"), ("TIDINGS_GRACE_SECS", "5"), ("TIDINGS_STREAM_SESSION_SECS", "3")],
        &format!("127.0.0.1:{port}"),
    )
}

/// The headers every file of the page comes with.
async fn check_asset(http: &reqwest::Client, url: &str, content_type: &str) -> String {
    let r = http.get(url).send().await.unwrap();
    assert_eq!(r.status(), 200, "{url}");
    let h = r.headers();
    assert_eq!(h["content-type"], content_type, "{url}");
    assert_eq!(h["cache-control"], "no-cache", "{url}");
    assert_eq!(h["x-content-type-options"], "nosniff", "{url}");
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.starts_with("default-src 'self'"), "{url}: CSP {csp}");
    assert!(!csp.contains("unsafe"), "{url}: CSP {csp}");
    r.text().await.unwrap()
}

/// The two tests here run one at a time: each runs Chromium and three processes on shared cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs one page test (`what` names it in the timeout message) on the broker under test, one at
/// a time and within [`WHOLE`]; skipped as `brokers_or_skip` and `browser_or_skip` say.
async fn page_test<F: std::future::Future<Output = ()>>(what: &str, test: impl FnOnce(String) -> F) {
    let Some(brokers) = common::brokers_or_skip() else { return };
    if !browser_or_skip() {
        return;
    }
    let _one = SERIAL.lock().await;
    tokio::time::timeout(WHOLE, test(brokers)).await.unwrap_or_else(|_| panic!("the {what} did not finish in time"));
}

/// A core process (templating, persistence, ingest: up all along) and a gateway on a fixed port,
/// so it can be stopped and started again at the same URL.
struct Stack {
    gw_spec: GatewaySpec,
    ingest: String,
    url: String,
    http: reqwest::Client,
    core: Tidings,
    gw: Tidings,
    _pool: sqlx::PgPool,
}

struct GatewaySpec {
    brokers: String,
    db_url: String,
    prefix: String,
    registry: String,
    port: u16,
}

impl GatewaySpec {
    /// Starts a gateway and waits until it is ready.
    async fn launch(&self, name: &str, http: &reqwest::Client) -> Tidings {
        let up = Up::gateway(&self.brokers, &self.db_url, &self.prefix, &self.registry);
        let mut gw = gateway(name, &up, self.port);
        gw.endpoints(Duration::from_secs(60)).await;
        await_ready(http, &format!("http://127.0.0.1:{}", self.port), &[&gw]).await;
        gw
    }
}

impl Stack {
    async fn start(brokers: String) -> Stack {
        let (pool, db_url) = common::fresh_pg().await;
        let prefix = common::unique_prefix();
        eprintln!("topic prefix {prefix}, database {db_url}");
        let mut core = Tidings::spawn("core", &Up::core(&brokers, &db_url, &prefix));
        let ep = core.endpoints(Duration::from_secs(60)).await;
        let port = free_port();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
        let gw_spec = GatewaySpec { brokers, db_url, prefix, registry: ep.schema_registry_url, port };
        let gw = gw_spec.launch("gateway", &http).await;
        Stack { gw_spec, ingest: ep.ingest, url: format!("http://127.0.0.1:{port}"), http, core, gw, _pool: pool }
    }

    /// SIGTERM to the gateway (it must exit 0); a new one is started with [`Stack::start_gateway`].
    async fn stop_gateway(&mut self) {
        sigterm(&mut self.gw).await;
    }

    async fn start_gateway(&mut self, name: &str) {
        self.gw = self.gw_spec.launch(name, &self.http).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_page_inbox_live_across_reloads_and_a_gateway_restart() {
    page_test("web page test", inbox).await;
}

async fn inbox(brokers: String) {
    let mut st = Stack::start(brokers).await;
    let (url, http) = (st.url.clone(), st.http.clone());
    let ingest = st.ingest.clone();

    // The files, their headers, the page's config, dev sign-in over plain HTTP.
    let html = check_asset(&http, &format!("{url}/"), "text/html; charset=utf-8").await;
    assert!(html.contains(r#"src="/app.js""#) && html.contains(r#"href="/app.css""#), "index.html: {html}");
    let js = check_asset(&http, &format!("{url}/app.js"), "text/javascript; charset=utf-8").await;
    assert!(js.contains("EventSource"), "app.js is not the page's script");
    check_asset(&http, &format!("{url}/app.css"), "text/css; charset=utf-8").await;
    let config: Value = http.get(format!("{url}/config.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(config["dev_sign_in"], true, "{config}");
    assert!(config["kinds"].as_array().unwrap().iter().any(|k| k == "order.placed"), "{config}");
    let r = http.post(format!("{url}/v1/dev/token")).json(&json!({"user_id": "a b"})).send().await.unwrap();
    assert_eq!(r.status(), 422, "a user id with a space");
    let r = http.post(format!("{url}/v1/dev/token")).json(&json!({"user_id": "alice"})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let token = r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_string();
    assert_eq!(unread_count(&http, &url, &token).await, 0, "the dev token is accepted");

    // Signed out, then signed in as a demo user with the keyboard, on a phone-sized viewport.
    let mut b = Browser::start(SNAPSHOT);
    let status = b.call("alice", json!({"cmd": "open", "url": format!("{url}/"), "width": 390, "height": 844})).await;
    assert_eq!(status, 200);
    b.wait("alice", "the page to start", "return document.body.dataset.ready === '1'").await;
    let dev_form = b.eval("alice", "return !document.getElementById('dev-form').hidden").await;
    assert_eq!(dev_form, true, "no demo sign-in in dev mode");
    let fits = b.eval("alice", "return document.documentElement.scrollWidth <= window.innerWidth").await;
    assert_eq!(fits, true, "the signed-out page scrolls sideways at 390 px");
    b.screenshot("alice", "signed-out").await;
    b.call("alice", json!({"cmd": "fill", "selector": "#dev-user", "value": "alice"})).await;
    b.call("alice", json!({"cmd": "press", "selector": "#dev-user", "key": "Enter"})).await;
    b.wait("alice", "the stream to be live", "return document.getElementById('conn').dataset.state === 'live'").await;
    let who = b.eval("alice", "return document.getElementById('who').textContent").await;
    assert_eq!(who, "Signed in as alice");

    // Live: each notification appears once, newest first, and the badge counts it.
    order(&http, &ingest, "alice", "ev-1").await;
    b.wait("alice", "ev-1 in the inbox", "return document.getElementById('inbox-badge').textContent === '1'").await;
    order(&http, &ingest, "alice", "ev-2").await;
    b.wait("alice", "ev-2 in the inbox", "return document.getElementById('inbox-badge').textContent === '2'").await;
    let s = b.snapshot("alice").await;
    assert_eq!(s["sources"], json!(["ev-2", "ev-1"]), "{s}");
    assert_eq!(s["unread_items"], json!(["ev-2", "ev-1"]), "{s}");
    assert_eq!(s["badge_hidden"], false, "{s}");
    let live =
        b.eval("alice", "return [...document.querySelectorAll('#inbox-list li')].map((li) => li.dataset.live)").await;
    assert_eq!(live, json!(["1", "1"]), "both came over the stream, not from a refetch");

    // Mark-read with the keyboard: the badge goes down, and so does the server's count.
    b.call("alice", json!({"cmd": "press", "selector": "li[data-source='ev-1'] button", "key": "Enter"})).await;
    b.wait("alice", "the badge to go down", "return document.getElementById('inbox-badge').textContent === '1'").await;
    inbox_unread(&http, &url, &token, 1, Duration::from_secs(10), &[&st.core, &st.gw]).await;
    let s = b.snapshot("alice").await;
    assert_eq!(s["unread_items"], json!(["ev-2"]), "{s}");
    b.screenshot("alice", "inbox").await;

    // The page goes away; a notification comes in meanwhile; the page comes back (same tab).
    b.call("alice", json!({"cmd": "leave"})).await;
    order(&http, &ingest, "alice", "ev-3").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    b.call("alice", json!({"cmd": "goto", "url": format!("{url}/")})).await;
    b.wait("alice", "the stream to be live again", "return document.getElementById('conn').dataset.state === 'live'")
        .await;
    b.wait("alice", "ev-3 after coming back", "return document.querySelector(\"li[data-source='ev-3']\") !== null")
        .await;
    // A reload right after a notification was sent: it arrives during or after the reload.
    order(&http, &ingest, "alice", "ev-4").await;
    b.call("alice", json!({"cmd": "reload"})).await;
    b.wait("alice", "ev-4 after the reload", "return document.querySelector(\"li[data-source='ev-4']\") !== null")
        .await;
    // A duplicate would show up now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = b.snapshot("alice").await;
    assert_eq!(s["sources"], json!(["ev-4", "ev-3", "ev-2", "ev-1"]), "after the reload: {s}");
    assert_eq!(s["unread_items"], json!(["ev-4", "ev-3", "ev-2"]), "read flags after the reload: {s}");
    assert_eq!(s["badge"], "3", "{s}");
    assert_eq!(s["conn"], "live", "{s}");

    // The gateway stops (SIGTERM) under the open page, a notification comes in while it is down,
    // the gateway starts again on the same port: the page reconnects by itself and shows it once.
    st.stop_gateway().await;
    b.wait(
        "alice",
        "the page to show it is reconnecting",
        "return document.getElementById('conn').dataset.state === 'reconnecting'",
    )
    .await;
    order(&http, &ingest, "alice", "ev-5").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = b.snapshot("alice").await;
    assert_eq!(s["conn"], "reconnecting", "with the gateway down: {s}");
    st.start_gateway("gateway-2").await;
    b.wait("alice", "ev-5 after the restart", "return document.querySelector(\"li[data-source='ev-5']\") !== null")
        .await;
    b.wait(
        "alice",
        "the stream to be live after the restart",
        "return document.getElementById('conn').dataset.state === 'live'",
    )
    .await;
    order(&http, &ingest, "alice", "ev-6").await;
    b.wait(
        "alice",
        "ev-6 live after the restart",
        "return document.querySelector(\"li[data-source='ev-6']\") !== null",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = b.snapshot("alice").await;
    assert_eq!(s["sources"], json!(["ev-6", "ev-5", "ev-4", "ev-3", "ev-2", "ev-1"]), "after the restart: {s}");
    assert_eq!(s["badge"], "5", "{s}");
    // The stream can be ahead of the inbox table (persistence's batches linger): the server's
    // count must come to the badge's, not stay off it.
    inbox_unread(&http, &url, &token, 5, Duration::from_secs(20), &[&st.core, &st.gw]).await;
    b.screenshot("alice", "inbox-after-restart").await;

    // Archive by keyboard: ev-6 leaves the list and the badge, focus goes to the next item's
    // archive button, and the server's count follows.
    let archive = "li[data-source='ev-6'] button[aria-label^='Archive']";
    b.call("alice", json!({"cmd": "press", "selector": archive, "key": "Enter"})).await;
    b.wait(
        "alice",
        "ev-6 to leave the inbox",
        "return document.querySelector(\"#inbox-list li[data-source='ev-6']\") === null",
    )
    .await;
    let s = b.snapshot("alice").await;
    assert_eq!(s["sources"], json!(["ev-5", "ev-4", "ev-3", "ev-2", "ev-1"]), "after archiving: {s}");
    assert_eq!(s["badge"], "4", "{s}");
    let focused = b.eval("alice", "return document.activeElement.closest('li')?.dataset.source || null").await;
    assert_eq!(focused, "ev-5", "focus after archiving");
    inbox_unread(&http, &url, &token, 4, Duration::from_secs(10), &[&st.core, &st.gw]).await;

    // Mark all read by keyboard: no item unread, the badge hidden, the server's count 0.
    b.call("alice", json!({"cmd": "press", "selector": "#inbox-read-all", "key": "Enter"})).await;
    b.wait("alice", "the badge to go away", "return document.getElementById('inbox-badge').hidden").await;
    let s = b.snapshot("alice").await;
    assert_eq!(s["unread_items"], json!([]), "after mark all read: {s}");
    let said = b.eval("alice", "return document.getElementById('inbox-status').textContent").await;
    assert_eq!(said, "Marked 4 notifications read.");
    inbox_unread(&http, &url, &token, 0, Duration::from_secs(10), &[&st.core, &st.gw]).await;

    // The Archived view lists ev-6, still unread; moving it back puts it in the inbox, unread.
    b.call("alice", json!({"cmd": "press", "selector": "#inbox-archived", "key": "Enter"})).await;
    let back = "#archived-list li[data-source='ev-6'] button";
    b.wait("alice", "ev-6 in the archive", &format!("return document.querySelector({}) !== null", json!(back))).await;
    b.screenshot("alice", "archived").await;
    b.call("alice", json!({"cmd": "press", "selector": back, "key": "Enter"})).await;
    b.wait("alice", "the archive to be empty", "return !document.getElementById('archived-empty').hidden").await;
    let s = b.snapshot("alice").await;
    assert_eq!(s["sources"], json!(["ev-6", "ev-5", "ev-4", "ev-3", "ev-2", "ev-1"]), "after moving back: {s}");
    assert_eq!((&s["unread_items"], &s["badge"]), (&json!(["ev-6"]), &json!("1")), "{s}");
    inbox_unread(&http, &url, &token, 1, Duration::from_secs(10), &[&st.core, &st.gw]).await;
    // And the inbox says what is unread per category (order.placed is in `orders`).
    b.wait(
        "alice",
        "the unread count per category",
        "return document.getElementById('inbox-categories').textContent === 'Unread by category: orders 1'",
    )
    .await;

    // Signing out closes the stream and forgets the token (a reload stays signed out).
    b.call("alice", json!({"cmd": "click", "selector": "#sign-out"})).await;
    b.call("alice", json!({"cmd": "reload"})).await;
    b.wait("alice", "the page to start", "return document.body.dataset.ready === '1'").await;
    let s = b.snapshot("alice").await;
    assert_eq!(s["signed_in"], false, "{s}");
    assert_eq!(s["conn"], "offline", "{s}");
    b.close().await;
    drop(st);
}

/// Texts and ids of the open room's messages, in the order shown.
const MESSAGES: &str = r#"
    const lis = [...document.querySelectorAll('#messages li')];
    return {
        texts: lis.map((li) => li.querySelector('.text').textContent),
        ids: lis.map((li) => li.dataset.messageId),
        seqs: lis.map((li) => Number(li.dataset.seq)),
        conn: document.getElementById('conn').dataset.state,
        title: document.getElementById('room-title').textContent,
        meta: document.getElementById('room-meta').textContent,
    };
"#;

fn has_message(text: &str) -> String {
    format!(
        "return [...document.querySelectorAll('#messages li .text')].some((t) => t.textContent === {})",
        json!(text)
    )
}

/// Types `text` into the open room's send box and sends it with Enter; waits until it shows.
async fn say(b: &mut Browser, ctx: &str, text: &str) {
    b.call(ctx, json!({"cmd": "fill", "selector": "#send-text", "value": text})).await;
    b.call(ctx, json!({"cmd": "press", "selector": "#send-text", "key": "Enter"})).await;
    b.wait(ctx, &format!("{text:?} to show on the sender's side"), &has_message(text)).await;
}

/// Both pages show exactly `want`, in order, each once, with increasing seqs. Waits for the whole
/// list, not just its last message: a page that just (re)opened the room may get the newest one
/// live while its history request is still being answered 503 + Retry-After (the store catching
/// up) and retried.
async fn same_messages(b: &mut Browser, want: &[String], when: &str) {
    let all = format!(
        "return JSON.stringify([...document.querySelectorAll('#messages li .text')].map((t) => t.textContent)) === {}",
        json!(serde_json::to_string(want).unwrap())
    );
    for ctx in ["alice", "bob"] {
        b.wait(ctx, &format!("all {} messages {when}", want.len()), &all).await;
    }
    // A duplicate would show up now.
    tokio::time::sleep(Duration::from_millis(700)).await;
    for ctx in ["alice", "bob"] {
        let m = b.eval(ctx, MESSAGES).await;
        assert_eq!(m["texts"], json!(want), "{ctx} {when}: {m}");
        let ids: std::collections::HashSet<&str> =
            m["ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(ids.len(), want.len(), "{ctx} {when}: a message id twice: {m}");
        let seqs: Vec<i64> = m["seqs"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{ctx} {when}: seqs out of order: {m}");
    }
}

async fn rooms_of(http: &reqwest::Client, url: &str, token: &str) -> Value {
    let r = http.get(format!("{url}/v1/rooms")).bearer_auth(token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Waits until the server counts `want` unread messages in the user's (only) room.
async fn server_unread(http: &reqwest::Client, url: &str, token: &str, want: i64, procs: &[&Tidings]) {
    let what = format!("the server's unread count to be {want}");
    eventually(&what, Duration::from_secs(10), Duration::from_millis(200), procs, || async {
        let r = rooms_of(http, url, token).await;
        if r["rooms"][0]["unread"] == want {
            Ok(())
        } else {
            Err(r.to_string())
        }
    })
    .await;
}

async fn dev_token(http: &reqwest::Client, url: &str, user: &str) -> String {
    let r = http.post(format!("{url}/v1/dev/token")).json(&json!({"user_id": user})).send().await.unwrap();
    r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_page_chat_two_users_live_across_reloads_and_a_gateway_restart() {
    page_test("chat page test", chat).await;
}

async fn chat(brokers: String) {
    let mut st = Stack::start(brokers).await;
    let (url, http) = (st.url.clone(), st.http.clone());
    let mut b = Browser::start(SNAPSHOT);
    for user in ["alice", "bob"] {
        b.call(user, json!({"cmd": "open", "url": format!("{url}/"), "width": 390, "height": 844})).await;
        b.wait(user, "the page to start", "return document.body.dataset.ready === '1'").await;
        b.call(user, json!({"cmd": "fill", "selector": "#dev-user", "value": user})).await;
        b.call(user, json!({"cmd": "press", "selector": "#dev-user", "key": "Enter"})).await;
        b.wait(user, "the stream to be live", "return document.getElementById('conn').dataset.state === 'live'").await;
    }

    // Alice creates a group room tagged tea (keyboard only) and lands in it.
    b.call("alice", json!({"cmd": "goto", "url": format!("{url}/#/rooms")})).await;
    b.wait("alice", "the room list", "return !document.getElementById('view-rooms').hidden").await;
    b.call("alice", json!({"cmd": "fill", "selector": "#create-name", "value": "Tea lovers"})).await;
    b.call("alice", json!({"cmd": "fill", "selector": "#create-tags", "value": "tea, green"})).await;
    b.call("alice", json!({"cmd": "press", "selector": "#create-tags", "key": "Enter"})).await;
    let room = b
        .wait(
            "alice",
            "the new room to open",
            "const m = location.hash.match(/^#\\/rooms\\/(.+)$/); \
             return m && document.getElementById('room-title').textContent === 'Tea lovers' && decodeURIComponent(m[1])",
        )
        .await;
    let room = room.as_str().unwrap().to_string();
    eprintln!("room {room}");

    // Bob finds it by tag and joins.
    b.call("bob", json!({"cmd": "click", "selector": "#tab-find"})).await;
    b.call("bob", json!({"cmd": "fill", "selector": "#search-tags", "value": "tea"})).await;
    b.call("bob", json!({"cmd": "press", "selector": "#search-tags", "key": "Enter"})).await;
    let found = format!("#search-results li[data-room-id='{room}']");
    b.wait(
        "bob",
        "the room in the search results",
        &format!("return document.querySelector({}) !== null", json!(found)),
    )
    .await;
    let results = b.eval("bob", "return document.getElementById('search-results').innerText").await;
    assert!(
        results.as_str().unwrap().contains("Tea lovers") && results.as_str().unwrap().contains("#green"),
        "{results}"
    );
    b.screenshot("bob", "search").await;
    b.call("bob", json!({"cmd": "click", "selector": format!("{found} button")})).await;
    b.wait(
        "bob",
        "the joined room to open",
        "return document.getElementById('room-title').textContent === 'Tea lovers'",
    )
    .await;
    b.wait("alice", "bob among the members", "return document.getElementById('room-meta').textContent.includes('bob')")
        .await;

    // Both ways, live; then a quick exchange.
    let mut want: Vec<String> = Vec::new();
    for (who, text) in [("alice", "hello bob"), ("bob", "hi alice"), ("alice", "tea?"), ("bob", "green, please")] {
        say(&mut b, who, text).await;
        want.push(text.into());
    }
    same_messages(&mut b, &want, "live").await;
    b.screenshot("alice", "room").await;

    // Bob looks at his room list while Alice writes: two unread, on the page and on the server.
    b.call("bob", json!({"cmd": "click", "selector": "#tab-rooms"})).await;
    b.wait("bob", "the room list", "return !document.getElementById('view-rooms').hidden").await;
    for text in ["are you there?", "the kettle is on"] {
        say(&mut b, "alice", text).await;
        want.push(text.into());
    }
    let unread = format!("#room-list li[data-room-id='{room}'] .unread-count");
    b.wait(
        "bob",
        "2 unread in the room list",
        &format!("const e = document.querySelector({}); return e && e.textContent === '2'", json!(unread)),
    )
    .await;
    let badge = b.eval("bob", "return document.getElementById('rooms-badge').textContent").await;
    assert_eq!(badge, "2");
    let bob_token = dev_token(&http, &url, "bob").await;
    // The server counts stored messages: the last one may still be on its way to the store.
    server_unread(&http, &url, &bob_token, 2, &[&st.core]).await;
    b.screenshot("bob", "room-list").await;
    // Opening the room reads it.
    b.call("bob", json!({"cmd": "click", "selector": format!("#room-list li[data-room-id='{room}'] a")})).await;
    b.wait("bob", "the room badge to clear", "return document.getElementById('rooms-badge').hidden").await;
    server_unread(&http, &url, &bob_token, 0, &[&st.gw]).await;
    same_messages(&mut b, &want, "after bob opened the room again").await;

    // Bob reloads while Alice writes; then scrolls back is not needed: all fit one page.
    b.call("alice", json!({"cmd": "fill", "selector": "#send-text", "value": "while you reload"})).await;
    b.call("alice", json!({"cmd": "press", "selector": "#send-text", "key": "Enter"})).await;
    b.call("bob", json!({"cmd": "reload"})).await;
    want.push("while you reload".into());
    same_messages(&mut b, &want, "after bob's reload").await;

    // The gateway stops under both pages (messages in flight) and starts again.
    for text in ["before the restart 1", "before the restart 2"] {
        say(&mut b, "bob", text).await;
        want.push(text.into());
    }
    st.stop_gateway().await;
    for ctx in ["alice", "bob"] {
        b.wait(
            ctx,
            "the page to show it is reconnecting",
            "return document.getElementById('conn').dataset.state === 'reconnecting'",
        )
        .await;
    }
    order(&http, &st.ingest, "alice", "while-down").await;
    st.start_gateway("gateway-2").await;
    for ctx in ["alice", "bob"] {
        b.wait(
            ctx,
            "the stream to be live after the restart",
            "return document.getElementById('conn').dataset.state === 'live'",
        )
        .await;
    }
    for (who, text) in [("alice", "back again"), ("bob", "welcome back")] {
        say(&mut b, who, text).await;
        want.push(text.into());
    }
    same_messages(&mut b, &want, "after the gateway restart").await;
    // Alice's order notification, sent while the gateway was down, arrived once; no chat in the inbox.
    b.wait(
        "alice",
        "the notification sent while down",
        "return document.querySelector(\"#inbox-list li[data-source='while-down']\") !== null",
    )
    .await;
    let inbox =
        b.eval("alice", "return [...document.querySelectorAll('#inbox-list li')].map((li) => li.dataset.source)").await;
    assert_eq!(inbox, json!(["while-down"]), "alice's inbox");
    let inbox = b.eval("bob", "return document.querySelectorAll('#inbox-list li').length").await;
    assert_eq!(inbox, 0, "chat events are not inbox items");
    b.screenshot("bob", "room-after-restart").await;

    // History: more than a page (50) of messages, sent over the API; after a reload Alice sees the
    // newest page, and "Load older" brings the rest, each message once.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    for i in 0..45 {
        let text = format!("backlog {i:02}");
        loop {
            let r = client
                .post(format!("{url}/v1/rooms/{room}/messages"))
                .bearer_auth(&bob_token)
                .json(&json!({"text": text}))
                .send()
                .await
                .unwrap();
            if r.status() == 429 {
                let secs = r.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap_or(1);
                tokio::time::sleep(Duration::from_secs(secs)).await;
                continue;
            }
            assert_eq!(r.status(), 201, "sending {text}: {}", r.text().await.unwrap_or_default());
            break;
        }
        want.push(text);
    }
    same_messages(&mut b, &want, "after the backlog").await;
    b.call("alice", json!({"cmd": "reload"})).await;
    b.wait("alice", "the newest page after the reload", &has_message(want.last().unwrap())).await;
    let first = b.eval("alice", MESSAGES).await;
    assert_eq!(first["texts"].as_array().unwrap().len(), 50, "one page of history: {first}");
    b.wait("alice", "the load-older button", "return !document.getElementById('room-older').hidden").await;
    b.call("alice", json!({"cmd": "press", "selector": "#room-older", "key": "Enter"})).await;
    b.wait("alice", "the oldest message", &has_message(&want[0])).await;
    let all = b.eval("alice", MESSAGES).await;
    assert_eq!(all["texts"], json!(want), "after loading older: {all}");
    let hidden = b.eval("alice", "return document.getElementById('room-older').hidden").await;
    assert_eq!(hidden, true, "no older page left, but the button is still there");
    b.close().await;
    drop(st);
}

/// The page on gateway A, for a user whose partition gateway B owns: its EventSource follows A's
/// 307 to B's origin, which the page's CSP allows because B is on `--redirect-allow` (and B's CORS
/// lets A's origin in with the session cookie), and a notification arrives live over B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_page_follows_its_stream_to_the_gateway_owning_its_user() {
    page_test("two-gateway page test", two_origins).await;
}

async fn two_origins(brokers: String) {
    let (_pool, db_url) = common::fresh_pg().await;
    let prefix = common::unique_prefix();
    let mut core = Tidings::spawn("core", &Up::core(&brokers, &db_url, &prefix));
    let ep = core.endpoints(Duration::from_secs(60)).await;
    let (pa, pb) = (free_port(), free_port());
    let (a, b_url) = (format!("http://127.0.0.1:{pa}"), format!("http://127.0.0.1:{pb}"));
    let allow = format!("{a},{b_url}");
    let up = Up::gateway(&brokers, &db_url, &prefix, &ep.schema_registry_url);
    let env = [("TIDINGS_REDIRECT_ALLOW", allow.as_str()), ("TIDINGS_CORS_ALLOW_ORIGINS", a.as_str())];
    let mut ga = Tidings::spawn_at("gateway-a", &up, &env, &format!("127.0.0.1:{pa}"));
    let mut gb = Tidings::spawn_at("gateway-b", &up, &env, &format!("127.0.0.1:{pb}"));
    ga.endpoints(Duration::from_secs(60)).await;
    gb.endpoints(Duration::from_secs(60)).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    await_ready(&http, &a, &[&ga]).await;
    await_ready(&http, &b_url, &[&gb]).await;

    // A user whose stream A redirects to B (both own some of the 12 partitions once both joined).
    let user =
        eventually("a user owned by B", Duration::from_secs(60), Duration::from_millis(500), &[&ga, &gb], || async {
            for i in 0..200 {
                let user = format!("far{i}");
                let token = dev_token(&http, &a, &user).await;
                let r =
                    http.get(format!("{a}/v1/stream")).bearer_auth(&token).send().await.map_err(|e| e.to_string())?;
                let to = r.headers().get("location").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
                if r.status() == 307 && to.starts_with(&b_url) {
                    return Ok(user);
                }
            }
            Err("no user of A's is redirected to B yet".to_string())
        })
        .await;
    // The page may connect to the other gateways, and nowhere else.
    check_asset(&http, &format!("{a}/"), "text/html; charset=utf-8").await;
    let r = http.get(format!("{a}/app.js")).send().await.unwrap();
    let csp = r.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains(&format!("connect-src 'self' {a} {b_url};")), "{csp}");

    let mut b = Browser::start(SNAPSHOT);
    let status = b.call(&user, json!({"cmd": "open", "url": format!("{a}/"), "width": 390, "height": 844})).await;
    assert_eq!(status, 200);
    b.wait(&user, "the page to start", "return document.body.dataset.ready === '1'").await;
    b.call(&user, json!({"cmd": "fill", "selector": "#dev-user", "value": user})).await;
    b.call(&user, json!({"cmd": "press", "selector": "#dev-user", "key": "Enter"})).await;
    b.wait(&user, "the stream (on B) to be live", "return document.getElementById('conn').dataset.state === 'live'")
        .await;
    order(&http, &ep.ingest, &user, "far-1").await;
    b.wait(&user, "far-1 in the inbox", "return document.getElementById('inbox-badge').textContent === '1'").await;
    let live =
        b.eval(&user, "return [...document.querySelectorAll('#inbox-list li')].map((li) => li.dataset.live)").await;
    assert_eq!(live, json!(["1"]), "it came over the stream");
    let streams = common::metric(&http, &b_url, "tidings_gateway_connections").await.unwrap();
    assert!(streams >= 1.0, "the page's stream is not on B: {streams} streams there");
    b.screenshot(&user, "stream-on-another-gateway").await;
    b.close().await;
    sigterm(&mut ga).await;
    sigterm(&mut gb).await;
    drop(core);
}
