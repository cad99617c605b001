//! The chat API on a real broker and PostgreSQL, through one `tidings up`: a tagged group room is
//! created, found, joined and talked in; members (the sender's own stream included) get each
//! message on their stream once, a non-member gets 403 and none of the room's events; sizes, bad
//! input and the send rate get 413/422/429 in the error shape; a direct inquiry is one room per
//! (product, buyer); unread counts follow reads; history is newest first and carries a position;
//! edits and deletes are the sender's own. Every change spends from a per-user write budget, new
//! inquiries and history reads have their own (429 beyond), and the room list pages with a cursor.

mod common;

use common::{eventually, Tidings, Up};
use serde_json::{json, Value};
use std::time::Duration;

use common::{user_token as token, Seen};

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    async fn call(
        &self,
        method: &str,
        user: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let url = format!("{}{path}", self.base);
        let mut req = match method {
            "GET" => self.http.get(url),
            "POST" => self.http.post(url),
            "PATCH" => self.http.patch(url),
            "DELETE" => self.http.delete(url),
            m => panic!("method {m}"),
        }
        .bearer_auth(token(user));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
        (status, resp.json().await.unwrap_or(Value::Null), headers)
    }

    async fn ok(&self, method: &str, user: &str, path: &str, body: Option<Value>, want: u16) -> Value {
        let (status, body, _) = self.call(method, user, path, body).await;
        assert_eq!(status, want, "{method} {path} as {user}: {body}");
        body
    }
}

async fn open_stream(api: &Api, user: &str) -> Seen {
    common::open_stream(&api.http, &api.base, user, None).await
}

