//! The inbox HTTP API behind JWT auth, served for real on a local port over a seeded SQLite store:
//! token sources (the Bearer header only) and rejections (missing, expired, forged, wrong iss/aud,
//! alg none, a stream credential), per-user isolation, cursor paging, mark-read and the unread count,
//! mark-all-read up to what the client saw, archiving and the archived list.

use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tidings_core::Notification;
use tidings_gateway::auth::{self, AuthConfig, Key};
use tidings_gateway::{InboxState, Readiness};
use tidings_store::{Batch, Store, StoredNotification};

const SECRET: &[u8] = b"test-secret";
const ISSUER: &str = "tidings-test";
const AUDIENCE: &str = "inbox";

/// Test-only P-256 key pair (generated with openssl for this file; protects nothing).
const EC_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgePRCFVHX5lzo4dWh
WqJYRpJNa8BeH2a/aAILcC1/5SahRANCAAR/aurNHWVMqAAJs6gaaae8d90Ioa+f
L7bw4kwNmyUxZX6Cjn+0CCoZX/3c4T+qpGGqakqkXl4Dl/2QBiGbLdFT
-----END PRIVATE KEY-----
";
const EC_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEf2rqzR1lTKgACbOoGmmnvHfdCKGv
ny+28OJMDZslMWV+go5/tAgqGV/93OE/qqRhqmpKpF5eA5f9kAYhmy3RUw==
-----END PUBLIC KEY-----
";
/// Another test-only P-256 private key, not configured on the server.
const EC_OTHER_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgo8l+zonNiidOuXfZ
/RNuenQNNT0WVTqIvW/ikgyAQqShRANCAASE9BPx1Ucy0l7lFkdHnx6cqMlO2CfC
nWgCNO/1j1S3pvGBzfJWRGaX5COMBg6sNLYdxISmEzC8lVA2XW5ddi2M
-----END PRIVATE KEY-----
";

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "iat": now(), "exp": now() + 600, "iss": ISSUER, "aud": AUDIENCE})
}

fn hs(claims: &Value, secret: &[u8]) -> String {
    let h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    jsonwebtoken::encode(&h, claims, &jsonwebtoken::EncodingKey::from_secret(secret)).unwrap()
}

fn es(claims: &Value, private_pem: &str) -> String {
    let h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    jsonwebtoken::encode(&h, claims, &jsonwebtoken::EncodingKey::from_ec_pem(private_pem.as_bytes()).unwrap()).unwrap()
}

fn token(sub: &str) -> String {
    hs(&claims(sub), SECRET)
}

fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// One seeded notification: (user, stream partition, stream offset).
fn notif(user: &str, partition: i32, offset: i64) -> StoredNotification {
    let source_event_id = format!("evt-{partition}-{offset}");
    StoredNotification {
        notification: Notification {
            notification_id: Notification::id_for(&source_event_id, user),
            user_id: user.to_string(),
            kind: "order_shipped".into(),
            title: format!("Title {partition}.{offset}"),
            body: format!("Body for {user}"),
            link: (offset % 2 == 0).then(|| format!("https://example.test/{offset}")),
            source_event_id,
            occurred_at: 1_700_000_000_000_000 + offset,
            source_topic: "orders".into(),
            source_partition: 0,
            source_offset: offset,
            data: None,
            inbox: true,
            category: String::new(),
            recipients: vec![],
        },
        stream_partition: partition,
        stream_offset: offset,
    }
}

struct Server {
    base: String,
    http: reqwest::Client,
    alice: Vec<StoredNotification>,
    bob: Vec<StoredNotification>,
    store: Store,
    _dir: tempfile::TempDir,
}

