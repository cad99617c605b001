//! Held and scheduled sends on a real broker and PostgreSQL: one `tidings up` runs templating,
//! persistence and the gateway, another only the scheduler, its clock a file the test writes.
//! A campaign inside a user's quiet hours is held (a critical notification is not) and released
//! once after the window, within the spread; a campaign launched through the campaign API with a
//! later send_at is held whole, survives scheduler restarts (SIGTERM, SIGKILL) and reaches every
//! user once when its time comes.

mod common;

use chrono::{DateTime, Duration as Span, Timelike, Utc};
use common::{eventually, open_stream, user_token, Endpoints, Tidings, Up};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tidings_core::Notification;

/// What `stages.scheduler.release_spread_ms` of topology.yaml says (the default).
const SPREAD: Span = Span::minutes(30);

/// One test's `tidings up` of templating, persistence and the gateway on a fresh database, ready,
/// and the schedulers' clock: a file set to `now`.
struct Main {
    brokers: String,
    pool: sqlx::PgPool,
    db_url: String,
    prefix: String,
    main: Tidings,
    ep: Endpoints,
    http: reqwest::Client,
    clock: PathBuf,
    now: DateTime<Utc>,
    _dir: tempfile::TempDir,
}

impl Main {
    /// `None` where the test is skipped (no broker).
    async fn start(name: &str) -> Option<Main> {
        let brokers = common::brokers_or_skip()?;
        let (pool, db_url) = common::fresh_pg().await;
        let prefix = common::unique_prefix();
        let mut main = Tidings::spawn(name, &Up::all(&brokers, &db_url, &prefix));
        let ep = main.endpoints(Duration::from_secs(60)).await;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().unwrap();
        common::await_ready(&http, &ep.http, &[&main]).await;
        let dir = tempfile::tempdir().unwrap();
        let clock = dir.path().join("now");
        let now = Utc::now();
        set_clock(&clock, now);
        Some(Main { brokers, pool, db_url, prefix, main, ep, http, clock, now, _dir: dir })
    }

    /// A scheduler process beside it, using its registry, its clock the file `clock`.
    fn scheduler(&self, name: &str) -> Tidings {
        let up = Up {
            brokers: &self.brokers,
            database_url: &self.db_url,
            prefix: &self.prefix,
            stages: "scheduler",
            registry_url: Some(&self.ep.schema_registry_url),
        };
        Tidings::spawn_env(name, &up, &[("TIDINGS_CLOCK_FILE", self.clock.to_str().unwrap())])
    }
}

fn set_clock(clock: &Path, at: DateTime<Utc>) {
    // Written whole then renamed: the scheduler never reads half a time.
    let tmp = clock.with_extension("tmp");
    std::fs::write(&tmp, at.to_rfc3339()).unwrap();
    std::fs::rename(&tmp, clock).unwrap();
}

