//! The web page's Status view in headless Chromium: hidden from a plain user (whose
//! GET /v1/status is 403), shown to a user named by --admin-user, with the groups, the gateway
//! and its streams, refreshed while it is open. Screenshot in `target/browser/status.png`.

mod common;

use common::browser::{sign_in, Browser};
use common::{browser_or_skip, Tidings, Up};
use serde_json::json;
use std::time::Duration;

const SNAPSHOT: &str = r#"
    return {
        tab_hidden: document.getElementById('tab-status').hidden,
        view_hidden: document.getElementById('view-status').hidden,
        summary: document.getElementById('status-summary').textContent,
        captions: [...document.querySelectorAll('#status-body caption')].map((c) => c.textContent),
        groups: [...document.querySelectorAll('#status-body table:first-child tbody tr')].map((tr) => tr.cells[0].textContent + ':' + tr.cells[2].textContent),
    };
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_view_is_for_admins_and_refreshes_while_open() {
    let Some(brokers) = common::brokers_or_skip() else { return };
    if !browser_or_skip() {
        return;
    }
    let (_pool, db) = common::fresh_pg().await;
    let prefix = common::unique_prefix();
    let up = Up { stages: "templating,persistence,gateway", ..Up::all(&brokers, &db, &prefix) };
    let mut gw =
        Tidings::spawn_env("all", &up, &[("TIDINGS_ADMIN_USERS", "root"), ("TIDINGS_STATUS_WINDOW_SECS", "20")]);
    let ep = gw.endpoints(Duration::from_secs(60)).await;
    let http = reqwest::Client::new();
    common::await_ready(&http, &ep.http, &[&gw]).await;

    let mut b = Browser::start(SNAPSHOT);
    sign_in(&mut b, &ep.http, "bob").await;
    let s = b.snapshot("bob").await;
    assert_eq!(s["tab_hidden"], true, "a plain user sees the Status tab: {s}");
    // Its address leads back to the inbox.
    b.eval("bob", "location.hash = '#/status'; return true").await;
    b.wait("bob", "the inbox", "return !document.getElementById('view-inbox').hidden").await;
    assert_eq!(b.snapshot("bob").await["view_hidden"], true);

    sign_in(&mut b, &ep.http, "root").await;
    b.wait("root", "the Status tab", "return !document.getElementById('tab-status').hidden").await;
    b.call("root", json!({"cmd": "press", "selector": "#tab-status", "key": "Enter"})).await;
    b.wait(
        "root",
        "the groups OK",
        "return document.getElementById('status-summary').textContent.startsWith('All groups OK')",
    )
    .await;
    let s = b.snapshot("root").await;
    assert_eq!(
        s["captions"],
        json!(["Groups", "Gateways", "Dead letters", "Instances", "Partitions and owners"]),
        "{s}"
    );
    let groups = s["groups"].as_array().unwrap();
    for want in ["templating:ok", "persistence:ok", "gateway:ok"] {
        assert!(groups.iter().any(|g| g == want), "no {want} in {s}");
    }
    // The gateway with bob's and root's streams.
    let rows = "[...document.querySelectorAll('#status-body table:nth-child(2) tbody tr')]";
    let js = format!(
        "return JSON.stringify({rows}.map((tr) => tr.cells[1].textContent + ' ' + tr.cells[2].textContent)) === {}",
        json!(json!([format!("{} 2", ep.http)]).to_string())
    );
    b.wait("root", "two streams on the gateway", &js).await;
    let s = b.snapshot("root").await;
    b.screenshot("root", "status").await;
    // Refreshed while open: the summary's time moves on.
    let first = s["summary"].as_str().unwrap().to_string();
    let js = format!("return document.getElementById('status-summary').textContent !== {}", json!(first));
    b.wait("root", "a refresh", &js).await;
    b.close().await;
    common::sigterm(&mut gw).await;
}
