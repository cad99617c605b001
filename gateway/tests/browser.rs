//! What a browser's plain EventSource gets from `GET /v1/stream` on a real local port (hub fed
//! directly, no broker): transient states as a 200 `retry:` stream that ends (503 for others), the
//! stream cookie from `POST /v1/session` (a stream-only credential: refused everywhere else, taken
//! by every gateway with the same keys), and CORS only for allowed origins.

use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tidings_gateway::auth::{AuthConfig, Key};
use tidings_gateway::browser::BrowserAccess;
use tidings_gateway::delivery::owners::RedirectAllow;
use tidings_gateway::delivery::{Hub, HubConfig, Owners};
use tidings_gateway::{InboxState, Limits, Parts, Readiness, StreamState};
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
    let (url, stop, _) = start_with(partitions, browser, SECRET, false).await;
    (url, stop)
}

/// Like [`start`], with user tokens signed with `secret`, and with the inbox (an empty store) when
/// `inbox`.
async fn start_with(
    partitions: i32,
    browser: BrowserAccess,
    secret: &[u8],
    inbox: bool,
) -> (String, CancellationToken, Option<tempfile::TempDir>) {
    let listener = tidings_gateway::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hub = Hub::new(HubConfig::default(), None);
    hub.set_partition_count(partitions);
    for p in 0..partitions {
        hub.assign(p, 0, 0);
    }
    let owners = Owners::new(&url, "notifications");
    let auth = Arc::new(AuthConfig { keys: vec![Key::hs256(secret)], ..Default::default() });
    let (inbox, dir) = match inbox {
        true => {
            let (store, dir) = tidings_store::testing::fresh_sqlite().await.unwrap();
            (Some(InboxState { store, auth: auth.clone() }), Some(dir))
        }
        false => (None, None),
    };
    let state = StreamState { hub, owners, auth, browser: Arc::new(browser) };
    let app =
        tidings_gateway::app(Parts { stream: Some(state.clone()), inbox, ..Default::default() }, Readiness::default());
    let stop = CancellationToken::new();
    tokio::spawn(tidings_gateway::serve_gateway(listener, app, Some(state), Limits::default(), stop.clone()));
    (url, stop, dir)
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

/// The `tidings_stream` cookie's value and Max-Age from `POST /v1/session`'s answer, checking its
/// attributes and that the cookie of earlier versions is dropped with it.
fn stream_cookie(r: &reqwest::Response) -> (String, u64) {
    let cookies: Vec<&str> = r.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap()).collect();
    assert_eq!(cookies.len(), 2, "{cookies:?}");
    assert_eq!(cookies[1], "tidings_session=; HttpOnly; SameSite=Strict; Path=/v1; Max-Age=0");
    let (value, attrs) = cookies[0].strip_prefix("tidings_stream=").unwrap().split_once("; ").unwrap();
    let max_age = attrs.strip_prefix("HttpOnly; SameSite=Strict; Path=/v1/stream; Max-Age=").unwrap();
    (value.to_string(), max_age.parse().unwrap())
}