async fn start() -> Server {
    let (store, dir) = tidings_store::testing::fresh_sqlite().await.unwrap();
    // Interleaved positions on two partitions, so pages cross partitions and bob's rows sit
    // between alice's.
    let alice: Vec<_> = [(0, 1), (0, 4), (0, 7), (1, 2), (1, 5), (1, 8), (1, 9)]
        .into_iter()
        .map(|(p, o)| notif("alice", p, o))
        .collect();
    let bob: Vec<_> = [(0, 3), (1, 6), (2, 1)].into_iter().map(|(p, o)| notif("bob", p, o)).collect();
    seed(&store, alice.iter().chain(&bob).cloned().collect()).await;
    let auth = AuthConfig {
        issuer: Some(ISSUER.into()),
        audience: Some(AUDIENCE.into()),
        keys: vec![Key::hs256(SECRET), Key::from_public_pem(EC_PUBLIC.as_bytes()).unwrap()],
    };
    let app = tidings_gateway::app(
        tidings_gateway::Parts {
            inbox: Some(InboxState { store: store.clone(), auth: Arc::new(auth) }),
            ..Default::default()
        },
        Readiness::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Server { base, http: reqwest::Client::new(), alice, bob, store, _dir: dir }
}

/// The server's keys, for minting what its `POST /v1/session` would.
fn stream_config() -> AuthConfig {
    AuthConfig { keys: vec![Key::hs256(SECRET)], ..Default::default() }
}

async fn seed(store: &Store, notifications: Vec<StoredNotification>) {
    let batch = Batch { notifications, ..Default::default() };
    assert_eq!(store.write_batch("test", &batch).await.unwrap().notifications_inserted, 10);
}

impl Server {
    async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value, Option<String>) {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        respond(req).await
    }

    async fn mark(&self, id: &str, token: &str) -> u16 {
        let url = format!("{}/v1/notifications/{id}/read", self.base);
        self.http.post(url).bearer_auth(token).send().await.unwrap().status().as_u16()
    }

    /// `POST path` with an optional token and JSON body: (status, body).
    async fn post(&self, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.post(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let (status, body, _) = respond(req).await;
        (status, body)
    }

    /// Ids of every item of `user`'s inbox (`archived` false) or archive, paged at `limit`.
    async fn listed(&self, user: &str, archived: bool, limit: u32) -> Vec<String> {
        let (mut ids, mut cursor, mut pages) = (Vec::new(), String::new(), 0);
        loop {
            let path = format!("/v1/notifications?archived={archived}&limit={limit}&cursor={cursor}");
            let (status, body, _) = self.get(&path, Some(&token(user))).await;
            assert_eq!(status, 200, "{body}");
            pages += 1;
            let page = body["items"].as_array().unwrap();
            assert!(page.len() <= limit as usize);
            for item in page {
                assert_eq!(item["archived"], archived, "{item}");
                ids.push(item["id"].as_str().unwrap().to_string());
            }
            match body["next_cursor"].as_str() {
                Some(c) => cursor = c.to_string(),
                None => return ids,
            }
            assert!(pages < 50, "paging does not end");
        }
    }

    async fn unread(&self, user: &str) -> u64 {
        let (status, body, _) = self.get("/v1/notifications/unread_count", Some(&token(user))).await;
        assert_eq!(status, 200, "{body}");
        body["unread"].as_u64().unwrap()
    }

    /// Every page of `user`'s inbox at `limit`, as (ids in order, page count).
    async fn all_pages(&self, user: &str, limit: u32) -> (Vec<Value>, usize) {
        let (mut items, mut pages, mut cursor) = (Vec::new(), 0, None::<String>);
        loop {
            let path = match &cursor {
                Some(c) => format!("/v1/notifications?limit={limit}&cursor={c}"),
                None => format!("/v1/notifications?limit={limit}"),
            };
            let (status, body, _) = self.get(&path, Some(&token(user))).await;
            assert_eq!(status, 200, "{body}");
            pages += 1;
            let page = body["items"].as_array().unwrap();
            assert!(page.len() <= limit as usize);
            items.extend(page.iter().cloned());
            match body["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return (items, pages),
            }
            assert!(pages < 50, "paging does not end");
        }
    }
}

async fn respond(req: reqwest::RequestBuilder) -> (u16, Value, Option<String>) {
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let www = resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_string());
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null), www)
}

