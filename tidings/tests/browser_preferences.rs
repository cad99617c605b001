//! The preferences view of the web page in headless Chromium, on `tidings up`'s embedded defaults
//! (mock Kafka, SQLite, embedded registry): a user opts out of campaigns and sets a time zone and
//! quiet hours with the keyboard (critical categories shown on and disabled); a campaign to them and
//! another user then reaches only the other one's page, live, while an order's delivery (critical)
//! still reaches theirs.

// This test needs no broker, so the shared helpers' broker check goes unused here.
#[allow(unused_imports)]
mod common;

use common::browser::{preferences_view, save_preferences, sign_in, Browser};
use common::{await_ready, browser_or_skip, eventually, get_json, stored_sources, user_token, Embedded};
use serde_json::{json, Value};
use std::time::Duration;

const SNAPSHOT: &str = r#"
    const boxes = [...document.querySelectorAll('#prefs-categories input')];
    return {
        view: location.hash,
        categories: boxes.map((i) => [i.value, i.checked, i.disabled]),
        status: document.getElementById('prefs-status')?.textContent,
        error: document.getElementById('prefs-error')?.textContent,
        inbox: [...document.querySelectorAll('#inbox-list li')].map((li) => li.dataset.source),
    };
"#;

async fn ingest(http: &reqwest::Client, ingest: &str, topic: &str, body: &Value) {
    let r = http
        .post(format!("{ingest}/v1/events/{topic}"))
        .bearer_auth(common::ingest_token())
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferences_set_on_the_page_keep_a_campaign_away_but_not_a_delivery() {
    if !browser_or_skip() {
        return;
    }
    tokio::time::timeout(Duration::from_secs(180), run())
        .await
        .expect("the preferences page test did not finish in time");
}

async fn run() {
    let (up, ep) = Embedded::start("tidings-prefs-page-").await;
    let url = ep["http"].as_str().unwrap().to_owned();
    let ingest_url = ep["ingest"].as_str().unwrap().to_owned();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    // Delivery streams only once its partitions are assigned (`/readyz`), as a user's page expects.
    await_ready(&http, &url, &[]).await;
    let mut b = Browser::start(SNAPSHOT);
    let (quiet, keen) = ("quiet", "keen");

    sign_in(&mut b, &url, quiet).await;
    preferences_view(&mut b, quiet).await;
    let boxes = b
        .eval(quiet, "return [...document.querySelectorAll('#prefs-categories input')].map((i) => [i.value, i.checked, i.disabled])")
        .await;
    let critical = |name: &str| json!([name, true, true]);
    for name in ["payment", "delivery"] {
        assert!(boxes.as_array().unwrap().contains(&critical(name)), "{name} shown on and disabled: {boxes}");
    }
    assert!(boxes.as_array().unwrap().contains(&json!(["campaigns", true, false])), "{boxes}");
    // Opt out of campaigns (Space toggles the focused box), a time zone, quiet hours; save with Enter.
    b.call(quiet, json!({"cmd": "press", "selector": "#prefs-cat-campaigns", "key": "Space"})).await;
    b.call(quiet, json!({"cmd": "fill", "selector": "#prefs-tz", "value": "Asia/Seoul"})).await;
    b.call(quiet, json!({"cmd": "press", "selector": "#prefs-quiet-on", "key": "Space"})).await;
    b.call(quiet, json!({"cmd": "fill", "selector": "#prefs-quiet-start", "value": "21:30"})).await;
    save_preferences(&mut b, quiet).await;
    let saved = get_json(&http, &format!("{url}/v1/me/preferences"), &user_token(quiet)).await.unwrap();
    assert_eq!(saved["opt_out"], json!(["campaigns"]), "{saved}");
    assert_eq!(saved["time_zone"], "Asia/Seoul");
    assert_eq!(saved["quiet_hours"], json!({"start": "21:30", "end": "08:00"}));
    // A bad time zone is refused with the server's reason, on the page.
    b.call(quiet, json!({"cmd": "fill", "selector": "#prefs-tz", "value": "Mars/Olympus"})).await;
    b.call(quiet, json!({"cmd": "press", "selector": "#prefs-tz", "key": "Enter"})).await;
    b.wait(
        quiet,
        "the refusal",
        "return document.getElementById('prefs-error').textContent.includes('not an IANA time zone')",
    )
    .await;
    b.call(quiet, json!({"cmd": "goto", "url": format!("{url}/#/inbox")})).await;
    b.wait(quiet, "the stream to be live", "return document.getElementById('conn').dataset.state === 'live'").await;

    sign_in(&mut b, &url, keen).await;
    let campaign = uuid::Uuid::new_v4().to_string();
    ingest(
        &http,
        &ingest_url,
        "coupons",
        &json!({"event_id": campaign, "occurred_at": chrono::Utc::now().timestamp_micros(),
        "coupon_id": "camp-page", "payload": {"CampaignLaunched": {"campaign_id": "camp-page", "title": "Page sale",
        "discount_percent": 10, "audience": {"InlineAudience": {"user_ids": [quiet, keen]}}}}}),
    )
    .await;
    let shipped = uuid::Uuid::new_v4().to_string();
    ingest(
        &http,
        &ingest_url,
        "orders",
        &json!({"event_id": shipped, "occurred_at": chrono::Utc::now().timestamp_micros(),
        "order_id": "o-page", "buyer_id": quiet, "locale": null,
        "payload": {"OrderShipped": {"carrier": "DHL", "tracking_number": "T-9"}}}),
    )
    .await;
    let has =
        |source: &str| format!("return Boolean(document.querySelector(\"#inbox-list li[data-source='{source}']\"))");
    b.wait(keen, "the campaign, live", &has(&campaign)).await;
    eventually("the shipment stored", Duration::from_secs(30), Duration::from_millis(200), &[], || async {
        let got = stored_sources(&http, &url, quiet).await?;
        if got.contains(&shipped) {
            Ok(())
        } else {
            Err(format!("{got:?}\n{}", up.log()))
        }
    })
    .await;
    b.wait(quiet, "the shipment, live", &has(&shipped)).await;
    // The campaign was the quiet user's notification before the shipment, had it been produced.
    let stored = get_json(&http, &format!("{url}/v1/notifications"), &user_token(quiet)).await.unwrap();
    let sources: Vec<&str> =
        stored["items"].as_array().unwrap().iter().filter_map(|i| i["source_event_id"].as_str()).collect();
    assert!(!sources.contains(&campaign.as_str()), "{stored}");
    assert_eq!(b.eval(quiet, &has(&campaign)).await, json!(false));
    eventually("the suppression counted", Duration::from_secs(10), Duration::from_millis(200), &[], || async {
        common::metric(
            &http,
            &url,
            r#"tidings_notifications_suppressed_total{category="campaigns",reason="opted_out"}"#,
        )
        .await
        .and_then(|v| if v == 1.0 { Ok(()) } else { Err(format!("{v}")) })
    })
    .await;
    b.close().await;
    drop(up);
}
