//! A campaign on a real broker and PostgreSQL, through one `tidings up`: its recipients on one
//! notifications partition share a group record, yet each connected stream gets its own
//! notification once (its deterministic id), a resume from before it gets it from the ring, and
//! the store holds one row per recipient.

mod common;

use common::{count_notifications, eventually, open_stream, Tidings, Up};
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;
use tidings_core::kafka::partition_for;
use tidings_core::Notification;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaigns_group_records_reach_each_recipient_once() {
    let Some(brokers) = common::brokers_or_skip() else { return };
    let (pool, db_url) = common::fresh_pg().await;
    let prefix = common::unique_prefix();
    let mut up = Tidings::spawn("campaign", &Up::all(&brokers, &db_url, &prefix));
    let ep = up.endpoints(Duration::from_secs(60)).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().unwrap();
    common::await_ready(&http, &ep.http, &[&up]).await;

    let audience: Vec<String> = (0..40).map(|i| format!("cs{i:02}")).collect();
    let (connected, offline) = audience.split_at(20);
    let mut streams = Vec::new();
    for user in connected {
        streams.push((user.clone(), open_stream(&http, &ep.http, user, None).await));
    }
    // One recipient was here before the campaign and comes back after it, from its last position.
    let late = &offline[0];
    let before = open_stream(&http, &ep.http, late, None).await;
    let position = eventually(
        "the late user's opening position",
        Duration::from_secs(10),
        Duration::from_millis(50),
        &[&up],
        || async { before.last_id().ok_or_else(String::new) },
    )
    .await;
    drop(before);

    let event_id = uuid::Uuid::new_v4().to_string();
    let campaign = json!({"event_id": event_id, "occurred_at": chrono::Utc::now().timestamp_micros(), "coupon_id": "camp-g",
        "payload": {"CampaignLaunched": {"campaign_id": "camp-g", "title": "Group sale", "discount_percent": 15,
        "audience": {"InlineAudience": {"user_ids": audience}}}}});
    common::accept(&http, &ep.ingest, "coupons", &campaign, &up).await;

    let campaign_events = |seen: &common::Seen| seen.named(|e| e == "coupon.campaign");
    eventually(
        "every connected recipient's notification",
        Duration::from_secs(30),
        Duration::from_millis(100),
        &[&up],
        || async {
            let missing: Vec<&str> =
                streams.iter().filter(|(_, s)| campaign_events(s).is_empty()).map(|(u, _)| u.as_str()).collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("not yet: {missing:?}"))
            }
        },
    )
    .await;
    let resumed = open_stream(&http, &ep.http, late, Some(&position)).await;
    eventually("the late user's resume", Duration::from_secs(20), Duration::from_millis(100), &[&up], || async {
        if campaign_events(&resumed).is_empty() {
            Err(format!("{:?}", resumed.names()))
        } else {
            Ok(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let partitions = 12;
    let mut positions: HashMap<i32, String> = HashMap::new();
    for (user, seen) in streams.iter().chain([(late.clone(), resumed.clone())].iter()) {
        let got = campaign_events(seen);
        assert_eq!(got.len(), 1, "{user}: exactly one campaign notification, got {got:?}");
        let data = &got[0].1;
        assert_eq!(data["id"], json!(Notification::id_for(&event_id, user).to_string()), "{user}: its own id");
        assert_eq!(data["title"], "Group sale");
        // Recipients on one partition were one record: they share its position.
        let at = data["position"].as_str().unwrap().to_string();
        let p = partition_for(user, partitions);
        assert!(at.starts_with(&format!("{p}.")), "{user} on partition {p}, delivered at {at}");
        let shared = positions.entry(p).or_insert_with(|| at.clone());
        assert_eq!(*shared, at, "{user}: same record as the other recipients on partition {p}");
    }
    let names = resumed.names();
    assert!(!names.iter().any(|n| n == "reset" || n == "resync"), "the resume was served whole: {names:?}");

    // One row per recipient, each with its deterministic id.
    eventually("40 rows", Duration::from_secs(30), Duration::from_millis(200), &[&up], || async {
        match count_notifications(&pool).await {
            40 => Ok(()),
            n => Err(format!("{n} rows")),
        }
    })
    .await;
    let rows: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT id, user_id FROM notifications").fetch_all(&pool).await.unwrap();
    let mut users: Vec<&str> = rows.iter().map(|(_, u)| u.as_str()).collect();
    users.sort();
    assert_eq!(users, audience.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(rows.iter().all(|(id, user)| *id == Notification::id_for(&event_id, user)));

    // 40 users on 12 partitions went out as one record per partition (at most 12), not 40.
    let records: i64 = common::high_watermarks(&brokers, &format!("{prefix}notifications")).await.iter().sum();
    assert!(records <= partitions as i64, "{records} notification records for 40 recipients");
    up.signal("TERM");
    assert!(up.wait_exit(Duration::from_secs(30)).await.is_some_and(|s| s.success()), "{}", up.log_tail(20));
}