fn ids(items: &[StoredNotification]) -> Vec<String> {
    items.iter().map(|n| n.notification.notification_id.to_string()).collect()
}

fn assert_401(resp: (u16, Value, Option<String>), code: &str) {
    let (status, body, www) = resp;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(www.as_deref().is_some_and(|w| w.starts_with("Bearer")), "{www:?}");
}

#[tokio::test]
async fn rejects_missing_expired_and_forged_tokens() {
    let s = start().await;
    let list = "/v1/notifications";
    assert_401(s.get(list, None).await, "missing_token");
    assert_401(s.get("/v1/notifications/unread_count", None).await, "missing_token");
    let url = format!("{}/v1/notifications/{}/read", s.base, s.alice[0].notification.notification_id);
    assert_401(respond(s.http.post(url)).await, "missing_token");

    let mut expired = claims("alice");
    expired["exp"] = json!(now() - 120);
    assert_401(s.get(list, Some(&hs(&expired, SECRET))).await, "token_expired");
    // Within the 30 s leeway a just-expired token still passes.
    let mut skewed = claims("alice");
    skewed["exp"] = json!(now() - 5);
    assert_eq!(s.get(list, Some(&hs(&skewed, SECRET))).await.0, 200);

    assert_401(s.get(list, Some(&hs(&claims("alice"), b"wrong-secret"))).await, "invalid_token");
    // An expired token with a bad signature is a forgery, not an expired session.
    assert_401(s.get(list, Some(&hs(&expired, b"wrong-secret"))).await, "invalid_token");

    let mut wrong_iss = claims("alice");
    wrong_iss["iss"] = json!("someone-else");
    assert_401(s.get(list, Some(&hs(&wrong_iss, SECRET))).await, "invalid_token");
    let mut wrong_aud = claims("alice");
    wrong_aud["aud"] = json!("billing");
    assert_401(s.get(list, Some(&hs(&wrong_aud, SECRET))).await, "invalid_token");
    for missing in ["exp", "iss", "aud", "sub"] {
        let mut c = claims("alice");
        c.as_object_mut().unwrap().remove(missing);
        assert_401(s.get(list, Some(&hs(&c, SECRET))).await, "invalid_token");
    }
    let mut early = claims("alice");
    early["nbf"] = json!(now() + 300);
    assert_401(s.get(list, Some(&hs(&early, SECRET))).await, "invalid_token");

    let payload = b64url(claims("alice").to_string().as_bytes());
    let none = format!("{}.{payload}.", b64url(br#"{"alg":"none","typ":"JWT"}"#));
    assert_401(s.get(list, Some(&none)).await, "invalid_token");
    // Bob's valid signature over a payload rewritten to say alice.
    let bobs = token("bob");
    let parts: Vec<&str> = bobs.split('.').collect();
    let tampered = format!("{}.{payload}.{}", parts[0], parts[2]);
    assert_401(s.get(list, Some(&tampered)).await, "invalid_token");
    // Algorithm confusion: HS256 keyed with the (public) EC key must not pass.
    assert_401(s.get(list, Some(&hs(&claims("alice"), EC_PUBLIC.as_bytes()))).await, "invalid_token");
    assert_401(s.get(list, Some(&es(&claims("alice"), EC_OTHER_PRIVATE))).await, "invalid_token");
    assert_401(s.get(list, Some("not.a.jwt")).await, "invalid_token");
}

#[tokio::test]
async fn accepts_es256_but_no_query_token_no_cookie_and_no_stream_credential() {
    let s = start().await;
    let (status, body, _) = s.get("/v1/notifications?limit=100", Some(&es(&claims("alice"), EC_PRIVATE))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["items"].as_array().unwrap().len(), s.alice.len());

    // A token in the query opens streams only (URLs end up in logs), whatever the name's encoding.
    for path in ["/v1/notifications/unread_count?", "/v1/notifications?limit=100&"] {
        for name in ["access_token", "access%5Ftoken"] {
            let url = format!("{}{path}{name}={}", s.base, token("bob"));
            assert_401(respond(s.http.get(url)).await, "missing_token");
        }
    }

    // The stream cookie opens streams only: no inbox read, and above all no mark-read (a request
    // another site can make the browser send with the cookie attached). Neither does the user
    // token in the cookie earlier versions set.
    let credential = stream_config().mint_stream("bob", now() as u64 + 600).unwrap();
    let url = format!("{}/v1/notifications?limit=100", s.base);
    let read = format!("{}/v1/notifications/{}/read", s.base, s.bob[0].notification.notification_id);
    for cookie in
        [format!("theme=dark; tidings_stream={credential}"), format!("theme=dark; tidings_session={}", token("bob"))]
    {
        assert_401(respond(s.http.get(&url).header("cookie", &cookie)).await, "missing_token");
        assert_401(respond(s.http.post(&read).header("cookie", &cookie)).await, "missing_token");
    }
    // Nor is the stream credential a bearer token.
    assert_401(s.get("/v1/notifications", Some(&credential)).await, "invalid_token");
    assert_eq!(s.mark(&s.bob[0].notification.notification_id.to_string(), &credential).await, 401);
    assert_eq!(s.unread("bob").await, s.bob.len() as u64, "nothing was marked read");

    // `tidings token` mints what the gateway accepts.
    let minted = auth::mint_hs256(SECRET, "alice", Duration::from_secs(60), Some(ISSUER), Some(AUDIENCE)).unwrap();
    assert_eq!(s.get("/v1/notifications", Some(&minted)).await.0, 200);
    let no_aud = auth::mint_hs256(SECRET, "alice", Duration::from_secs(60), Some(ISSUER), None).unwrap();
    assert_401(s.get("/v1/notifications", Some(&no_aud)).await, "invalid_token");
}

#[tokio::test]
async fn pages_only_own_items_newest_first_exactly_once() {
    let s = start().await;
    let mut expected = s.alice.clone();
    expected.sort_by_key(|n| std::cmp::Reverse((n.stream_partition, n.stream_offset)));
    for limit in [1, 3, 7, 100] {
        let (items, pages) = s.all_pages("alice", limit).await;
        let got: Vec<String> = items.iter().map(|i| i["id"].as_str().unwrap().to_string()).collect();
        assert_eq!(got, ids(&expected), "limit {limit}");
        assert_eq!(pages, expected.len().div_ceil(limit as usize).max(1), "limit {limit}");
    }
    let (status, body, _) = s.get("/v1/notifications?limit=1", Some(&token("alice"))).await;
    assert_eq!(status, 200);
    let first = &body["items"][0];
    let newest = &expected[0].notification;
    assert_eq!(first["id"], newest.notification_id.to_string());
    assert_eq!(first["kind"], "order_shipped");
    assert_eq!(first["title"], newest.title);
    assert_eq!(first["body"], "Body for alice");
    assert_eq!(first["link"], Value::Null);
    assert_eq!(first["read"], false);
    assert_eq!(first["source_event_id"], newest.source_event_id);
    assert_eq!(first["occurred_at"], "2023-11-14T22:13:20.000009Z");

    // A cursor past every row (or aimed at bob's positions) still yields only alice's rows.
    let bob_ids: HashSet<String> = ids(&s.bob).into_iter().collect();
    for cursor in ["9.999999", "2.1", "1.6", "0.3", "0.0"] {
        let (status, body, _) = s.get(&format!("/v1/notifications?cursor={cursor}"), Some(&token("alice"))).await;
        assert_eq!(status, 200, "{body}");
        for item in body["items"].as_array().unwrap() {
            assert!(!bob_ids.contains(item["id"].as_str().unwrap()), "bob's item leaked at cursor {cursor}");
        }
    }
    let (_, body, _) = s.get("/v1/notifications?cursor=9.999999", Some(&token("alice"))).await;
    assert_eq!(body["items"].as_array().unwrap().len(), 7);
    let (_, body, _) = s.get("/v1/notifications?cursor=0.0", Some(&token("alice"))).await;
    assert_eq!((body["items"].as_array().unwrap().len(), &body["next_cursor"]), (0, &Value::Null));

    // A user without rows sees an empty inbox.
    let (status, body, _) = s.get("/v1/notifications", Some(&token("carol"))).await;
    assert_eq!((status, body), (200, json!({"items": [], "next_cursor": null})));
}

#[tokio::test]
async fn bad_cursor_limit_and_id_are_422() {
    let s = start().await;
    let t = token("alice");
    for q in ["cursor=abc", "cursor=1", "cursor=1.x", "cursor=-1.5", "limit=0", "limit=101", "limit=ten", "limit=-1"] {
        let (status, body, _) = s.get(&format!("/v1/notifications?{q}"), Some(&t)).await;
        assert_eq!(status, 422, "{q}: {body}");
        let code = body["error"]["code"].as_str().unwrap();
        assert!(code == "invalid_cursor" || code == "invalid_limit", "{q}: {body}");
    }
    assert_eq!(s.get("/v1/notifications?limit=100", Some(&t)).await.0, 200);
    assert_eq!(s.mark("not-a-uuid", &t).await, 422);
}

#[tokio::test]
async fn mark_read_is_scoped_to_the_owner() {
    let s = start().await;
    let (alice, bob) = (token("alice"), token("bob"));
    assert_eq!(s.unread("alice").await, 7);
    assert_eq!(s.unread("bob").await, 3);

    let bobs = s.bob[0].notification.notification_id.to_string();
    assert_eq!(s.mark(&bobs, &alice).await, 404);
    assert_eq!(s.unread("bob").await, 3);
    let (_, body, _) = s.get("/v1/notifications?limit=100", Some(&bob)).await;
    let item = body["items"].as_array().unwrap().iter().find(|i| i["id"] == bobs.as_str()).unwrap().clone();
    assert_eq!(item["read"], false);

    assert_eq!(s.mark(&uuid_of_nothing(), &alice).await, 404);

    let own = s.alice[2].notification.notification_id.to_string();
    assert_eq!(s.mark(&own, &alice).await, 204);
    assert_eq!(s.unread("alice").await, 6);
    assert_eq!(s.mark(&own, &alice).await, 204, "marking again is idempotent");
    assert_eq!(s.unread("alice").await, 6);
    assert_eq!(s.unread("bob").await, 3);
    let (_, body, _) = s.get("/v1/notifications?limit=100", Some(&alice)).await;
    for item in body["items"].as_array().unwrap() {
        assert_eq!(item["read"], item["id"] == own.as_str(), "{item}");
    }

    assert_eq!(s.mark(&bobs, &bob).await, 204);
    assert_eq!(s.unread("bob").await, 2);
}

fn uuid_of_nothing() -> String {
    Notification::id_for("no-such-event", "alice").to_string()
}

#[tokio::test]
async fn unread_count_per_category_leaves_out_read_and_archived() {
    let s = start().await;
    let alice = token("alice");
    let (status, body, _) = s.get("/v1/notifications/unread_count", Some(&alice)).await;
    // The seeded rows predate categories: they count in `unread` only.
    assert_eq!((status, body), (200, json!({"unread": 7, "by_category": {}})));
    let categorized = |offset: i64, category: &str| {
        let mut n = notif("alice", 3, offset);
        n.notification.category = category.into();
        n
    };
    let new = vec![categorized(1, "orders"), categorized(2, "orders"), categorized(3, "marketing")];
    let batch = Batch { notifications: new.clone(), ..Default::default() };
    assert_eq!(s.store.write_batch("test", &batch).await.unwrap().notifications_inserted, 3);
    let id = |n: &StoredNotification| n.notification.notification_id.to_string();
    assert_eq!(s.mark(&id(&new[0]), &alice).await, 204);
    assert_eq!(s.post(&format!("/v1/notifications/{}/archive", id(&new[2])), Some(&alice), None).await.0, 204);
    let (status, body, _) = s.get("/v1/notifications/unread_count", Some(&alice)).await;
    assert_eq!((status, body), (200, json!({"unread": 8, "by_category": {"orders": 1}})));
    let (_, body, _) = s.get("/v1/notifications/unread_count", Some(&token("bob"))).await;
    assert_eq!(body, json!({"unread": 3, "by_category": {}}));
}

/// Alice's ids newest first (the inbox's order).
fn newest_first(items: &[StoredNotification]) -> Vec<String> {
    let mut sorted = items.to_vec();
    sorted.sort_by_key(|n| std::cmp::Reverse((n.stream_partition, n.stream_offset)));
    ids(&sorted)
}

#[tokio::test]
async fn read_all_and_archive_need_a_token_and_the_owner() {
    let s = start().await;
    let bobs = s.bob[0].notification.notification_id.to_string();
    let own = s.alice[0].notification.notification_id.to_string();
    let (status, body) = s.post("/v1/notifications/read_all", None, Some(json!({"up_to": own}))).await;
    assert_eq!((status, &body["error"]["code"]), (401, &json!("missing_token")), "{body}");
    for action in ["archive", "unarchive"] {
        let (status, body) = s.post(&format!("/v1/notifications/{own}/{action}"), None, None).await;
        assert_eq!((status, &body["error"]["code"]), (401, &json!("missing_token")), "{action}: {body}");
    }
    assert_401(s.get("/v1/notifications?archived=true", None).await, "missing_token");

    // Another user's id answers like a missing one, and changes nothing of theirs.
    let alice = token("alice");
    let (status, body) = s.post("/v1/notifications/read_all", Some(&alice), Some(json!({"up_to": bobs}))).await;
    assert_eq!((status, &body["error"]["code"]), (404, &json!("not_found")), "{body}");
    for action in ["archive", "unarchive"] {
        let (status, body) = s.post(&format!("/v1/notifications/{bobs}/{action}"), Some(&alice), None).await;
        assert_eq!((status, &body["error"]["code"]), (404, &json!("not_found")), "{action}: {body}");
        let missing = uuid_of_nothing();
        assert_eq!(s.post(&format!("/v1/notifications/{missing}/{action}"), Some(&alice), None).await.0, 404);
    }
    assert_eq!(s.unread("bob").await, 3);
    assert_eq!(s.unread("alice").await, 7);
    assert_eq!(s.listed("bob", false, 100).await.len(), 3);
    assert!(s.listed("bob", true, 100).await.is_empty());

    // Bad ids, bodies and flags are 422 and change nothing.
    for body in [json!({}), json!({"up_to": "nope"}), json!({"up_to": own, "extra": 1}), json!([own])] {
        let (status, answer) = s.post("/v1/notifications/read_all", Some(&alice), Some(body.clone())).await;
        assert_eq!(status, 422, "{body}: {answer}");
    }
    assert_eq!(s.post("/v1/notifications/not-a-uuid/archive", Some(&alice), None).await.0, 422);
    assert_eq!(s.post("/v1/notifications/not-a-uuid/unarchive", Some(&alice), None).await.0, 422);
    let (status, body, _) = s.get("/v1/notifications?archived=yes", Some(&alice)).await;
    assert_eq!((status, &body["error"]["code"]), (422, &json!("invalid_archived")), "{body}");
    assert_eq!(s.unread("alice").await, 7);
}

#[tokio::test]
async fn read_all_leaves_a_notification_that_arrived_after_the_page_unread() {
    let s = start().await;
    let alice = token("alice");
    // The page the client shows; then a new notification lands before the click.
    let (_, page, _) = s.get("/v1/notifications?limit=100", Some(&alice)).await;
    let newest_shown = page["items"][0]["id"].as_str().unwrap().to_string();
    let late = notif("alice", 1, 20);
    let batch = Batch { notifications: vec![late.clone()], ..Default::default() };
    assert_eq!(s.store.write_batch("test", &batch).await.unwrap().notifications_inserted, 1);
    assert_eq!(s.unread("alice").await, 8);

    let (status, body) = s.post("/v1/notifications/read_all", Some(&alice), Some(json!({"up_to": newest_shown}))).await;
    assert_eq!((status, body), (200, json!({"marked": 7})));
    assert_eq!(s.unread("alice").await, 1);
    let (_, page, _) = s.get("/v1/notifications?limit=100", Some(&alice)).await;
    for item in page["items"].as_array().unwrap() {
        let is_late = item["id"] == late.notification.notification_id.to_string().as_str();
        assert_eq!(item["read"], !is_late, "{item}");
    }
    assert_eq!(s.unread("bob").await, 3, "bob's notifications are untouched");

    // Again: nothing left to mark up to that point.
    let (status, body) = s.post("/v1/notifications/read_all", Some(&alice), Some(json!({"up_to": newest_shown}))).await;
    assert_eq!((status, body), (200, json!({"marked": 0})));
}

#[tokio::test]
async fn archive_round_trip_and_archived_pages() {
    let s = start().await;
    let alice = token("alice");
    let order = newest_first(&s.alice);
    // Archive every other one, newest first: 4 archived, 3 left.
    let archived: Vec<String> = order.iter().step_by(2).cloned().collect();
    let kept: Vec<String> = order.iter().skip(1).step_by(2).cloned().collect();
    for id in &archived {
        assert_eq!(s.post(&format!("/v1/notifications/{id}/archive"), Some(&alice), None).await.0, 204);
    }
    assert_eq!(s.post(&format!("/v1/notifications/{}/archive", archived[0]), Some(&alice), None).await.0, 204);
    assert_eq!(s.unread("alice").await, 3, "archived ones are not counted");
    for limit in [1, 3, 100] {
        assert_eq!(s.listed("alice", true, limit).await, archived, "archive at limit {limit}");
        assert_eq!(s.listed("alice", false, limit).await, kept, "inbox at limit {limit}");
    }
    // The default list is the inbox.
    let (_, body, _) = s.get("/v1/notifications?limit=100", Some(&alice)).await;
    let listed: Vec<&str> = body["items"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert_eq!(listed, kept);

    // Mark-all-read up to the newest of the inbox leaves the archived ones unread.
    let (status, body) = s.post("/v1/notifications/read_all", Some(&alice), Some(json!({"up_to": kept[0]}))).await;
    assert_eq!((status, body), (200, json!({"marked": 3})));
    assert_eq!(s.unread("alice").await, 0);

    // Back into the inbox, in its place, still unread.
    let back = &archived[1];
    assert_eq!(s.post(&format!("/v1/notifications/{back}/unarchive"), Some(&alice), None).await.0, 204);
    assert_eq!(s.post(&format!("/v1/notifications/{back}/unarchive"), Some(&alice), None).await.0, 204);
    assert_eq!(s.unread("alice").await, 1);
    let mut inbox = kept.clone();
    inbox.push(back.clone());
    inbox.sort_by_key(|id| order.iter().position(|o| o == id));
    assert_eq!(s.listed("alice", false, 2).await, inbox);
    let rest: Vec<String> = archived.iter().filter(|id| *id != back).cloned().collect();
    assert_eq!(s.listed("alice", true, 2).await, rest);
    assert!(s.listed("bob", true, 100).await.is_empty());
}
