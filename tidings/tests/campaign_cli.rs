//! `tidings campaign` on a SQLite store: every bad flag of a launch named at once with exit 64 and
//! nothing stored, a dry run's counts (overlapping segments, an inline user, an opt-out), a launch
//! without a reachable Kafka refused before anything is stored, and list / show / cancel exit codes.
//! Then on Apache Kafka and PostgreSQL beside a running `tidings up`: a launch fanned out and
//! stored, shown done by the CLI and the gateway's API, a retry and a conflicting launch.

mod common;

use serde_json::Value;
use std::process::{Command, Output};
use std::time::Duration;
use tidings_store::preferences::Preferences;
use tidings_store::Store;

struct Env {
    dir: tempfile::TempDir,
    url: String,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/tidings.db", dir.path().display());
        Env { dir, url }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_tidings"))
            .args(args)
            .env("TIDINGS_DATABASE_URL", &self.url)
            .env("TIDINGS_DATA_DIR", self.dir.path())
            .env("TIDINGS_TOPOLOGY", concat!(env!("CARGO_MANIFEST_DIR"), "/../topology.yaml"))
            .env_remove("TIDINGS_BROKERS")
            .env_remove("TIDINGS_SCHEMA_REGISTRY_URL")
            .output()
            .expect("run tidings")
    }

    fn segment(&self, name: &str, body: &str) {
        let file = self.dir.path().join(format!("{name}.csv"));
        std::fs::write(&file, body).unwrap();
        let o = self.run(&["segment", "import", name, file.to_str().unwrap()]);
        assert!(o.status.success(), "{}", text(&o));
    }

    async fn store(&self) -> Store {
        Store::connect(&self.url).await.unwrap()
    }
}

/// `campaign launch --title <title>` and `flags`, split at spaces (none of their values has one).
fn launch<'a>(title: &'a str, flags: &'a str) -> Vec<&'a str> {
    let mut args = vec!["campaign", "launch", "--title", title];
    args.extend(flags.split_whitespace());
    args
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[tokio::test]
async fn launch_flags_dry_run_and_exit_codes() {
    let env = Env::new();
    env.segment("a", "user_id\nu1\nu2\nu3\n");
    env.segment("b", "user_id\nu3\nu4\n");
    let out = Preferences { opt_out: vec!["campaigns".into()], ..Preferences::default() };
    env.store().await.set_preferences("u2", &out, 1).await.unwrap();

    // Every bad flag at once: exit 64, each named, nothing stored.
    let o = env.run(&[
        "campaign",
        "launch",
        "--category",
        "weather",
        "--title",
        "{{ recipient",
        "--body",
        "ok",
        "--segment",
        "a",
        "--segment",
        "nosuch",
        "--user",
        "",
        "--send-at",
        "2001-01-01T00:00:00Z",
        "--locale-title",
        "ko",
        "--id",
        "bad id",
    ]);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    for named in [
        "--category: unknown category \"weather\"",
        "--title: does not compile",
        "--segment \"nosuch\": no segment \"nosuch\"",
        "--user \"\": empty user id",
        "--send-at: 2001-01-01T00:00:00Z is in the past",
        "--locale-title: \"ko\" is not LOCALE=TEMPLATE",
        "--id: must be 1 to 128",
    ] {
        assert!(err.contains(named), "{named:?} in:\n{err}");
    }
    assert!(err.contains("refuses 7 flag(s); nothing was stored or produced"), "{err}");
    assert!(env.store().await.campaigns(None, 10).await.unwrap().is_empty());

    // A dry run: u1..u4 and u5 once each, u2 opted out.
    let flags = "--id spring --category campaigns --body Sale --segment a --segment b --user u5 --user u4";
    let o = env.run(&launch("Hi {{ recipient }}", &format!("{flags} --dry-run --json")));
    assert!(o.status.success(), "{}", text(&o));
    let answer: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((answer["audience"].as_u64(), answer["opted_out"].as_u64()), (Some(5), Some(1)), "{answer}");
    assert_eq!((answer["will_receive"].as_u64(), answer["estimated_send_ms"].as_u64()), (Some(4), Some(1)));
    let o = env.run(&launch("T", "--category campaigns --body B --segment a --dry-run"));
    assert!(text(&o).contains("audience 3 user(s), 1 opted out of campaigns, 2 will receive it"), "{}", text(&o));
    assert!(env.store().await.campaigns(None, 10).await.unwrap().is_empty(), "a dry run stored a campaign");

    // A real launch needs Kafka: without one it fails (exit 1) before anything is stored.
    let o = env.run(&launch("T", "--id spring --category campaigns --body B --user u1"));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("no running `tidings up` found"), "{}", text(&o));
    assert!(env.store().await.campaign("spring").await.unwrap().is_none());
}

