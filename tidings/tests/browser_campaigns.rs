//! A campaign on the web page, in headless Chromium, on `tidings up`'s embedded defaults (mock Kafka,
//! SQLite, embedded registry): one user opts out of campaigns on the Preferences view, the other sets
//! quiet hours that do not include now and a locale there; a campaign launched to both through
//! `POST /v1/campaigns` (its dry run counting one opted out) appears live (no reload) in the second
//! one's inbox, in their language and with its category, never in the first one's page or inbox,
//! and the campaign's status counts it stored once and delivered once (one stream wrote it).

// This test needs no broker, so the shared helpers' broker check goes unused here.
#[allow(unused_imports)]
mod common;

use chrono::Timelike;
use common::browser::{preferences_view, save_preferences, sign_in, Browser};
use common::{await_ready, browser_or_skip, eventually, get_json, stored_sources, user_token, Embedded};
use serde_json::{json, Value};
use std::time::Duration;

const SNAPSHOT: &str = r#"
    return {
        view: location.hash,
        status: document.getElementById('prefs-status')?.textContent,
        error: document.getElementById('prefs-error')?.textContent,
        locale: document.getElementById('prefs-locale')?.value,
        inbox: [...document.querySelectorAll('#inbox-list li')].map((li) => [li.dataset.source, li.textContent]),
        loaded: window.__loaded || null,
    };
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_reaches_live_only_the_user_who_did_not_opt_out() {
    if !browser_or_skip() {
        return;
    }
    tokio::time::timeout(Duration::from_secs(180), run()).await.expect("the campaign page test did not finish in time");
}

async fn run() {
    let (up, ep) = Embedded::start("tidings-campaign-page-").await;
    let url = ep["http"].as_str().unwrap().to_owned();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    await_ready(&http, &url, &[]).await;
    let mut b = Browser::start(SNAPSHOT);
    let (out, keen) = ("opted-out", "keen");

    // The first user opts out of campaigns on the page.
    sign_in(&mut b, &url, out).await;
    preferences_view(&mut b, out).await;
    b.call(out, json!({"cmd": "press", "selector": "#prefs-cat-campaigns", "key": "Space"})).await;
    save_preferences(&mut b, out).await;
    let saved = get_json(&http, &format!("{url}/v1/me/preferences"), &user_token(out)).await.unwrap();
    assert_eq!(saved["opt_out"], json!(["campaigns"]), "{saved}");
    assert_eq!(saved["quiet_hours"], Value::Null, "{saved}");

    // The second sets quiet hours that do not include now (two to three hours from now, UTC) and
    // Korean as the language of campaigns.
    sign_in(&mut b, &url, keen).await;
    preferences_view(&mut b, keen).await;
    let now = chrono::Utc::now();
    let hhmm = |h: u32| format!("{:02}:{:02}", (now.hour() + h) % 24, now.minute());
    let (start, end) = (hhmm(2), hhmm(3));
    b.call(keen, json!({"cmd": "fill", "selector": "#prefs-tz", "value": "UTC"})).await;
    b.call(keen, json!({"cmd": "press", "selector": "#prefs-quiet-on", "key": "Space"})).await;
    b.call(keen, json!({"cmd": "fill", "selector": "#prefs-quiet-start", "value": start})).await;
    b.call(keen, json!({"cmd": "fill", "selector": "#prefs-quiet-end", "value": end})).await;
    b.wait(keen, "the locale field", "return !document.getElementById('prefs-locale-field').hidden").await;
    b.call(keen, json!({"cmd": "fill", "selector": "#prefs-locale", "value": "ko"})).await;
    save_preferences(&mut b, keen).await;
    let saved = get_json(&http, &format!("{url}/v1/me/preferences"), &user_token(keen)).await.unwrap();
    assert_eq!(saved["quiet_hours"], json!({"start": start, "end": end}), "{saved}");
    assert_eq!((&saved["time_zone"], &saved["locale"], &saved["opt_out"]), (&json!("UTC"), &json!("ko"), &json!([])));
    // The page shows what was saved after a reload of the view.
    b.call(keen, json!({"cmd": "press", "selector": "#tab-inbox", "key": "Enter"})).await;
    preferences_view(&mut b, keen).await;
    b.wait(keen, "the saved locale", "return document.getElementById('prefs-locale').value === 'ko'").await;

    // Both pages on their inbox, marked: a reload would drop the mark.
    for user in [out, keen] {
        b.call(user, json!({"cmd": "press", "selector": "#tab-inbox", "key": "Enter"})).await;
        b.wait(user, "the inbox", "return !document.getElementById('view-inbox').hidden").await;
        b.eval(user, "window.__loaded = 'before the campaign'; return true").await;
    }

    let id = format!("page-{}", uuid::Uuid::new_v4().simple());
    let event_id = format!("campaign:{id}");
    let launch = json!({"campaign_id": id, "category": "campaigns", "title": "Spring sale", "body": "For {{ recipient }}",
        "locales": {"ko": {"title": "봄 세일", "body": "{{ recipient }}님께"}}, "audience": {"user_ids": [out, keen]}});
    let r = http
        .post(format!("{url}/v1/campaigns"))
        .bearer_auth(common::ingest_token())
        .json(&launch)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let launched: Value = r.json().await.unwrap();
    let counted =
        [&launched["audience"], &launched["opted_out"], &launched["in_quiet_hours_now"], &launched["will_receive"]];
    assert_eq!(counted, [&json!(2), &json!(1), &json!(0), &json!(1)], "{launched}");

    let item = format!("document.querySelector(\"#inbox-list li[data-source='{event_id}']\")");
    b.wait(keen, "the campaign, live", &format!("return Boolean({item})")).await;
    let shown = b
        .eval(keen, &format!("const li = {item}; return [li.dataset.kind, li.textContent, window.__loaded || null]"))
        .await;
    assert_eq!(shown[0], "campaign", "{shown}");
    let text = shown[1].as_str().unwrap();
    assert!(text.contains("봄 세일") && text.contains("keen님께"), "not in the user's language: {text}");
    assert!(text.contains("campaigns"), "the category is not shown: {text}");
    assert_eq!(shown[2], "before the campaign", "the page was reloaded");

    // Stored for the one, after which the other has it neither stored nor on the page.
    eventually("the campaign stored", Duration::from_secs(30), Duration::from_millis(200), &[], || async {
        let got = stored_sources(&http, &url, keen).await?;
        if got.contains(&event_id) {
            Ok(())
        } else {
            Err(format!("{got:?}\n{}", up.log()))
        }
    })
    .await;
    let theirs = stored_sources(&http, &url, out).await.unwrap();
    assert!(!theirs.contains(&event_id), "stored for the user who opted out: {theirs:?}");
    assert_eq!(b.eval(out, &format!("return Boolean({item})")).await, json!(false));
    assert_eq!(b.eval(out, "return window.__loaded || null").await, "before the campaign");

    // One stream wrote it: the gateway's delivered count reaches the store within its flush period.
    let status = format!("{url}/v1/campaigns/{id}");
    eventually("stored and delivered once", Duration::from_secs(10), Duration::from_millis(200), &[], || async {
        let c = get_json(&http, &status, common::ingest_token()).await?;
        let counts = &c["counts"];
        if (&counts["stored"], &counts["delivered"], &counts["suppressed"]) == (&json!(1), &json!(1), &json!(1)) {
            Ok(())
        } else {
            Err(c.to_string())
        }
    })
    .await;
    b.close().await;
    drop(up);
}