async fn open_stream_from(api: &Api, user: &str, last_event_id: Option<&str>) -> Seen {
    common::open_stream(&api.http, &api.base, user, last_event_id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_messages_and_their_rules() {
    let Some(brokers) = common::brokers_or_skip() else { return };
    let (_pool, db_url) = common::fresh_pg().await;
    let prefix = common::unique_prefix();
    let up = Tidings::spawn_env(
        "chat",
        &Up::all(&brokers, &db_url, &prefix),
        &[
            ("TIDINGS_CHAT_RATE", "1"),
            ("TIDINGS_CHAT_BURST", "4"),
            ("TIDINGS_CHAT_MAX_TEXT_BYTES", "1000"),
            // This test polls history and changes rooms often; the budgets have their own test.
            ("TIDINGS_CHAT_HISTORY_RATE", "1000"),
            ("TIDINGS_CHAT_HISTORY_BURST", "1000"),
            ("TIDINGS_CHAT_WRITE_BURST", "1000"),
        ],
    );
    let mut up = up;
    let ep = up.endpoints(Duration::from_secs(60)).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().unwrap();
    let api = Api { http, base: ep.http.clone() };
    common::await_ready(&api.http, &api.base, &[&up]).await;

    // A group room with tags, found by them (all of them), and by nothing else.
    let room = api
        .ok(
            "POST",
            "alice",
            "/v1/rooms",
            Some(json!({"kind": "group", "name": "Tea lovers", "tags": ["Tea", "green"]})),
            201,
        )
        .await;
    let id = room["room_id"].as_str().unwrap().to_string();
    assert_eq!(room["tags"], json!(["green", "tea"]));
    assert_eq!(room["members"], 1);
    let found = api.ok("GET", "bob", "/v1/rooms/search?tag=tea&tag=green", None, 200).await;
    assert_eq!(
        found["rooms"].as_array().unwrap().iter().map(|r| r["room_id"].clone()).collect::<Vec<_>>(),
        vec![json!(id)]
    );
    let none = api.ok("GET", "bob", "/v1/rooms/search?tag=tea&tag=coffee", None, 200).await;
    assert!(none["rooms"].as_array().unwrap().is_empty(), "{none}");
    let bad = api.ok("POST", "alice", "/v1/rooms", Some(json!({"kind": "group", "name": "", "tags": []})), 422).await;
    assert_eq!(bad["error"]["code"], "invalid_room");
    let bad =
        api.ok("POST", "alice", "/v1/rooms", Some(json!({"kind": "group", "name": "x", "colour": "red"})), 422).await;
    assert_eq!(bad["error"]["code"], "invalid_body", "unknown fields are refused: {bad}");

    // Not a member yet: no posting, no history.
    let msgs = format!("/v1/rooms/{id}/messages");
    let e = api.ok("POST", "bob", &msgs, Some(json!({"text": "let me in"})), 403).await;
    assert_eq!(e["error"]["code"], "not_a_member");
    api.ok("GET", "bob", &msgs, None, 403).await;

    let alice = open_stream(&api, "alice").await;
    let carol = open_stream(&api, "carol").await;
    let joined = api.ok("POST", "bob", &format!("/v1/rooms/{id}/members"), None, 200).await;
    assert_eq!(joined["members"], 2);
    let bob = open_stream(&api, "bob").await;

    let sent = api.ok("POST", "bob", &msgs, Some(json!({"text": "hi alice"})), 201).await;
    let seq = sent["seq"].as_i64().unwrap();
    let m1 = sent["message_id"].as_str().unwrap().to_string();
    // Both members get it on their stream, the sender too (their other tabs), exactly once.
    for (who, seen) in [("alice", &alice), ("bob", &bob)] {
        eventually(
            &format!("{who} gets bob's message"),
            Duration::from_secs(20),
            Duration::from_millis(50),
            &[&up],
            || async {
                let got: Vec<Value> =
                    seen.chat().into_iter().filter(|(e, _)| e == "chat.message").map(|(_, d)| d).collect();
                match got.as_slice() {
                    [d] if d["event"]["payload"]["text"] == "hi alice"
                        && d["seq"] == seq
                        && d["event"]["room_id"] == json!(id) =>
                    {
                        Ok(())
                    }
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
    }

    // Bad input in the error shape.
    let e = api.ok("POST", "alice", &msgs, Some(json!({"text": "   "})), 422).await;
    assert_eq!(e["error"]["code"], "empty_message");
    let e = api.ok("POST", "alice", &msgs, Some(json!({"text": "x".repeat(1001)})), 413).await;
    assert_eq!(e["error"]["code"], "message_too_long");
    let e = api.ok("POST", "alice", &msgs, Some(json!({"text": "y".repeat(70_000)})), 413).await;
    assert_eq!(e["error"]["code"], "body_too_large");

    // Unread: alice has bob's one message unread; reading up to it clears it.
    let unread_of = |user: &'static str| {
        let api = &api;
        let id = id.clone();
        async move {
            let mine = api.ok("GET", user, "/v1/rooms", None, 200).await;
            let r = mine["rooms"].as_array().unwrap().iter().find(|r| r["room_id"] == json!(id)).cloned().unwrap();
            r["unread"].as_u64().unwrap()
        }
    };
    eventually("alice has 1 unread", Duration::from_secs(20), Duration::from_millis(100), &[&up], || async {
        match unread_of("alice").await {
            1 => Ok(()),
            n => Err(format!("{n} unread")),
        }
    })
    .await;
    assert_eq!(unread_of("bob").await, 0, "one's own messages are not unread");
    let read = api.ok("POST", "alice", &format!("/v1/rooms/{id}/read"), Some(json!({"seq": seq})), 200).await;
    assert_eq!((read["read_seq"].as_i64(), read["unread"].as_u64()), (Some(seq), Some(0)));
    assert_eq!(unread_of("alice").await, 0);

    // The rate limit: a burst of 4, then 429 with Retry-After.
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for i in 0..6 {
        let (status, _, headers) = api.call("POST", "alice", &msgs, Some(json!({"text": format!("burst {i}")}))).await;
        statuses.push(status);
        if status == 429 {
            retry_after = headers.get("retry-after").map(|v| v.to_str().unwrap().to_string());
        }
    }
    assert_eq!(&statuses[..4], &[201; 4], "a burst of 4 passes: {statuses:?}");
    assert!(statuses.contains(&429) && retry_after.is_some(), "{statuses:?} {retry_after:?}");

    // History: newest first, every message of the room, with the stream position it is consistent with.
    let page = api.ok("GET", "bob", &format!("{msgs}?limit=10"), None, 200).await;
    let texts: Vec<&str> = page["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, vec!["burst 3", "burst 2", "burst 1", "burst 0", "hi alice"]);
    assert!(page["position"].as_str().unwrap().contains('.'), "{page}");
    let older = api.ok("GET", "bob", &format!("{msgs}?limit=2&before={}", page["messages"][2]["seq"]), None, 200).await;
    let texts: Vec<&str> = older["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, vec!["burst 0", "hi alice"]);

    // Edits and deletes: the sender's own, seen by the members, applied to history.
    let e = api.ok("PATCH", "alice", &format!("{msgs}/{m1}"), Some(json!({"text": "not mine"})), 403).await;
    assert_eq!(e["error"]["code"], "not_the_sender");
    api.ok("PATCH", "bob", &format!("{msgs}/{m1}"), Some(json!({"text": "hi alice!"})), 200).await;
    eventually(
        "the edit reaches alice and history",
        Duration::from_secs(20),
        Duration::from_millis(100),
        &[&up],
        || async {
            let edited = alice
                .chat()
                .iter()
                .any(|(e, d)| e == "chat.message_edited" && d["event"]["payload"]["text"] == "hi alice!");
            let page = api.ok("GET", "alice", &msgs, None, 200).await;
            let last = page["messages"].as_array().unwrap().last().cloned().unwrap_or(Value::Null);
            if edited && last["text"] == "hi alice!" && last["edited"] == true {
                Ok(())
            } else {
                Err(format!("edited on stream: {edited}; oldest in history: {last}"))
            }
        },
    )
    .await;

    // Membership changes take effect for the next message: dave joins and gets it, bob left and does not.
    let dave = open_stream(&api, "dave").await;
    api.ok("POST", "dave", &format!("/v1/rooms/{id}/members"), None, 200).await;
    api.ok("DELETE", "bob", &format!("/v1/rooms/{id}/members/me"), None, 204).await;
    api.ok("POST", "bob", &msgs, Some(json!({"text": "still here?"})), 403).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = api.ok("POST", "alice", &msgs, Some(json!({"text": "welcome dave"})), 201).await;
    let is_welcome = |(e, d): &(String, Value)| e == "chat.message" && d["seq"] == after["seq"];
    eventually(
        "dave gets the message after his join",
        Duration::from_secs(20),
        Duration::from_millis(50),
        &[&up],
        || async {
            if dave.chat().iter().any(is_welcome) {
                Ok(())
            } else {
                Err(format!("{:?}", dave.chat()))
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!bob.chat().iter().any(is_welcome), "bob got a message of a room he left");

    // A send retried with the same client_id (its answer was lost) is the same message, delivered once.
    let once = api.ok("POST", "dave", &msgs, Some(json!({"text": "hello all", "client_id": "c-1"})), 201).await;
    let again = api.ok("POST", "dave", &msgs, Some(json!({"text": "hello all", "client_id": "c-1"})), 201).await;
    assert_eq!(once["message_id"], again["message_id"]);
    let mid = once["message_id"].clone();
    let copies = || {
        alice.chat().iter().filter(|(e, d)| e == "chat.message" && d["event"]["payload"]["message_id"] == mid).count()
    };
    eventually("alice gets dave's message", Duration::from_secs(20), Duration::from_millis(50), &[&up], || async {
        if copies() > 0 {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(copies(), 1, "the retried send reached alice's stream twice");
    // Once the first is in the history, a later retry answers with its seq and produces nothing.
    let stored_seq =
        eventually("dave's message is stored", Duration::from_secs(20), Duration::from_millis(100), &[&up], || async {
            let (_, page, _) = api.call("GET", "dave", &msgs, None).await;
            page["messages"]
                .as_array()
                .and_then(|m| m.iter().find(|m| m["message_id"] == mid))
                .map(|m| m["seq"].clone())
                .ok_or_else(|| format!("{page}"))
        })
        .await;
    let third = api.ok("POST", "dave", &msgs, Some(json!({"text": "hello all", "client_id": "c-1"})), 201).await;
    assert_eq!((third["message_id"].clone(), third["seq"].clone()), (mid.clone(), stored_seq));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(copies(), 1, "a retry of a stored message was produced again");

    // A direct inquiry: one room per (product, buyer), visible to its two members only.
    let direct = api
        .ok(
            "POST",
            "buyer",
            "/v1/rooms",
            Some(json!({"kind": "direct", "product_id": "shoe-42", "seller_id": "seller"})),
            201,
        )
        .await;
    let again = api
        .ok(
            "POST",
            "buyer",
            "/v1/rooms",
            Some(json!({"kind": "direct", "product_id": "shoe-42", "seller_id": "seller"})),
            200,
        )
        .await;
    assert_eq!(direct["room_id"], again["room_id"]);
    let other = api
        .ok(
            "POST",
            "buyer",
            "/v1/rooms",
            Some(json!({"kind": "direct", "product_id": "shoe-43", "seller_id": "seller"})),
            201,
        )
        .await;
    assert_ne!(direct["room_id"], other["room_id"]);
    let did = direct["room_id"].as_str().unwrap();
    let sellers = api.ok("GET", "seller", "/v1/rooms", None, 200).await;
    assert_eq!(sellers["rooms"].as_array().unwrap().len(), 2, "the seller is in both inquiries: {sellers}");
    api.ok("GET", "carol", &format!("/v1/rooms/{did}"), None, 404).await;
    api.ok("POST", "carol", &format!("/v1/rooms/{did}/members"), None, 403).await;
    api.ok("POST", "seller", &format!("/v1/rooms/{did}/messages"), Some(json!({"text": "size 42 is in stock"})), 201)
        .await;

    // Carol, in no room, saw none of their events.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(carol.chat().is_empty(), "carol saw {:?}", carol.chat());
    assert!(alice.chat().iter().all(|(_, d)| d["event"]["room_id"] == json!(id)), "alice saw another room's events");

    up.signal("TERM");
    assert!(up.wait_exit(Duration::from_secs(30)).await.is_some_and(|s| s.success()), "{}", up.log_tail(40));
}

/// A resume older than the ring (4 events here) is served whole: the ring of the user's partition
/// is backfilled from Kafka, so the chat copies of the gap (delivery-only, not in the store)
/// arrive once and in room order, with no `resync`; /metrics counts the backfill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_older_than_the_ring_is_backfilled_from_kafka() {
    let Some(brokers) = common::brokers_or_skip() else { return };
    let (_pool, db_url) = common::fresh_pg().await;
    let prefix = common::unique_prefix();
    let env = [
        ("TIDINGS_RING_EVENTS", "4"),
        ("TIDINGS_CHAT_RATE", "1000"),
        ("TIDINGS_CHAT_BURST", "1000"),
        ("TIDINGS_CHAT_WRITE_BURST", "1000"),
    ];
    let mut up = Tidings::spawn_env("backfill", &Up::all(&brokers, &db_url, &prefix), &env);
    let ep = up.endpoints(Duration::from_secs(60)).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().unwrap();
    let api = Api { http, base: ep.http.clone() };
    common::await_ready(&api.http, &api.base, &[&up]).await;
    let room =
        api.ok("POST", "alice", "/v1/rooms", Some(json!({"kind": "group", "name": "Gap", "tags": ["gap"]})), 201).await;
    let id = room["room_id"].as_str().unwrap().to_string();
    api.ok("POST", "bob", &format!("/v1/rooms/{id}/members"), None, 200).await;
    let msgs = format!("/v1/rooms/{id}/messages");

    // Bob sees the first message, then goes away.
    let bob = open_stream(&api, "bob").await;
    api.ok("POST", "alice", &msgs, Some(json!({"text": "m0"})), 201).await;
    eventually("bob gets m0", Duration::from_secs(20), Duration::from_millis(50), &[&up], || async {
        if bob.chat().iter().any(|(e, v)| e == "chat.message" && v["event"]["payload"]["text"] == "m0") {
            Ok(())
        } else {
            Err(format!("{:?}", bob.names()))
        }
    })
    .await;
    let last = bob.last_id().expect("an id");
    drop(bob);

    // 30 more while he is away: far more than the ring of 4 holds of his partition.
    for k in 1..=30 {
        api.ok("POST", "alice", &msgs, Some(json!({"text": format!("m{k}")})), 201).await;
    }
    // Delivered to alice's stream means consumed by delivery (and evicted from bob's ring).
    let alice = open_stream(&api, "alice").await;
    api.ok("POST", "alice", &msgs, Some(json!({"text": "m31"})), 201).await;
    eventually("alice's copy of m31", Duration::from_secs(20), Duration::from_millis(50), &[&up], || async {
        if alice.chat().iter().any(|(_, v)| v["event"]["payload"]["text"] == "m31") {
            Ok(())
        } else {
            Err(String::new())
        }
    })
    .await;

    let bob = open_stream_from(&api, "bob", Some(&last)).await;
    let want: Vec<String> = (1..=31).map(|k| format!("m{k}")).collect();
    eventually("bob's resume has m1..m31", Duration::from_secs(20), Duration::from_millis(100), &[&up], || async {
        let got: Vec<String> = bob
            .chat()
            .iter()
            .filter(|(e, _)| e == "chat.message")
            .map(|(_, v)| v["event"]["payload"]["text"].as_str().unwrap_or_default().to_string())
            .collect();
        if got.len() >= want.len() {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let chat: Vec<Value> = bob.chat().into_iter().filter(|(e, _)| e == "chat.message").map(|(_, v)| v).collect();
    let texts: Vec<&str> = chat.iter().map(|v| v["event"]["payload"]["text"].as_str().unwrap()).collect();
    assert_eq!(texts, want, "every message of the gap once, in order");
    let seqs: Vec<i64> = chat.iter().map(|v| v["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "room order: {seqs:?}");
    let names = bob.names();
    assert!(!names.iter().any(|n| n == "resync" || n == "reset"), "served whole, no resync/reset: {names:?}");
    let metric = |sample: String| {
        let (http, base) = (api.http.clone(), api.base.clone());
        async move { common::metric(&http, &base, &sample).await.unwrap_or(0.0) }
    };
    let backfills = metric(r#"tidings_gateway_backfills_total{outcome="ok"}"#.to_string()).await;
    assert!(backfills >= 1.0, "no backfill ran");
    // Every stage of the process reports, not only the gateway's (whose start installs nothing now).
    for stage in ["templating", "persistence", "delivery"] {
        let records = metric(format!(r#"tidings_stage_records_in_total{{stage="{stage}"}}"#)).await;
        assert!(records > 0.0, "{stage}: tidings_stage_records_in_total missing or 0");
        let ages = metric(format!(r#"tidings_stage_record_age_seconds_count{{stage="{stage}"}}"#)).await;
        assert!(ages > 0.0, "{stage}: tidings_stage_record_age_seconds missing or empty");
    }
    let written = metric(r#"tidings_end_to_end_seconds_count{to="delivered"}"#.to_string()).await;
    assert!(written > 0.0, "tidings_end_to_end_seconds{{to=\"delivered\"}} missing or empty");
    up.signal("TERM");
    assert!(up.wait_exit(Duration::from_secs(30)).await.is_some_and(|s| s.success()), "{}", up.log_tail(20));
}

/// Answers of `n` calls in a row, and the error code and Retry-After of the first 429.
async fn flood(
    api: &Api,
    n: usize,
    mut call: impl FnMut(usize) -> (&'static str, String, Option<Value>),
    user: &str,
) -> (Vec<u16>, Option<(Value, String)>) {
    let (mut statuses, mut refused) = (Vec::new(), None);
    for i in 0..n {
        let (method, path, body) = call(i);
        let (status, body, headers) = api.call(method, user, &path, body).await;
        if status == 429 && refused.is_none() {
            let retry = headers.get("retry-after").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
            refused = Some((body["error"]["code"].clone(), retry));
        }
        statuses.push(status);
    }
    (statuses, refused)
}

/// Every change spends from the user's write budget (an edit flood and a join/leave flood end in
/// 429 with Retry-After, and the other member's stream gets only what passed); new direct
/// inquiries are capped per buyer and per buyer and seller (asking again is free); history reads
/// have a budget; and a member of more rooms than a page pages through all of them with `next`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_budgets_inquiry_caps_history_limit_and_room_pages() {
    let Some(brokers) = common::brokers_or_skip() else { return };
    let (_pool, db_url) = common::fresh_pg().await;
    let prefix = common::unique_prefix();
    // Refills slow enough (one token per 10 s) that a flood's answers do not depend on its speed.
    let env = [
        ("TIDINGS_CHAT_WRITE_RATE", "0.1"),
        ("TIDINGS_CHAT_WRITE_BURST", "10"),
        ("TIDINGS_CHAT_INQUIRIES_PER_BUYER", "3"),
        ("TIDINGS_CHAT_INQUIRIES_PER_PAIR", "2"),
        ("TIDINGS_CHAT_HISTORY_RATE", "0.1"),
        ("TIDINGS_CHAT_HISTORY_BURST", "3"),
        ("TIDINGS_CHAT_ROOMS_PAGE", "5"),
    ];
    let mut up = Tidings::spawn_env("chat-budgets", &Up::all(&brokers, &db_url, &prefix), &env);
    let ep = up.endpoints(Duration::from_secs(60)).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().unwrap();
    let api = Api { http, base: ep.http.clone() };
    common::await_ready(&api.http, &api.base, &[&up]).await;

    // Alice's room (1 token of her 10), with Bob (his own budget) watching, and her message (1 more).
    let started = std::time::Instant::now();
    // Tokens refilled since `started`, at 0.1 per second.
    let refilled = || (started.elapsed().as_secs_f64() * 0.1).floor() as usize;
    let room = api
        .ok("POST", "alice", "/v1/rooms", Some(json!({"kind": "group", "name": "Flood", "tags": ["flood"]})), 201)
        .await;
    let id = room["room_id"].as_str().unwrap().to_string();
    api.ok("POST", "bob", &format!("/v1/rooms/{id}/members"), None, 200).await;
    let bob = open_stream(&api, "bob").await;
    let msgs = format!("/v1/rooms/{id}/messages");
    let sent = api.ok("POST", "alice", &msgs, Some(json!({"text": "edit me"})), 201).await;
    let edit = format!("{msgs}/{}", sent["message_id"].as_str().unwrap());
    // An edit needs the message stored; a 404 before that costs nothing.
    eventually("alice's message is stored", Duration::from_secs(20), Duration::from_millis(100), &[&up], || async {
        match api.call("PATCH", "alice", &edit, Some(json!({"text": "edit 0"}))).await {
            (200, _, _) => Ok(()),
            (s, b, _) => Err(format!("{s} {b}")),
        }
    })
    .await;

    // 20 more edits: 7 tokens left (and any refilled since the start), then 429.
    let (statuses, refused) =
        flood(&api, 20, |i| ("PATCH", edit.clone(), Some(json!({"text": format!("edit {}", i + 1)}))), "alice").await;
    let passed = statuses.iter().filter(|s| **s == 200).count();
    let most = 7 + refilled();
    assert!((7..=most).contains(&passed) && statuses.iter().all(|s| *s == 200 || *s == 429), "{statuses:?}");
    let (code, retry) = refused.expect("an edit flood is refused");
    assert_eq!(code, "write_rate_limited");
    assert!(retry.parse::<u64>().is_ok_and(|s| s >= 1), "Retry-After {retry:?}");
    // Bob's stream gets the edits that passed, and no more.
    let edits = || bob.chat().iter().filter(|(e, _)| e == "chat.message_edited").count();
    eventually(
        "bob gets the edits that passed",
        Duration::from_secs(20),
        Duration::from_millis(100),
        &[&up],
        || async {
            match edits() {
                n if n == passed + 1 => Ok(()),
                n => Err(format!("{n} edits on bob's stream")),
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(edits(), passed + 1, "refused edits reached bob's stream");

    // A join/leave flood by Carol: 10 changes, then 429.
    let before = refilled();
    let (statuses, refused) = flood(
        &api,
        30,
        |i| {
            if i % 2 == 0 {
                ("POST", format!("/v1/rooms/{id}/members"), None)
            } else {
                ("DELETE", format!("/v1/rooms/{id}/members/me"), None)
            }
        },
        "carol",
    )
    .await;
    let passed = statuses.iter().filter(|s| **s == 200 || **s == 204).count();
    assert!((10..=10 + refilled() - before + 1).contains(&passed), "{statuses:?}");
    assert_eq!(refused.expect("a join/leave flood is refused").0, "write_rate_limited");

    // History: a burst of 3 reads, then 429.
    let (statuses, refused) = flood(&api, 6, |_| ("GET", msgs.clone(), None), "bob").await;
    assert!(statuses[3..].iter().filter(|s| **s == 429).count() >= 2, "{statuses:?}");
    let (code, retry) = refused.expect("history reads are limited");
    assert_eq!(code, "history_rate_limited");
    assert!(retry.parse::<u64>().is_ok_and(|s| s >= 1), "Retry-After {retry:?}");

    // Inquiries: 2 per buyer and seller, 3 per buyer; asking again about the same product is free.
    let inquiry = |product: &str, seller: &str| json!({"kind": "direct", "product_id": product, "seller_id": seller});
    api.ok("POST", "dan", "/v1/rooms", Some(inquiry("p1", "sam")), 201).await;
    api.ok("POST", "dan", "/v1/rooms", Some(inquiry("p2", "sam")), 201).await;
    let (status, body, headers) = api.call("POST", "dan", "/v1/rooms", Some(inquiry("p3", "sam"))).await;
    assert_eq!((status, body["error"]["code"].clone()), (429, json!("inquiry_limit")), "{body}");
    assert!(headers.contains_key("retry-after"));
    api.ok("POST", "dan", "/v1/rooms", Some(inquiry("p1", "sam")), 200).await;
    api.ok("POST", "dan", "/v1/rooms", Some(inquiry("q1", "sue")), 201).await;
    let e = api.ok("POST", "dan", "/v1/rooms", Some(inquiry("q2", "sue")), 429).await;
    assert_eq!(e["error"]["code"], "inquiry_limit");
    let sams = api.ok("GET", "sam", "/v1/rooms", None, 200).await;
    assert_eq!(sams["rooms"].as_array().unwrap().len(), 2, "{sams}");

    // Pages: Pat is the seller of 12 inquiries, 5 a page.
    let mut created = std::collections::BTreeSet::new();
    for i in 0..12 {
        let r = api.ok("POST", &format!("buyer{i}"), "/v1/rooms", Some(inquiry("x", "pat")), 201).await;
        created.insert(r["room_id"].as_str().unwrap().to_string());
    }
    let (mut seen, mut sizes, mut path) = (Vec::new(), Vec::new(), "/v1/rooms".to_string());
    loop {
        let page = api.ok("GET", "pat", &path, None, 200).await;
        let rooms = page["rooms"].as_array().unwrap();
        sizes.push(rooms.len());
        seen.extend(rooms.iter().map(|r| r["room_id"].as_str().unwrap().to_string()));
        match page["next"].as_str() {
            Some(next) => path = format!("/v1/rooms?after={next}"),
            None => break,
        }
        assert!(sizes.len() < 10, "paging does not end: {sizes:?}");
    }
    assert_eq!(sizes, [5, 5, 2]);
    assert_eq!(seen.len(), 12, "no room twice: {seen:?}");
    assert_eq!(seen.into_iter().collect::<std::collections::BTreeSet<_>>(), created);
    let e = api.ok("GET", "pat", "/v1/rooms?limit=6", None, 422).await;
    assert_eq!(e["error"]["code"], "invalid_room");
    let e = api.ok("GET", "pat", "/v1/rooms?after=nonsense", None, 422).await;
    assert_eq!(e["error"]["code"], "invalid_cursor");
    let two = api.ok("GET", "pat", "/v1/rooms?limit=2", None, 200).await;
    assert_eq!((two["rooms"].as_array().unwrap().len(), two["next"].is_string()), (2, true));

    up.signal("TERM");
    assert!(up.wait_exit(Duration::from_secs(30)).await.is_some_and(|s| s.success()), "{}", up.log_tail(20));
}