#[tokio::test]
async fn list_show_and_cancel() {
    let env = Env::new();
    let store = env.store().await;
    for (id, at) in [("old", 1), ("new", 2)] {
        let c = tidings_store::campaigns::NewCampaign {
            campaign_id: id.into(),
            event_id: format!("campaign:{id}"),
            category: "campaigns".into(),
            definition: "{\"title\":\"T\"}".into(),
            send_at: None,
            created_at: at,
            launched_by: "test".into(),
            audience_estimate: Some(3),
        };
        assert!(store.insert_campaign(&c).await.unwrap());
    }
    let o = env.run(&["campaign", "list"]);
    assert!(o.status.success(), "{}", text(&o));
    let ids: Vec<String> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| l.split('\t').next().unwrap().to_string()).collect();
    assert_eq!(ids, ["new", "old"]);
    let o = env.run(&["campaign", "show", "old", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let shown: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((shown["status"].as_str(), shown["definition"]["title"].as_str()), (Some("sending"), Some("T")));
    let o = env.run(&["campaign", "show", "nosuch"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("no campaign \"nosuch\""), "{}", text(&o));
    let o = env.run(&["campaign", "cancel", "nosuch"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("no campaign \"nosuch\""), "{}", text(&o));
    // Done: nothing left to cancel.
    let Store::Sqlite(pool) = &store else { unreachable!() };
    sqlx::query(
        "INSERT INTO campaign_progress (campaign_id, event_id, started_at, updated_at, finished_at) \
         VALUES ('old', 'campaign:old', 1, 1, 2)",
    )
    .execute(pool)
    .await
    .unwrap();
    let o = env.run(&["campaign", "cancel", "old"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("is done"), "{}", text(&o));
    assert!(store.campaign("old").await.unwrap().unwrap().cancelled_at.is_none());
}

#[tokio::test]
async fn a_launch_reaches_its_users_through_a_running_tidings_up() {
    let Some(brokers) = common::brokers_or_skip() else { return };
    let (_pool, db) = common::fresh_pg().await;
    let prefix = common::unique_prefix();
    let mut up = common::Tidings::spawn("campaign-cli", &common::Up::all(&brokers, &db, &prefix));
    let ep = up.endpoints(Duration::from_secs(60)).await;
    let http = reqwest::Client::new();
    common::await_ready(&http, &ep.http, &[&up]).await;
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tidings"))
            .args(args)
            .args(["--brokers", &ep.brokers, "--schema-registry-url", &ep.schema_registry_url])
            .args(["--database-url", &ep.database_url, "--topic-prefix", &ep.topic_prefix])
            .arg("--topology")
            .arg(common::topology_path())
            .output()
            .expect("run tidings")
    };
    let launch = ["campaign", "launch", "--id", "cli-1", "--category", "campaigns", "--title", "Hi {{ recipient }}"];
    let o = cli(&[&launch[..], &["--body", "Sale", "--user", "cli-a", "--user", "cli-b", "--json"]].concat());
    assert!(o.status.success(), "{}\n{}", text(&o), up.log_tail(30));
    let answer: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((answer["status"].as_str(), answer["will_receive"].as_u64()), (Some("sending"), Some(2)), "{answer}");

    // Fanned out and stored: done with both stored, as the CLI and the API show it.
    let shown = common::eventually(
        "the campaign to be done",
        Duration::from_secs(60),
        Duration::from_millis(300),
        &[&up],
        || async {
            let o = cli(&["campaign", "show", "cli-1", "--json"]);
            let v: Value = serde_json::from_slice(&o.stdout).map_err(|e| format!("{e}: {}", text(&o)))?;
            if v["status"] == "done" && v["counts"]["stored"] == 2 {
                Ok(v)
            } else {
                Err(v.to_string())
            }
        },
    )
    .await;
    assert_eq!(shown["counts"]["produced"], 2, "{shown}");
    let api =
        common::get_json(&http, &format!("{}/v1/campaigns/cli-1", ep.http), common::ingest_token()).await.unwrap();
    assert_eq!(
        (api["status"].as_str(), api["launched_by"].as_str().map(|l| l.starts_with("cli"))),
        (Some("done"), Some(true)),
        "{api}"
    );

    // The same launch again is a retry; another definition under the id is refused; done cannot be cancelled.
    let o = cli(&[&launch[..], &["--body", "Sale", "--user", "cli-b", "--user", "cli-a"]].concat());
    assert!(o.status.success() && text(&o).contains("was launched before"), "{}", text(&o));
    let o = cli(&[&launch[..], &["--body", "Other", "--user", "cli-a"]].concat());
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("another campaign with id \"cli-1\" exists"), "{}", text(&o));
    let o = cli(&["campaign", "cancel", "cli-1"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(common::count_notifications(&_pool).await, 2, "the retry produced nothing new");
    common::sigterm(&mut up).await;
}
