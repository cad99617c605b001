//! What a browser's plain EventSource gets from `GET /v1/stream` on a real local port (hub fed
//! directly, no broker): transient states as a 200 `retry:` stream that ends (503 for others), the
//! session cookie from `POST /v1/session` and where it counts, and CORS only for allowed origins.

use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tidings_gateway::auth::{AuthConfig, Key};
use tidings_gateway::browser::BrowserAccess;
use tidings_gateway::delivery::owners::RedirectAllow;
use tidings_gateway::delivery::{Hub, HubConfig, Owners};
use tidings_gateway::{Limits, Parts, Readiness, StreamState};
use tokio_util::sync::CancellationToken;

const SECRET: &[u8] = b"browser-test-secret";

fn token(sub: &str, ttl: u64) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let claims = json!({"sub": sub, "iat": now, "exp": now + ttl});
    let h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    jsonwebtoken::encode(&h, &claims, &jsonwebtoken::EncodingKey::from_secret(SECRET)).unwrap()
}

/// A gateway as `tidings up` serves it (streams from the socket, the rest through axum) with
/// `partitions` partitions, all owned (0: the partition count is not known yet, nothing is ready).
async fn start(partitions: i32, browser: BrowserAccess) -> (String, CancellationToken) {
    let listener = tidings_gateway::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hub = Hub::new(HubConfig::default(), None);
    hub.set_partition_count(partitions);
    for p in 0..partitions {
        hub.assign(p, 0, 0);
    }
    let owners = Owners::new(&url, "notifications");
    let auth = Arc::new(AuthConfig { keys: vec![Key::hs256(SECRET)], ..Default::default() });
    let state = StreamState { hub, owners, auth, browser: Arc::new(browser) };
    let app = tidings_gateway::app(Parts { stream: Some(state.clone()), ..Default::default() }, Readiness::default());
    let stop = CancellationToken::new();
    tokio::spawn(tidings_gateway::serve_gateway(listener, app, Some(state), Limits::default(), stop.clone()));
    (url, stop)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[tokio::test]
async fn transient_states_are_a_retry_stream_for_event_source_and_503_for_others() {
    let (url, stop) = start(0, BrowserAccess::default()).await;
    let http = client();
    let stream = format!("{url}/v1/stream");
    let bearer = token("alice", 600);

    let r = http.get(&stream).bearer_auth(&bearer).header("accept", "text/event-stream").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert_eq!(r.headers()["retry-after"], "1");
    // The body ends (the browser then reconnects after `retry`) and carries no `id:`.
    let body = tokio::time::timeout(Duration::from_secs(5), r.text()).await.expect("the body ends").unwrap();
    let (head, data) = body.split_once("data: ").unwrap();
    assert_eq!(head, "retry: 1000\nevent: unavailable\n");
    assert!(data.ends_with("\n\n") && !body.contains("\nid:"), "{body:?}");
    let data: Value = serde_json::from_str(data.trim_end()).unwrap();
    assert_eq!(data["code"], "not_ready");

    // Any Accept list naming text/event-stream counts; other clients keep the 503.
    let r = http.get(&stream).bearer_auth(&bearer).header("accept", "text/html, text/event-stream;q=0.9").send();
    assert_eq!(r.await.unwrap().status(), 200);
    for accept in [None, Some("application/json"), Some("text/event-streamx")] {
        let mut req = http.get(&stream).bearer_auth(&bearer);
        if let Some(a) = accept {
            req = req.header("accept", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 503, "{accept:?}");
        assert_eq!(r.headers()["retry-after"], "1");
    }
    // A bad token still stops an EventSource for good.
    let r = http.get(&stream).bearer_auth("not.a.jwt").header("accept", "text/event-stream").send().await.unwrap();
    assert_eq!(r.status(), 401);
    stop.cancel();
}

#[tokio::test]
async fn the_session_cookie_comes_from_a_bearer_token_and_opens_streams() {
    let (url, stop) = start(4, BrowserAccess::default()).await;
    let http = client();
    let session = format!("{url}/v1/session");
    let bearer = token("alice", 600);

    // Only a valid token in the Authorization header sets it: not a query token, not a cookie.
    assert_eq!(http.post(&session).send().await.unwrap().status(), 401);
    assert_eq!(http.post(format!("{session}?access_token={bearer}")).send().await.unwrap().status(), 401);
    let r = http.post(&session).header("cookie", format!("tidings_session={bearer}")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(http.post(&session).bearer_auth(token("alice", 0).replace('.', "")).send().await.unwrap().status(), 401);

    let r = http.post(&session).bearer_auth(&bearer).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    let prefix = format!("tidings_session={bearer}; HttpOnly; SameSite=Strict; Path=/v1; Max-Age=");
    let max_age: u64 = cookie.strip_prefix(&prefix).unwrap_or_else(|| panic!("{cookie}")).parse().unwrap();
    assert!((590..=600).contains(&max_age), "Max-Age {max_age}: the token's remaining life");

    // The cookie opens the user's stream (direct path) ...
    let r = http.get(format!("{url}/v1/stream")).header("cookie", format!("tidings_session={bearer}")).send();
    let r = r.await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    drop(r);
    // ... and clearing it is open to anyone.
    let r = http.delete(&session).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert!(r.headers()["set-cookie"].to_str().unwrap().starts_with("tidings_session=; "));
    assert!(r.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));

    let (secure_url, secure_stop) = start(
        4,
        BrowserAccess { cookie_secure: true, cookie_domain: Some("gw.example.com".into()), ..Default::default() },
    )
    .await;
    let r = http.post(format!("{secure_url}/v1/session")).bearer_auth(&bearer).send().await.unwrap();
    assert!(r.headers()["set-cookie"].to_str().unwrap().ends_with("; Domain=gw.example.com; Secure"));
    stop.cancel();
    secure_stop.cancel();
}

#[tokio::test]
async fn cors_only_for_allowed_origins_on_the_stream() {
    let extra = RedirectAllow::new(["https://app.example.com"]).unwrap();
    let (url, stop) = start(4, BrowserAccess { cors_allow: extra, ..Default::default() }).await;
    let http = client();
    let stream = format!("{url}/v1/stream");
    let bearer = token("alice", 600);
    // Same host, another port (a peer gateway's page), and the explicit origin: allowed.
    for origin in ["http://127.0.0.1:1", "https://app.example.com"] {
        // The stream itself (served from the socket) and an answer axum gives (401).
        let r = http.get(&stream).bearer_auth(&bearer).header("origin", origin).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["access-control-allow-origin"], origin);
        assert_eq!(r.headers()["access-control-allow-credentials"], "true");
        assert_eq!(r.headers()["vary"], "origin");
        drop(r);
        let r = http.get(&stream).header("origin", origin).send().await.unwrap();
        assert_eq!((r.status().as_u16(), &r.headers()["access-control-allow-origin"]), (401, &origin.parse().unwrap()));
        let r = http
            .request(reqwest::Method::OPTIONS, &stream)
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "last-event-id")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
        assert_eq!(r.headers()["access-control-allow-origin"], origin);
        assert!(r.headers()["access-control-allow-headers"].to_str().unwrap().contains("last-event-id"));
        assert_eq!(r.headers()["access-control-allow-methods"], "GET");
    }
    // Anything else gets no CORS header: another host, another scheme, a path, null.
    for origin in
        ["http://evil.example", "https://127.0.0.1:1", "http://127.0.0.1:1/x", "null", "http://app.example.com"]
    {
        let r = http.get(&stream).bearer_auth(&bearer).header("origin", origin).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers().get("access-control-allow-origin").is_none(), "{origin}");
        drop(r);
        let r = http.request(reqwest::Method::OPTIONS, &stream).header("origin", origin).send().await.unwrap();
        assert!(r.headers().get("access-control-allow-origin").is_none(), "{origin}");
    }
    // Nothing but the stream has CORS headers.
    for path in ["/healthz", "/v1/session"] {
        let r = http.get(format!("{url}{path}")).header("origin", "http://127.0.0.1:1").send().await.unwrap();
        assert!(r.headers().get("access-control-allow-origin").is_none(), "{path}");
    }
    stop.cancel();
}
