//! End to end on a real broker and PostgreSQL: events posted to the HTTP ingest of one
//! `tidings up` become exactly the expected notification rows (locale, fan-out, deterministic
//! ids), a bad event is refused with its field path, chat events are refused, SIGTERM exits 0.

mod common;

use common::{accept, count_notifications, eventually, post, Tidings, Up};
use serde_json::json;
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};
use tidings_core::Notification;

/// A stored notification: id, user_id, source_event_id, kind, title.
type Row = (uuid::Uuid, String, String, String, String);

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_become_notifications_and_sigterm_exits_cleanly() {
    let Some(brokers) = common::brokers_or_skip() else { return };
    let (pool, db_url) = common::fresh_pg().await;
    let prefix = common::unique_prefix();
    eprintln!("topic prefix {prefix}, database {db_url}");
    let mut up = Tidings::spawn("up", &Up::all(&brokers, &db_url, &prefix));
    let ep = up.endpoints(Duration::from_secs(60)).await;
    assert_eq!(ep.topic_prefix, prefix);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().unwrap();
    let base = ep.ingest.clone();

    // Chat events come only through the chat API (membership and sender checked there), never
    // through ingest, whoever holds a service token.
    let (status, err) = post(
        &http,
        &base,
        "chat",
        &json!({"event_id": uuid::Uuid::new_v4().to_string(), "occurred_at": now_micros(), "room_id": "room-e2e",
        "payload": {"MemberJoined": {"user_id": "mallory"}}}),
    )
    .await;
    assert_eq!((status, err["error"]["code"].as_str()), (404, Some("unknown_topic")), "{err}");

    let order_ev = uuid::Uuid::new_v4().to_string();
    let order_id = "o-e2e-1001";
    accept(
        &http,
        &base,
        "orders",
        &json!({"event_id": order_ev, "occurred_at": now_micros(), "order_id": order_id,
        "buyer_id": "u1", "locale": "ko", "payload": {"OrderPlaced": {"amount_cents": 4200, "currency": "EUR",
        "items": [{"sku": "tea-01", "name": "Green tea", "quantity": 3, "unit_price_cents": 1400}]}}}),
        &up,
    )
    .await;

    let coupon_ev = uuid::Uuid::new_v4().to_string();
    accept(
        &http,
        &base,
        "coupons",
        &json!({"event_id": coupon_ev, "occurred_at": now_micros(), "coupon_id": "c-e2e-1",
        "payload": {"CouponIssued": {"user_id": "u2", "code": "SAVE10", "discount_percent": 10,
        "expires_at": now_micros() + 86_400_000_000i64}}}),
        &up,
    )
    .await;

    let campaign_ev = uuid::Uuid::new_v4().to_string();
    let audience: Vec<String> = (0..50).map(|i| format!("cu{i:02}")).collect();
    accept(
        &http,
        &base,
        "coupons",
        &json!({"event_id": campaign_ev, "occurred_at": now_micros(), "coupon_id": "camp-e2e",
        "payload": {"CampaignLaunched": {"campaign_id": "camp-e2e", "title": "Weekend sale", "discount_percent": 20,
        "audience": {"InlineAudience": {"user_ids": audience}}}}}),
        &up,
    )
    .await;

    // A schema mismatch deep inside the payload is refused with the exact field path.
    let (status, err) = post(
        &http,
        &base,
        "orders",
        &json!({"event_id": uuid::Uuid::new_v4().to_string(),
        "occurred_at": now_micros(), "order_id": "o-e2e-bad", "buyer_id": "u9", "payload": {"OrderPlaced": {
        "amount_cents": 100, "currency": "EUR",
        "items": [{"sku": "x", "name": "x", "quantity": "three", "unit_price_cents": 100}]}}}),
    )
    .await;
    assert_eq!(status, 400, "bad event answered {status}: {err}");
    assert_eq!(err["error"]["path"], json!("payload.items[0].quantity"), "error body: {err}");
    assert_eq!(err["error"]["code"], json!("schema_mismatch"), "error body: {err}");

    // 1 order + 1 coupon + 50 campaign recipients.
    let expected = 1 + 1 + 50;
    eventually("all 52 notifications stored", Duration::from_secs(60), Duration::from_millis(250), &[&up], || async {
        let n = count_notifications(&pool).await;
        if n == expected {
            Ok(())
        } else {
            Err(format!("{n} rows"))
        }
    })
    .await;
    // Nothing late (a duplicate, or the refused event) may show up afterwards.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count_notifications(&pool).await, expected, "row count changed after reaching {expected}");

    // The refused event reached neither Kafka nor the table: `orders` holds exactly the one accepted record.
    let orders = common::high_watermarks(&brokers, &format!("{prefix}orders")).await;
    assert_eq!(orders.iter().sum::<i64>(), 1, "orders topic high watermarks {orders:?}");
    let bad: i64 =
        sqlx::query_scalar("SELECT count(*) FROM notifications WHERE user_id = 'u9' OR title LIKE '%o-e2e-bad%'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(bad, 0);

    let rows: Vec<Row> = sqlx::query_as("SELECT id, user_id, source_event_id, kind, title FROM notifications")
        .fetch_all(&pool)
        .await
        .unwrap();
    for (id, user, ev, _, _) in &rows {
        assert_eq!(*id, Notification::id_for(ev, user), "row for {user} from {ev} has a non-deterministic id");
    }
    let by_user: HashMap<&str, Vec<&Row>> = rows.iter().fold(HashMap::new(), |mut m, r| {
        m.entry(r.1.as_str()).or_default().push(r);
        m
    });

    let u1 = &by_user["u1"];
    assert_eq!(u1.len(), 1);
    let (id, _, ev, kind, title) = u1[0];
    assert_eq!((ev.as_str(), kind.as_str()), (order_ev.as_str(), "order.placed"));
    assert_eq!(*id, Notification::id_for(&order_ev, "u1"));
    assert!(
        title.contains(order_id) && title.contains("주문"),
        "u1's title is not the Korean one with the order id: {title:?}"
    );

    let u2 = &by_user["u2"];
    assert_eq!((u2.len(), u2[0].2.as_str(), u2[0].3.as_str()), (1, coupon_ev.as_str(), "coupon.issued"));
    assert!(u2[0].4.contains("10%"), "coupon title {:?}", u2[0].4);

    let campaign: BTreeSet<&str> = rows.iter().filter(|r| r.2 == campaign_ev).map(|r| r.1.as_str()).collect();
    assert_eq!(campaign, audience.iter().map(String::as_str).collect::<BTreeSet<_>>());
    assert!(rows.iter().filter(|r| r.2 == campaign_ev).all(|r| r.3 == "coupon.campaign" && r.4 == "Weekend sale"));

    // Graceful shutdown: SIGTERM drains and exits 0 well within the grace period.
    let asked = Instant::now();
    up.signal("TERM");
    match up.wait_exit(Duration::from_secs(20)).await {
        Some(status) => assert!(status.success(), "exit status after SIGTERM: {status}\n{}", up.log_tail(40)),
        None => panic!("still running 20 s after SIGTERM\n{}", up.log_tail(40)),
    }
    eprintln!("exited 0 {:.1}s after SIGTERM", asked.elapsed().as_secs_f64());
    assert_eq!(count_notifications(&pool).await, expected);
}
