//! The preferences view of the web page in headless Chromium, on `tidings up`'s embedded defaults
//! (mock Kafka, SQLite, embedded registry): a user opts out of campaigns and sets a time zone and
//! quiet hours with the keyboard (critical categories shown on and disabled); a campaign to them and
//! another user then reaches only the other one's page, live, while an order's delivery (critical)
//! still reaches theirs.

// This test needs no broker, so the shared helpers' broker check goes unused here.
#[allow(unused_imports)]
mod common;

use common::browser::Browser;
use common::{browser_or_skip, eventually, user_token};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
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

/// A `tidings up --dev` on embedded defaults, killed on drop.
struct Embedded {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Embedded {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Embedded {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("up.log")).unwrap_or_default()
    }
}

async fn embedded() -> (Embedded, Value) {
    let dir = tempfile::Builder::new().prefix("tidings-prefs-page-").tempdir().unwrap();
    let topology = Path::new(env!("CARGO_MANIFEST_DIR")).join("../topology.yaml");
    let log = std::fs::File::create(dir.path().join("up.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tidings"))
        .env("TIDINGS_DATA_DIR", dir.path())
        .env_remove("TIDINGS_BROKERS")
        .env_remove("TIDINGS_DATABASE_URL")
        .args(["up", "--dev", "--http", "127.0.0.1:0", "--registry-listen", "127.0.0.1:0"])
        .args(["--ingest-listen", "127.0.0.1:0", "--topology"])
        .arg(topology)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut up = Embedded { child, dir };
    let path = up.dir.path().join("endpoints.json");
    for _ in 0..600 {
        if let Ok(Ok(ep)) = std::fs::read(&path).map(|t| serde_json::from_slice::<Value>(&t)) {
            return (up, ep);
        }
        if let Some(status) = up.child.try_wait().unwrap() {
            panic!("tidings up exited ({status}):\n{}", up.log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("tidings up did not start within 60 s:\n{}", up.log());
}

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

async fn sign_in(b: &mut Browser, url: &str, user: &str) {
    b.call(user, json!({"cmd": "open", "url": format!("{url}/"), "width": 390, "height": 844})).await;
    b.call(user, json!({"cmd": "fill", "selector": "#dev-user", "value": user})).await;
    b.call(user, json!({"cmd": "press", "selector": "#dev-user", "key": "Enter"})).await;
    b.wait(user, "signed in", "return !document.getElementById('app').hidden").await;
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
    let (up, ep) = embedded().await;
    let url = ep["http"].as_str().unwrap().to_owned();
    let ingest_url = ep["ingest"].as_str().unwrap().to_owned();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    // Delivery streams only once its partitions are assigned (`/readyz`), as a user's page expects.
    eventually("the gateway to be ready", Duration::from_secs(60), Duration::from_millis(200), &[], || {
        common::ready(&http, &url)
    })
    .await;
    let mut b = Browser::start(SNAPSHOT);
    let (quiet, keen) = ("quiet", "keen");

    sign_in(&mut b, &url, quiet).await;
    // To the view by keyboard: the tab link, then Enter.
    b.call(quiet, json!({"cmd": "press", "selector": "#tab-preferences", "key": "Enter"})).await;
    b.wait(quiet, "the categories", "return document.querySelectorAll('#prefs-categories input').length > 0").await;
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
    b.call(quiet, json!({"cmd": "press", "selector": "#prefs-form button[type=submit]", "key": "Enter"})).await;
    b.wait(quiet, "saved", "return document.getElementById('prefs-status').textContent === 'Preferences saved.'").await;
    let saved: Value = http
        .get(format!("{url}/v1/me/preferences"))
        .bearer_auth(user_token(quiet))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
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
    let stored_for = |user: &'static str| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let r = http.get(format!("{url}/v1/notifications")).bearer_auth(user_token(user)).send().await;
            let body: Value = r.map_err(|e| e.to_string())?.json().await.map_err(|e| e.to_string())?;
            Ok::<Vec<String>, String>(
                body["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|i| i["source_event_id"].as_str().map(str::to_owned))
                    .collect(),
            )
        }
    };
    eventually("the shipment stored", Duration::from_secs(30), Duration::from_millis(200), &[], || async {
        let got = stored_for(quiet).await?;
        if got.contains(&shipped) {
            Ok(())
        } else {
            Err(format!("{got:?}\n{}", up.log()))
        }
    })
    .await;
    b.wait(quiet, "the shipment, live", &has(&shipped)).await;
    // The campaign was the quiet user's notification before the shipment, had it been produced.
    let stored: Value = http
        .get(format!("{url}/v1/notifications"))
        .bearer_auth(user_token(quiet))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
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
