//! The web page's coupon drop in headless Chromium (driven through `tests/browser/page.mjs`) on
//! Apache Kafka and PostgreSQL, under `tidings up --stages templating,persistence,claims,gateway`:
//! two users race for a coupon with stock 1, one on a phone viewport claiming by keyboard. Exactly
//! one page shows the coupon issued with its code and the other "sold out", both live, the API
//! agrees, the stock shows 0 on both pages and the winner's inbox holds the coupon. Once with the
//! claims answered within the claim wait, once with every claim answered 202 pending (settled on
//! the pages by their streams and `GET …/claims/me`). Screenshots go to `target/browser/`.

mod common;

use common::browser::Browser;
use common::{await_ready, browser_or_skip, eventually, fresh_pg, unique_prefix, Tidings, Up};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The whole test, beyond which it fails (every process is killed on the way out).
const WHOLE: Duration = Duration::from_secs(240);

/// What the test reads of the coupon drop: per coupon its stock left, button and outcome; the
/// live region; where the focus is; the inbox.
const DROP: &str = r#"
    const items = [...document.querySelectorAll('#coupon-list li')].map((li) => {
        const b = li.querySelector('button.claim');
        const o = li.querySelector('.outcome');
        const code = o.querySelector('.code');
        return {
            id: li.dataset.couponId,
            status: li.dataset.status,
            left: li.querySelector('.stock').dataset.left,
            stock_text: li.querySelector('.stock').textContent,
            button: b.textContent,
            button_disabled: b.getAttribute('aria-disabled') === 'true',
            outcome: o.dataset.outcome,
            outcome_text: o.textContent,
            code: code ? code.textContent : null,
        };
    });
    const inbox = [...document.querySelectorAll('#inbox-list li')];
    return {
        conn: document.getElementById('conn').dataset.state,
        coupons: items,
        live: document.getElementById('coupon-live').textContent,
        focus: document.activeElement ? document.activeElement.outerHTML : null,
        inbox_kinds: inbox.map((li) => li.dataset.kind),
        inbox_text: inbox.map((li) => li.textContent),
        badge_hidden: document.getElementById('inbox-badge').hidden,
        last_event_id: sessionStorage.getItem('tidings.lastEventId'),
    };
"#;

/// JS: the coupon's item (a selector).
fn item(id: &str) -> String {
    format!("#coupon-list li[data-coupon-id='{id}']")
}

/// JS body: true once `id`'s claim outcome is decided on the page (not claiming or pending).
fn decided(id: &str) -> String {
    format!(
        "const o = document.querySelector({}); return o && ['issued', 'sold_out', 'already_claimed', 'not_open', \
         'closed', 'unknown_coupon', 'failed'].includes(o.dataset.outcome) && o.dataset.outcome",
        json!(format!("{} .outcome", item(id)))
    )
}

/// JS body: true once the page shows `id` with `left` in stock.
fn stock_shows(id: &str, left: u32) -> String {
    format!(
        "const s = document.querySelector({}); return s !== null && s.dataset.left === '{left}'",
        json!(format!("{} .stock", item(id)))
    )
}

/// `GET path` on the gateway with `user`'s token: status and JSON body (null if none).
async fn get(http: &reqwest::Client, url: &str, path: &str, user: &str) -> (u16, Value) {
    let r = http.get(format!("{url}{path}")).bearer_auth(common::user_token(user)).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// `user`'s decided claim of `coupon` (`GET …/claims/me`). The claim stage produces its decisions
/// before its batch commits to the store, which the endpoint reads: a 404 `no_decided_claim` for
/// a moment after the decision answered the claim is waited out.
async fn decided_claim(http: &reqwest::Client, url: &str, coupon: &str, user: &str, proc_: &Tidings) -> Value {
    let path = format!("/v1/coupons/{coupon}/claims/me");
    eventually(
        "the decided claim in the store",
        Duration::from_secs(20),
        Duration::from_millis(100),
        &[proc_],
        || async {
            match get(http, url, &path, user).await {
                (200, me) => Ok(me),
                (404, e) if e["error"]["code"] == "no_decided_claim" => Err(format!("{user}: {e}")),
                other => panic!("GET {path} as {user}: {other:?}"),
            }
        },
    )
    .await
}

/// How the gateway answers the claims of the race.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Answer {
    /// Within the default claim wait (500 ms): 201 issued / 409 sold_out, usually.
    Decided,
    /// A claim wait of 0: every claim answers 202 pending, and the pages learn the decisions from
    /// their streams and `GET …/claims/me`.
    Pending,
}

