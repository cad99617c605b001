//! Preferences through one `tidings up` on a real broker and PostgreSQL: a user opts out of
//! `campaigns` over `PUT /v1/me/preferences`; a campaign to them and another user reaches only the
//! other one (stored and live), while an order's delivery (a critical category) still reaches the
//! one who opted out.

mod common;

use common::{eventually, open_stream, user_token, Tidings, Up};
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_skips_the_user_who_opted_out_and_a_critical_notification_does_not() {
    let Some(brokers) = common::brokers_or_skip() else { return };
    let (pool, db_url) = common::fresh_pg().await;
    let prefix = common::unique_prefix();
    let mut up = Tidings::spawn("preferences", &Up::all(&brokers, &db_url, &prefix));
    let ep = up.endpoints(Duration::from_secs(60)).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().unwrap();
    common::await_ready(&http, &ep.http, &[&up]).await;

    let (quiet, keen) = ("pref-quiet", "pref-keen");
    let url = format!("{}/v1/me/preferences", ep.http);
    let put = http
        .put(&url)
        .bearer_auth(user_token(quiet))
        .json(&json!({"opt_out": ["campaigns"], "time_zone": "Asia/Seoul", "quiet_hours": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status().as_u16(), 200, "{}", put.text().await.unwrap());
    let got: serde_json::Value =
        http.get(&url).bearer_auth(user_token(quiet)).send().await.unwrap().json().await.unwrap();
    assert_eq!(got["opt_out"], json!(["campaigns"]));
    // The categories of the project's topology.yaml, critical ones marked.
    let delivery = got["categories"].as_array().unwrap().iter().find(|c| c["name"] == "delivery").cloned();
    assert_eq!(delivery.map(|c| c["critical"].clone()), Some(json!(true)), "{got}");
    // A critical category cannot be turned off.
    let refused =
        http.put(&url).bearer_auth(user_token(quiet)).json(&json!({"opt_out": ["delivery"]})).send().await.unwrap();
    assert_eq!(refused.status().as_u16(), 422);

    let quiet_stream = open_stream(&http, &ep.http, quiet, None).await;
    let keen_stream = open_stream(&http, &ep.http, keen, None).await;
    let campaign_id = uuid::Uuid::new_v4().to_string();
    let campaign = json!({"event_id": campaign_id, "occurred_at": chrono::Utc::now().timestamp_micros(), "coupon_id": "camp-p",
        "payload": {"CampaignLaunched": {"campaign_id": "camp-p", "title": "Members sale", "discount_percent": 20,
        "audience": {"InlineAudience": {"user_ids": [quiet, keen]}}}}});
    common::accept(&http, &ep.ingest, "coupons", &campaign, &up).await;
    // Then, on another topic, an order of the quiet user ships (category delivery, critical).
    let shipped = json!({"event_id": uuid::Uuid::new_v4().to_string(), "occurred_at": chrono::Utc::now().timestamp_micros(),
        "order_id": "o-pref-1", "buyer_id": quiet, "locale": null,
        "payload": {"OrderShipped": {"carrier": "DHL", "tracking_number": "T-1"}}});
    common::accept(&http, &ep.ingest, "orders", &shipped, &up).await;

    eventually(
        "the keen user's campaign and the quiet user's shipment, live",
        Duration::from_secs(30),
        Duration::from_millis(100),
        &[&up],
        || async {
            let keen_got = keen_stream.named(|e| e == "coupon.campaign").len();
            let quiet_got = quiet_stream.named(|e| e == "order.shipped").len();
            if keen_got == 1 && quiet_got == 1 {
                Ok(())
            } else {
                Err(format!("campaign {keen_got}, shipped {quiet_got}"))
            }
        },
    )
    .await;
    eventually("both rows stored", Duration::from_secs(30), Duration::from_millis(200), &[&up], || async {
        match common::count_notifications(&pool).await {
            2 => Ok(()),
            n => Err(format!("{n} rows")),
        }
    })
    .await;
    // The shipment came after the campaign on the quiet user's stream: had the campaign been
    // produced for them, it would be there by now.
    assert!(quiet_stream.named(|e| e == "coupon.campaign").is_empty(), "{:?}", quiet_stream.names());
    let mut rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT user_id, kind, category FROM notifications").fetch_all(&pool).await.unwrap();
    rows.sort();
    assert_eq!(
        rows,
        vec![
            (keen.to_owned(), "coupon.campaign".to_owned(), "campaigns".to_owned()),
            (quiet.to_owned(), "order.shipped".to_owned(), "delivery".to_owned()),
        ]
    );
    let suppressed = common::metric(
        &http,
        &ep.http,
        r#"tidings_notifications_suppressed_total{category="campaigns",reason="opted_out"}"#,
    )
    .await;
    assert_eq!(suppressed, Ok(1.0));
    up.signal("TERM");
    assert!(up.wait_exit(Duration::from_secs(30)).await.is_some_and(|s| s.success()), "{}", up.log_tail(20));
}