#[tokio::test]
async fn the_stream_cookie_comes_from_a_bearer_token_and_opens_streams_only() {
    let (url, stop, _dir) = start_with(4, BrowserAccess::default(), SECRET, true).await;
    let http = client();
    let session = format!("{url}/v1/session");
    let stream = format!("{url}/v1/stream");
    let bearer = token("alice", 600);

    // Only a valid token in the Authorization header sets it: not a query token, not a cookie.
    assert_eq!(http.post(&session).send().await.unwrap().status(), 401);
    assert_eq!(http.post(format!("{session}?access_token={bearer}")).send().await.unwrap().status(), 401);
    for name in ["tidings_session", "tidings_stream"] {
        let r = http.post(&session).header("cookie", format!("{name}={bearer}")).send().await.unwrap();
        assert_eq!(r.status(), 401, "{name}");
    }
    assert_eq!(http.post(&session).bearer_auth(token("alice", 0).replace('.', "")).send().await.unwrap().status(), 401);

    let r = http.post(&session).bearer_auth(&bearer).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let (credential, max_age) = stream_cookie(&r);
    assert!((590..=600).contains(&max_age), "Max-Age {max_age}: the token's remaining life, under the default 900 s");
    assert_ne!(credential, bearer, "the cookie holds a credential of its own, not the bearer token");
    // Also a session from the credential is refused: it is no user token.
    assert_eq!(http.post(&session).bearer_auth(&credential).send().await.unwrap().status(), 401);

    // The cookie opens the user's stream (direct path) ...
    let r = http.get(&stream).header("cookie", format!("tidings_stream={credential}")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    drop(r);
    // ... and nothing else: not as a bearer token or query token, not on the inbox; nor does the
    // user token in a cookie (what earlier versions set) open anything.
    let refused = [
        http.get(&stream).bearer_auth(&credential),
        http.get(format!("{stream}?access_token={credential}")),
        http.get(&stream).header("cookie", format!("tidings_stream={bearer}")),
        http.get(&stream).header("cookie", format!("tidings_session={bearer}")),
        http.get(format!("{url}/v1/notifications")).header("cookie", format!("tidings_stream={credential}")),
        http.get(format!("{url}/v1/notifications")).bearer_auth(&credential),
        http.get(format!("{url}/v1/notifications/unread_count")).bearer_auth(&credential),
        http.post(format!("{url}/v1/notifications/{}/read", uuid_nil()))
            .header("cookie", format!("tidings_stream={credential}")),
        http.post(format!("{url}/v1/notifications/{}/read", uuid_nil())).bearer_auth(&credential),
        // A user token in the query opens streams only.
        http.get(format!("{url}/v1/notifications?access_token={bearer}")),
        http.get(format!("{url}/v1/notifications/unread_count?access%5Ftoken={bearer}")),
    ];
    for req in refused {
        let req = req.build().unwrap();
        let what = format!("{} {} {:?}", req.method(), req.url(), req.headers());
        let r = http.execute(req).await.unwrap();
        assert_eq!(r.status(), 401, "{what}");
        assert!(r.headers()["www-authenticate"].to_str().unwrap().starts_with("Bearer"), "{what}");
    }
    // (The inbox itself answers the bearer token.)
    assert_eq!(http.get(format!("{url}/v1/notifications")).bearer_auth(&bearer).send().await.unwrap().status(), 200);
    let r = http.get(format!("{stream}?access_token={bearer}")).send().await.unwrap();
    assert_eq!(r.status(), 200, "the stream takes a user token in the query");
    drop(r);

    // Every gateway with the same secret takes it (a browser redirected to its user's owner), one
    // with another secret does not.
    let (peer, peer_stop, _) = start_with(4, BrowserAccess::default(), SECRET, false).await;
    let r = http.get(format!("{peer}/v1/stream")).header("cookie", format!("tidings_stream={credential}")).send();
    assert_eq!(r.await.unwrap().status(), 200);
    let (other, other_stop, _) = start_with(4, BrowserAccess::default(), b"another-secret", false).await;
    let r = http.get(format!("{other}/v1/stream")).header("cookie", format!("tidings_stream={credential}")).send();
    assert_eq!(r.await.unwrap().status(), 401);

    // Clearing it is open to anyone, and drops both cookies.
    let r = http.delete(&session).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(stream_cookie(&r), (String::new(), 0));

    // Its life is at most --stream-session-secs, and an expired one opens nothing.
    let short = BrowserAccess {
        cookie_secure: true,
        cookie_domain: Some("gw.example.com".into()),
        session_ttl: Duration::from_secs(1),
        ..Default::default()
    };
    let (secure_url, secure_stop, _) = start_with(4, short, SECRET, false).await;
    let r = http.post(format!("{secure_url}/v1/session")).bearer_auth(&bearer).send().await.unwrap();
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.ends_with("; Path=/v1/stream; Max-Age=1; Domain=gw.example.com; Secure"), "{cookie}");
    let short_lived = cookie.strip_prefix("tidings_stream=").unwrap().split_once(';').unwrap().0.to_string();
    let claims = short_lived.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(&b64url_decode(claims)).unwrap();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let exp = claims["exp"].as_u64().unwrap();
    assert!(exp <= now + 1 && exp + 5 >= now, "exp {exp}, now {now}");
    assert_eq!((claims["sub"].as_str(), claims["aud"].as_str()), (Some("alice"), Some("tidings-stream")));
    stop.cancel();
    peer_stop.cancel();
    other_stop.cancel();
    secure_stop.cancel();
}

fn uuid_nil() -> &'static str {
    "00000000-0000-0000-0000-000000000000"
}

fn b64url_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'-' => 62,
        _ => 63,
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        acc = (acc << 6) | u32::from(val(c));
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
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