/// The two tests here run one at a time: each runs Chromium and `tidings up` on shared cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn race_test(answer: Answer) {
    let Some(brokers) = common::brokers_or_skip() else { return };
    if !browser_or_skip() {
        return;
    }
    let _one = SERIAL.lock().await;
    tokio::time::timeout(WHOLE, race(brokers, answer))
        .await
        .unwrap_or_else(|_| panic!("the coupon page test ({answer:?}) did not finish in time"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_race_for_the_last_coupon_and_both_pages_show_the_outcome_live() {
    race_test(Answer::Decided).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_race_answered_pending_is_settled_live_on_both_pages() {
    race_test(Answer::Pending).await;
}

async fn race(brokers: String, answer: Answer) {
    let started = Instant::now();
    let (_pool, db) = fresh_pg().await;
    let prefix = unique_prefix();
    let up = Up {
        brokers: &brokers,
        database_url: &db,
        prefix: &prefix,
        stages: "templating,persistence,claims,gateway",
        registry_url: None,
    };
    let wait = if answer == Answer::Pending { "0" } else { "500" };
    let mut tidings = Tidings::spawn_env("drop", &up, &[("TIDINGS_COUPON_CLAIM_WAIT_MS", wait)]);
    let ep = tidings.endpoints(Duration::from_secs(60)).await;
    let url = ep.http.clone();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    await_ready(&http, &url, &[&tidings]).await;

    // The coupon: stock 1, open from now for an hour, created with the service credential.
    let coupon = format!("last-one-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let closes = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let body = json!({"id": coupon, "title": "Last one", "discount_percent": 30, "stock": 1,
        "claim_closes_at": closes, "valid_for_secs": 86_400});
    let r = http
        .post(format!("{url}/v1/coupons"))
        .bearer_auth(common::ingest_token())
        .json(&body)
        .send()
        .await
        .expect("POST /v1/coupons");
    let status = r.status().as_u16();
    let created = r.text().await.unwrap_or_default();
    assert!(status == 201 || status == 202, "creating the coupon: {status} {created}\n{}", tidings.log_tail(30));
    // A 202 (not decided within the wait): the store has it shortly.
    eventually(
        "the coupon to be open with stock 1",
        Duration::from_secs(30),
        Duration::from_millis(200),
        &[&tidings],
        || {
            let (http, url, coupon) = (&http, &url, &coupon);
            async move {
                match get(http, url, &format!("/v1/coupons/{coupon}"), "nobody").await {
                    (200, c) if c["status"] == "open" && c["stock_left"] == 1 => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;

    eprintln!("coupon {coupon} open after {:?}", started.elapsed());

    // Both users' streams over the API too, from before the race: the decisions they carry.
    let streams = reqwest::Client::new();
    let mut seen = std::collections::HashMap::new();
    for user in ["alice", "bob"] {
        seen.insert(user, common::open_stream(&streams, &url, user, None).await);
    }

    // Alice on a desktop with the mouse, Bob on a phone with the keyboard only.
    let mut b = Browser::start(DROP);
    for (user, width, height) in [("alice", 1280, 800), ("bob", 390, 844)] {
        let status =
            b.call(user, json!({"cmd": "open", "url": format!("{url}/"), "width": width, "height": height})).await;
        assert_eq!(status, 200);
        b.wait(user, "the page to start", "return document.body.dataset.ready === '1'").await;
        b.call(user, json!({"cmd": "fill", "selector": "#dev-user", "value": user})).await;
        b.call(user, json!({"cmd": "press", "selector": "#dev-user", "key": "Enter"})).await;
        b.wait(user, "the stream to be live", "return document.getElementById('conn').dataset.state === 'live'").await;
    }
    b.call("alice", json!({"cmd": "click", "selector": "#tab-coupons"})).await;
    b.call("bob", json!({"cmd": "press", "selector": "#tab-coupons", "key": "Enter"})).await;
    let button = format!("{} button.claim", item(&coupon));
    for user in ["alice", "bob"] {
        b.wait(user, "the coupon with 1 left", &stock_shows(&coupon, 1)).await;
        b.wait(
            user,
            "its Claim button to be enabled",
            &format!(
                "const b = document.querySelector({}); return b && b.getAttribute('aria-disabled') === 'false'",
                json!(button)
            ),
        )
        .await;
    }
    b.screenshot("bob", "coupon-drop-before").await;
    // From the view's heading (where the tab put the focus), one Tab reaches the Claim button.
    b.call("bob", json!({"cmd": "key", "key": "Tab"})).await;
    let focused =
        b.eval("bob", &format!("return document.activeElement === document.querySelector({})", json!(button))).await;
    assert_eq!(
        focused,
        true,
        "Tab from the coupon view's heading does not reach the Claim button: {}",
        b.eval("bob", DROP).await
    );

    eprintln!("both pages show it after {:?}", started.elapsed());
    // The race: Bob presses Enter and Alice clicks, at the same time.
    b.call(
        "bob",
        json!({"cmd": "together", "steps": [
            {"ctx": "bob", "cmd": "key", "key": "Enter"},
            {"ctx": "alice", "cmd": "click", "selector": button},
        ]}),
    )
    .await;
    let mut outcome = std::collections::HashMap::new();
    for user in ["alice", "bob"] {
        let o = b.wait(user, "the claim's outcome", &decided(&coupon)).await;
        outcome.insert(user, o.as_str().unwrap().to_string());
    }
    let winners: Vec<&str> = ["alice", "bob"].into_iter().filter(|u| outcome[u] == "issued").collect();
    assert_eq!(winners.len(), 1, "exactly one page shows the coupon issued: {outcome:?}");
    let (winner, loser) = if winners[0] == "alice" { ("alice", "bob") } else { ("bob", "alice") };
    assert_eq!(outcome[loser], "sold_out", "the other page shows it sold out: {outcome:?}");
    eprintln!("{winner} won, {loser} was told it is sold out ({:?} in)", started.elapsed());

    // What each page says, in words and in its live region.
    let w = b.eval(winner, DROP).await;
    let code =
        w["coupons"][0]["code"].as_str().unwrap_or_else(|| panic!("no code on {winner}'s page: {w}")).to_string();
    assert!(!code.is_empty(), "{w}");
    assert!(w["coupons"][0]["outcome_text"].as_str().unwrap().starts_with("Yours! Code"), "{w}");
    assert!(w["live"].as_str().unwrap().contains(&code), "{winner}'s live region does not say the code: {w}");
    let l = b.eval(loser, DROP).await;
    assert!(l["coupons"][0]["outcome_text"].as_str().unwrap().starts_with("Sold out"), "{l}");
    assert!(l["live"].as_str().unwrap().contains("Sold out"), "{loser}'s live region: {l}");
    assert_eq!(l["coupons"][0]["code"], Value::Null, "{l}");

    // The API agrees: the winner holds that code, the loser's claim was rejected as sold out, and
    // the coupon has none left.
    let me = decided_claim(&http, &url, &coupon, winner, &tidings).await;
    assert_eq!((me["status"].as_str(), me["code"].as_str()), (Some("issued"), Some(code.as_str())), "{me}");
    let me = decided_claim(&http, &url, &coupon, loser, &tidings).await;
    assert_eq!((me["status"].as_str(), me["reason"].as_str()), (Some("rejected"), Some("sold_out")), "{me}");
    eventually("the coupon to be sold out", Duration::from_secs(20), Duration::from_millis(200), &[&tidings], || {
        let (http, url, coupon) = (&http, &url, &coupon);
        async move {
            match get(http, url, &format!("/v1/coupons/{coupon}"), winner).await {
                (200, c) if c["status"] == "sold_out" && c["stock_left"] == 0 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;

    // Both pages come to show the stock at 0 by themselves (their refreshes), the buttons say why.
    for user in ["alice", "bob"] {
        b.wait(user, "the stock to show 0", &stock_shows(&coupon, 0)).await;
    }
    let w = b.eval(winner, DROP).await;
    assert_eq!(
        (w["coupons"][0]["button"].as_str(), &w["coupons"][0]["button_disabled"]),
        (Some("Claimed"), &json!(true)),
        "{w}"
    );
    let l = b.eval(loser, DROP).await;
    assert_eq!(
        (l["coupons"][0]["button"].as_str(), &l["coupons"][0]["button_disabled"]),
        (Some("Sold out"), &json!(true)),
        "{l}"
    );
    // The keyboard user's focus stayed on the button through the claim.
    let focused =
        b.eval("bob", &format!("return document.activeElement === document.querySelector({})", json!(button))).await;
    assert_eq!(focused, true, "bob's focus left the Claim button: {}", b.eval("bob", DROP).await);
    b.screenshot(winner, &format!("coupon-drop-won-{winner}")).await;
    b.screenshot(loser, &format!("coupon-drop-lost-{loser}")).await;

    // The streams carried the decisions: coupon.issued to the winner, the sold-out rejection (with
    // the claim's id) to the loser.
    let decision = |user: &'static str, kind: &'static str| {
        let seen = seen[user].clone();
        move || {
            let seen = seen.clone();
            async move {
                let all = seen.0.lock().unwrap().clone();
                all.iter()
                    .find(|(e, ..)| e == kind)
                    .map(|(_, data, id)| (data.clone(), id.clone()))
                    .ok_or(format!("{all:?}"))
            }
        }
    };
    let procs = [&tidings];
    let (issued, _) = eventually(
        "coupon.issued on the winner's stream",
        Duration::from_secs(20),
        Duration::from_millis(100),
        &procs,
        decision(winner, "coupon.issued"),
    )
    .await;
    assert!(issued["body"].as_str().unwrap().contains(&code), "{issued}");
    let (rejected, rejected_at) = eventually(
        "coupon.claim_rejected on the loser's stream",
        Duration::from_secs(20),
        Duration::from_millis(100),
        &procs,
        decision(loser, "coupon.claim_rejected"),
    )
    .await;
    let p = &rejected["event"]["payload"];
    let p = if p["ClaimRejected"].is_object() { &p["ClaimRejected"] } else { p };
    assert_eq!((p["user_id"].as_str(), p["reason"].as_str()), (Some(loser), Some("sold_out")), "{rejected}");

    // The winner's inbox holds the coupon, with its code; the loser's page heard the rejection
    // (its stream position passed it) and kept it out of the inbox, which stays empty.
    b.call(winner, json!({"cmd": "click", "selector": "#tab-inbox"})).await;
    b.wait(
        winner,
        "the coupon in the inbox",
        &format!(
            "return [...document.querySelectorAll(\"#inbox-list li[data-kind='coupon.issued']\")].some((li) => li.textContent.includes({}))",
            json!(code)
        ),
    )
    .await;
    b.screenshot(winner, &format!("coupon-drop-inbox-{winner}")).await;
    b.wait(
        loser,
        "the page's stream to pass the rejection",
        &format!(
            "const [p, o] = (sessionStorage.getItem('tidings.lastEventId') || '').split('.').map(Number); \
             const [rp, ro] = {}.split('.').map(Number); return p === rp && o >= ro",
            json!(rejected_at)
        ),
    )
    .await;
    let l = b.eval(loser, DROP).await;
    assert_eq!(
        (&l["inbox_kinds"], &l["badge_hidden"]),
        (&json!([]), &json!(true)),
        "a rejection is not an inbox item: {l}"
    );
    // No second decision turned up on either page meanwhile.
    for user in ["alice", "bob"] {
        let s = b.eval(user, DROP).await;
        assert_eq!(s["coupons"][0]["outcome"], if user == winner { "issued" } else { "sold_out" }, "{s}");
    }
    if answer == Answer::Pending {
        // The gateway did answer claims 202 (so the pages settled them from pending): one more
        // claim, by a third user, over the API.
        let r = http
            .post(format!("{url}/v1/coupons/{coupon}/claims"))
            .bearer_auth(common::user_token("carol"))
            .header("Idempotency-Key", "carol-1")
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let location = r.headers().get("location").map(|v| v.to_str().unwrap().to_string());
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(
            (status, body["status"].as_str(), location.as_deref()),
            (202, Some("pending"), Some(format!("/v1/coupons/{coupon}/claims/me").as_str())),
            "{body}"
        );
    }
    eprintln!("coupon page test ({answer:?}) done in {:?}", started.elapsed());
    b.close().await;
    common::sigterm(&mut tidings).await;
}