/// The scheduler's rows: (release id, destination, release at, released at).
async fn scheduled(pool: &sqlx::PgPool) -> Vec<(String, String, i64, Option<i64>)> {
    sqlx::query_as("SELECT release_id, release_to, release_at, released_at FROM scheduled_releases ORDER BY release_id")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Waits until the scheduler holds exactly one row: that row.
async fn held_one(pool: &sqlx::PgPool, procs: &[&Tidings]) -> (String, String, i64, Option<i64>) {
    eventually("the campaign held", Duration::from_secs(30), Duration::from_millis(200), procs, || async {
        match scheduled(pool).await.as_slice() {
            [row] => Ok(row.clone()),
            rows => Err(format!("{rows:?}")),
        }
    })
    .await
}

/// Waits (`within`) until the store holds `n` notifications.
async fn await_stored(what: &str, pool: &sqlx::PgPool, n: i64, within: Duration, procs: &[&Tidings]) {
    eventually(what, within, Duration::from_millis(200), procs, || async {
        match common::count_notifications(pool).await {
            count if count == n => Ok(()),
            count => Err(format!("{count} rows")),
        }
    })
    .await;
}

/// A CampaignLaunched event for `campaigns` (ingest's JSON), to `users`, sent at `send_at` or now.
fn campaign(id: &str, title: &str, users: &[String], send_at: Option<i64>) -> serde_json::Value {
    json!({"event_id": format!("campaign:{id}"), "occurred_at": Utc::now().timestamp_micros(), "campaign_id": id,
        "payload": {"CampaignLaunched": {"category": "campaigns", "title": title, "body": "Hello {{ recipient }}",
        "link": null, "default_locale": "en", "locales": [], "segments": [], "user_ids": users,
        "send_at": send_at, "launched_by": "scheduler-e2e"}}})
}

/// Streams are read for minutes: no overall timeout on their client.
fn stream_client() -> reqwest::Client {
    reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_in_quiet_hours_is_held_and_released_once_after_the_window() {
    let Some(mut setup) = Main::start("quiet-main").await else { return };
    let Main { brokers, pool, prefix, ep, http, clock, now, .. } = &setup;
    let now = *now;
    let mut sched = setup.scheduler("quiet-scheduler");
    sched.endpoints(Duration::from_secs(60)).await;

    // Quiet hours from an hour ago to an hour from now in Seoul (UTC+9, no daylight saving time).
    let user = "qh-user";
    let local = now + Span::hours(9);
    let minute = |t: DateTime<Utc>| format!("{:02}:{:02}", t.hour(), t.minute());
    let window_end = now.with_second(0).unwrap().with_nanosecond(0).unwrap() + Span::hours(1);
    let prefs = json!({"opt_out": [], "time_zone": "Asia/Seoul",
        "quiet_hours": {"start": minute(local - Span::hours(1)), "end": minute(local + Span::hours(1))}});
    let put = http
        .put(format!("{}/v1/me/preferences", ep.http))
        .bearer_auth(user_token(user))
        .json(&prefs)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status().as_u16(), 200, "{}", put.text().await.unwrap());

    let stream = open_stream(&stream_client(), &ep.http, user, None).await;
    let id = uuid::Uuid::new_v4().to_string();
    common::accept(http, &ep.ingest, "campaigns", &campaign(&id, "Night sale", &[user.to_string()], None), &setup.main)
        .await;
    let paid = json!({"event_id": uuid::Uuid::new_v4().to_string(), "occurred_at": Utc::now().timestamp_micros(),
        "order_id": "o-qh-1", "buyer_id": user, "locale": null,
        "payload": {"OrderPaid": {"amount_cents": 1200, "currency": "EUR", "payment_method": "card"}}});
    common::accept(http, &ep.ingest, "orders", &paid, &setup.main).await;

    // The payment (critical) arrives at once; the campaign is held by the scheduler.
    let procs = [&setup.main, &sched];
    eventually("the payment, live", Duration::from_secs(30), Duration::from_millis(100), &procs, || async {
        match stream.named(|e| e == "order.paid").len() {
            1 => Ok(()),
            n => Err(format!("{n} order.paid: {:?}", stream.names())),
        }
    })
    .await;
    let notification_id = Notification::id_for(&format!("campaign:{id}"), user).to_string();
    let held = held_one(pool, &procs).await;
    assert_eq!(
        (held.0.as_str(), held.1.as_str()),
        (notification_id.as_str(), format!("{prefix}notifications").as_str())
    );
    let release_at = held.2;
    let (end, last) = (window_end.timestamp_micros(), (window_end + SPREAD).timestamp_micros());
    assert!((end..last).contains(&release_at), "released at {release_at}, not within the spread after {end}");
    assert_eq!(held.3, None, "not released yet");
    await_stored("the payment stored", pool, 1, Duration::from_secs(30), &procs).await;
    let stored: Vec<(String,)> = sqlx::query_as("SELECT kind FROM notifications").fetch_all(pool).await.unwrap();
    assert_eq!(stored, vec![("order.paid".to_string(),)], "only the payment is in the inbox");
    assert!(stream.named(|e| e == "campaign").is_empty(), "{:?}", stream.names());

    // The clock passes the window's end and the spread: released, once.
    set_clock(clock, window_end + SPREAD + Span::minutes(1));
    eventually("the campaign, live", Duration::from_secs(30), Duration::from_millis(100), &procs, || async {
        match stream.named(|e| e == "campaign").len() {
            1 => Ok(()),
            n => Err(format!("{n} campaign: {:?}", stream.names())),
        }
    })
    .await;
    await_stored("both stored", pool, 2, Duration::from_secs(30), &procs).await;
    let got = &stream.named(|e| e == "campaign")[0].1;
    assert_eq!(got["id"], json!(notification_id));
    assert_eq!(got["title"], "Night sale");
    let row = scheduled(pool).await.remove(0);
    assert!(row.3.is_some(), "marked released: {row:?}");
    // A few more ticks (1 s each) change nothing: one campaign record on the topic, one row.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let records: i64 = common::high_watermarks(brokers, &format!("{prefix}notifications")).await.iter().sum();
    assert_eq!(records, 2, "the payment and the released campaign, each once");
    assert_eq!(stream.named(|e| e == "campaign").len(), 1);
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT kind, user_id FROM notifications ORDER BY kind").fetch_all(pool).await.unwrap();
    assert_eq!(rows, vec![("campaign".into(), user.into()), ("order.paid".into(), user.into())]);

    common::sigterm(&mut sched).await;
    common::sigterm(&mut setup.main).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_campaign_waits_for_send_at_through_scheduler_restarts() {
    let Some(mut setup) = Main::start("scheduled-main").await else { return };
    let Main { brokers, pool, prefix, ep, http, clock, now, .. } = &setup;
    let now = *now;
    let start = |name: &str| setup.scheduler(name);
    let mut sched = start("scheduler-1");
    sched.endpoints(Duration::from_secs(60)).await;

    let users: Vec<String> = (0..25).map(|i| format!("sc{i:02}")).collect();
    let id = uuid::Uuid::new_v4().to_string();
    let send_at = now + Span::hours(1);
    // Launched through the campaign API (a service token), for later.
    let api = format!("{}/v1/campaigns", ep.http);
    let body = json!({"campaign_id": id, "category": "campaigns", "title": "Tomorrow's sale",
        "body": "Hello {{ recipient }}", "audience": {"user_ids": users}, "send_at": send_at.to_rfc3339()});
    let resp = http.post(&api).bearer_auth(common::ingest_token()).json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    let launched: serde_json::Value = resp.json().await.unwrap();
    assert_eq!((status, &launched["status"]), (201, &json!("scheduled")), "{launched}");
    let show = || async {
        let resp = http.get(format!("{api}/{id}")).bearer_auth(common::ingest_token()).send().await.unwrap();
        resp.json::<serde_json::Value>().await.unwrap()
    };
    let event_id = format!("campaign:{id}");
    let held = held_one(pool, &[&setup.main, &sched]).await;
    assert_eq!(held, (event_id.clone(), format!("{prefix}campaigns"), send_at.timestamp_micros(), None));

    // Restarts of the scheduler before send_at: a clean one, then a kill -9.
    common::sigterm(&mut sched).await;
    let mut sched = start("scheduler-2");
    sched.endpoints(Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    sched.kill9();
    let mut sched = start("scheduler-3");
    sched.endpoints(Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(common::count_notifications(pool).await, 0, "nothing before send_at");
    assert_eq!(scheduled(pool).await, vec![held.clone()], "still held, once");
    assert_eq!(show().await["status"], "scheduled");

    set_clock(clock, send_at + Span::seconds(1));
    let procs = [&setup.main, &sched];
    await_stored("every user's notification", pool, 25, Duration::from_secs(60), &procs).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rows: Vec<(uuid::Uuid, String, String)> =
        sqlx::query_as("SELECT id, user_id, kind FROM notifications ORDER BY user_id").fetch_all(pool).await.unwrap();
    assert_eq!(
        rows.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(),
        users.iter().map(String::as_str).collect::<Vec<_>>()
    );
    for (nid, user, kind) in &rows {
        assert_eq!((*nid, kind.as_str()), (Notification::id_for(&event_id, user), "campaign"), "{user}");
    }
    let shown = show().await;
    assert_eq!((&shown["status"], &shown["counts"]["stored"]), (&json!("done"), &json!(25)), "{shown}");
    let released = scheduled(pool).await.remove(0);
    assert!(released.3.is_some(), "marked released: {released:?}");
    // The launch and its one release: the campaign went through templating twice, no more.
    let records: i64 = common::high_watermarks(brokers, &format!("{prefix}campaigns")).await.iter().sum();
    assert_eq!(records, 2, "the launch and one release");

    common::sigterm(&mut sched).await;
    common::sigterm(&mut setup.main).await;
}

/// Whether `group` is stable with `n` members, each holding partitions.
fn group_split(brokers: &str, group: &str, n: usize) -> Result<(), String> {
    use rdkafka::consumer::Consumer;
    let client: rdkafka::consumer::BaseConsumer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).create().map_err(|e| e.to_string())?;
    let list = client.fetch_group_list(Some(group), Duration::from_secs(10)).map_err(|e| e.to_string())?;
    let g = list.groups().first().ok_or("no group")?;
    let assigned = g.members().iter().filter(|m| m.assignment().is_some_and(|a| a.len() > 8)).count();
    match (g.state(), g.members().len(), assigned) {
        ("Stable", m, a) if m == n && a == n => Ok(()),
        (state, m, a) => Err(format!("{state}: {m} members, {a} with partitions")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schedulers_split_the_partitions_and_release_each_campaign_once() {
    let Some(mut setup) = Main::start("split-main").await else { return };
    let Main { brokers, pool, prefix, ep, http, clock, now, .. } = &setup;
    let now = *now;
    let mut a = setup.scheduler("scheduler-a");
    let mut b = setup.scheduler("scheduler-b");
    a.endpoints(Duration::from_secs(60)).await;
    b.endpoints(Duration::from_secs(60)).await;
    let group = format!("{prefix}tidings-scheduler");
    let procs = [&setup.main, &a, &b];
    eventually(
        "the schedulers to split the partitions",
        Duration::from_secs(60),
        Duration::from_millis(500),
        &procs,
        || async { group_split(brokers, &group, 2) },
    )
    .await;

    // Twelve campaigns for later (on the partitions of both), two users each.
    let send_at = now + Span::hours(2);
    // Two campaigns on each of the 6 partitions of `campaigns` (keyed by campaign id), so both
    // schedulers hold some.
    let mut per_partition = [0; 6];
    let ids: Vec<String> = std::iter::repeat_with(|| uuid::Uuid::new_v4().to_string())
        .filter(|id| {
            let p = tidings_core::kafka::partition_for(id, 6) as usize;
            per_partition[p] += 1;
            per_partition[p] <= 2
        })
        .take(12)
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let users = [format!("sp{i:02}a"), format!("sp{i:02}b")];
        let launched = campaign(id, "Split sale", &users, Some(send_at.timestamp_micros()));
        common::accept(http, &ep.ingest, "campaigns", &launched, &setup.main).await;
    }
    eventually("12 campaigns held", Duration::from_secs(30), Duration::from_millis(200), &procs, || async {
        match scheduled(pool).await.len() {
            12 => Ok(()),
            n => Err(format!("{n} held")),
        }
    })
    .await;
    group_split(brokers, &group, 2).expect("still split");
    set_clock(clock, send_at + Span::seconds(1));
    await_stored("every user's notification", pool, 24, Duration::from_secs(60), &procs).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(scheduled(pool).await.iter().all(|r| r.3.is_some()), "all marked released");
    // Each campaign's launch and its one release: no partition was released by both.
    let records: i64 = common::high_watermarks(brokers, &format!("{prefix}campaigns")).await.iter().sum();
    assert_eq!(records, 24, "12 launches and 12 releases");
    assert_eq!(common::count_notifications(pool).await, 24);
    // Each scheduler released what its partitions held.
    for s in [&a, &b] {
        let log = s.log_tail(400);
        assert!(log.contains(&format!("to {prefix}campaigns.")), "{} released nothing:\n{log}", s.name);
    }
    common::sigterm(&mut a).await;
    common::sigterm(&mut b).await;
    common::sigterm(&mut setup.main).await;
}
