//! A campaign to 100,000 users exactly once, on Apache Kafka and PostgreSQL: a segment of 100,020
//! users imported from a CSV file with `tidings segment import`, 20 of them opted out of
//! `campaigns`; the dry run's will_receive; the launch through `POST /v1/campaigns`; templating
//! (its own `tidings up --stages templating` process) SIGKILLed once its checkpoint counts three
//! pages produced, and started again. Afterwards: the campaign is `done` with the counts of one
//! pass and stored = will_receive; one stored row per recipient with its own id, none for the
//! opted-out users; each of the 300 users connected over SSE got it once (the opted-out ones
//! none, and a second campaign behind it shows nothing more was coming); and on the
//! notifications topic each notification the checkpoint covered at the kill is there once, so
//! the restart resumed after its cursor (a restart from the start would produce them again; a
//! skipped page shows in the produced count and the stored rows).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{eventually, open_stream, user_token, Seen, Tidings, Up};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Value as Json};
use tidings_core::Notification;

/// Users who get the campaign.
const RECIPIENTS: usize = 100_000;
/// Users of the segment who opted out of `campaigns`, spread over the audience's pages.
const OPTED_OUT: usize = 20;
/// Users with an open stream: every 333rd of the segment and 5 of the opted-out ones.
const CONNECTED: usize = 300;
/// Templating's audience page (the contract: pages of up to 5,000 users).
const PAGE: i64 = 5_000;
/// Templating is killed once its checkpoint counts this many produced (three pages): a restart
/// from the start instead of the checkpoint would produce all of them twice.
const KILL_AT_PRODUCED: i64 = 3 * PAGE;
/// The static member id of the templating process: its restart takes the dead one's partitions
/// at once instead of after a session timeout.
const TEMPLATING_MEMBER: &str = "group.instance.id=campaign-exactly-once-templating";
/// The core's embedded registry's write token: templating registers the schemas it writes.
const REGISTRY_TOKEN: &str = "exactly-once-registry-write-token-0123456789";
const SEGMENT: &str = "winter-exactly-once";

/// The segment: user ids in id order; every 5,001st (offset 7) opted out.
fn segment() -> (Vec<String>, BTreeSet<String>) {
    let users: Vec<String> = (0..RECIPIENTS + OPTED_OUT).map(|i| format!("eo{i:06}")).collect();
    let opted: BTreeSet<String> = (0..OPTED_OUT).map(|k| users[k * 5_001 + 7].clone()).collect();
    (users, opted)
}

/// `tidings segment import` of `csv` into [`SEGMENT`]: its output, which must say it worked.
fn import(db: &str, csv: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tidings"))
        .args(["segment", "import", SEGMENT])
        .arg(csv)
        .env("TIDINGS_DATABASE_URL", db)
        .stdin(Stdio::null())
        .output()
        .expect("running tidings segment import");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "tidings segment import failed ({}):\n{text}", out.status);
    text
}

/// `GET /v1/campaigns/{id}` with the service token.
async fn campaign(http: &reqwest::Client, base: &str, id: &str) -> Result<Json, String> {
    let resp = http
        .get(format!("{base}/v1/campaigns/{id}"))
        .bearer_auth(common::ingest_token())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body: Json = resp.json().await.unwrap_or(Json::Null);
    if status == 200 {
        Ok(body)
    } else {
        Err(format!("GET /v1/campaigns/{id} answered {status}: {body}"))
    }
}

/// `POST /v1/campaigns` with the service token: status and answer.
async fn post_campaign(http: &reqwest::Client, base: &str, body: &Json) -> (u16, Json) {
    let resp = http
        .post(format!("{base}/v1/campaigns"))
        .bearer_auth(common::ingest_token())
        .json(body)
        .send()
        .await
        .expect("POST /v1/campaigns");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Json::Null))
}

/// The campaign_progress row of `id`: (produced, suppressed, cursor, finished).
async fn progress(pool: &sqlx::PgPool, id: &str) -> Option<(i64, i64, Option<String>, bool)> {
    sqlx::query_as(
        "SELECT produced, suppressed, cursor, finished_at IS NOT NULL FROM campaign_progress WHERE campaign_id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
    .expect("reading campaign_progress")
}

/// The events of `event_id`'s notifications on a stream, by notification id.
fn receipts(seen: &Seen, event_id: &str) -> BTreeMap<String, usize> {
    let mut by_id = BTreeMap::new();
    for (_, data) in seen.named(|_| true) {
        if data["source_event_id"] == event_id {
            *by_id.entry(data["id"].as_str().unwrap_or_default().to_string()).or_default() += 1;
        }
    }
    by_id
}

/// Every notification on `topic` (start to current end) of `event_id`: how many times each user's
/// was produced (a group record counts once for each of its recipients).
async fn produced_on_topic(brokers: &str, topic: &str, event_id: &str) -> HashMap<String, usize> {
    let (brokers, topic, event_id) = (brokers.to_string(), topic.to_string(), event_id.to_string());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", format!("exactly-once-reader-{}", uuid::Uuid::new_v4().simple()))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)).unwrap();
        let mut tpl = TopicPartitionList::new();
        let mut ends = BTreeMap::new();
        for p in 0..md.topics()[0].partitions().len() as i32 {
            let (low, high) = consumer.fetch_watermarks(&topic, p, Duration::from_secs(10)).unwrap();
            if high > low {
                tpl.add_partition_offset(&topic, p, Offset::Offset(low)).unwrap();
                ends.insert(p, high);
            }
        }
        consumer.assign(&tpl).unwrap();
        let mut users: HashMap<String, usize> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ends.is_empty() {
            assert!(Instant::now() < deadline, "reading {topic}: partitions {ends:?} not read to their end");
            let Some(m) = consumer.poll(Duration::from_millis(200)) else { continue };
            let m = m.expect("reading the notifications topic");
            let (_, datum) = tidings_core::wire::split(m.payload().expect("a notification record has a value"))
                .expect("a framed notification");
            let n = Notification::decode_datum(datum).expect("a notification record");
            if n.source_event_id == event_id {
                n.for_each_recipient(|r| *users.entry(r.user_id.clone()).or_default() += 1);
            }
            if ends.get(&m.partition()).is_some_and(|end| m.offset() + 1 >= *end) {
                ends.remove(&m.partition());
            }
        }
        users
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_to_100k_users_through_a_templating_kill_reaches_each_once() {
    let started = Instant::now();
    let at = || format!("[{:6.1}s]", started.elapsed().as_secs_f64());
    let brokers = common::brokers_or_skip().expect("TIDINGS_TEST_BROKERS");
    let (pool, db) = common::fresh_pg().await;
    let prefix = common::unique_prefix();
    eprintln!("topic prefix {prefix}, database {db}");

    // The segment, from a CSV file with a header row.
    let (users, opted) = segment();
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("segment.csv");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&csv).unwrap());
        writeln!(f, "plan,user_id").unwrap();
        for (i, u) in users.iter().enumerate() {
            writeln!(f, "{},{u}", ["basic", "plus", "pro"][i % 3]).unwrap();
        }
    }
    let out = import(&db, &csv);
    assert!(out.contains(&format!("replaced with {} user(s)", users.len())), "{out}");
    eprintln!("{} imported {} users into {SEGMENT}", at(), users.len());

    // The core: registry, topics, persistence and the gateway (campaign API, preferences, streams).
    let core_up =
        Up { brokers: &brokers, database_url: &db, prefix: &prefix, stages: "persistence,gateway", registry_url: None };
    let mut core = Tidings::spawn_env("core", &core_up, &[("TIDINGS_REGISTRY_WRITE_TOKEN", REGISTRY_TOKEN)]);
    let ep = core.endpoints(Duration::from_secs(60)).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    common::await_ready(&http, &ep.http, &[&core]).await;
    let templating_up = Up {
        brokers: &brokers,
        database_url: &db,
        prefix: &prefix,
        stages: "templating",
        registry_url: Some(&ep.schema_registry_url),
    };
    let member = [("TIDINGS_KAFKA_OPTS", TEMPLATING_MEMBER), ("TIDINGS_SCHEMA_REGISTRY_BEARER_TOKEN", REGISTRY_TOKEN)];
    let mut templating = Tidings::spawn_env("templating-1", &templating_up, &member);
    templating.endpoints(Duration::from_secs(60)).await;

    for user in &opted {
        let resp = http
            .put(format!("{}/v1/me/preferences", ep.http))
            .bearer_auth(user_token(user))
            .json(&json!({"opt_out": ["campaigns"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{user} opting out: {}", resp.text().await.unwrap_or_default());
    }

    // Connected users across the whole audience (each page's), a few of them opted out.
    let mut connected: BTreeSet<String> = (0..CONNECTED - 5).map(|i| users[i * 333].clone()).collect();
    connected.extend(opted.iter().step_by(4).cloned());
    let connected: Vec<String> = connected.into_iter().collect();
    let connected_opted: Vec<&String> = connected.iter().filter(|u| opted.contains(*u)).collect();
    assert!(connected_opted.len() >= 2, "some connected users opted out: {connected_opted:?}");
    let mut streams = Vec::with_capacity(connected.len());
    for user in &connected {
        streams.push((user.clone(), open_stream(&http, &ep.http, user, None).await));
    }
    eprintln!("{} {} streams open", at(), streams.len());

    // The dry run, which writes nothing.
    let campaign_id = format!("winter-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let event_id = format!("campaign:{campaign_id}");
    let mut body = json!({"campaign_id": campaign_id, "category": "campaigns", "title": "Winter sale",
        "body": "Everything 30% off until Sunday.", "link": "/sale/winter",
        "audience": {"segments": [SEGMENT]}, "dry_run": true});
    let (status, dry) = post_campaign(&http, &ep.http, &body).await;
    assert_eq!(status, 200, "dry run: {dry}\n{}", core.log_tail(30));
    assert_eq!(dry["audience"], json!(users.len()), "dry run: {dry}");
    assert_eq!(dry["opted_out"], json!(OPTED_OUT), "dry run: {dry}");
    assert_eq!(dry["in_quiet_hours_now"], json!(0), "dry run: {dry}");
    let will_receive = dry["will_receive"].as_u64().unwrap_or_else(|| panic!("dry run without will_receive: {dry}"));
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM campaigns").fetch_one(&pool).await.unwrap();
    assert_eq!(written, 0, "the dry run wrote a campaign");

    // The launch; templating is SIGKILLed once its checkpoint shows three pages produced.
    body["dry_run"] = json!(false);
    let (status, launched) = post_campaign(&http, &ep.http, &body).await;
    assert_eq!(status, 201, "launch: {launched}\n{}", core.log_tail(30));
    assert_eq!(launched["campaign_id"], json!(campaign_id), "{launched}");
    let launched_at = Instant::now();
    eprintln!("{} launched {campaign_id}", at());
    let (killed_at, _) = eventually(
        "templating's checkpoint to count three pages produced",
        Duration::from_secs(90),
        Duration::from_millis(2),
        &[&templating, &core],
        || async {
            match progress(&pool, &campaign_id).await {
                Some((produced, _, _, finished)) if produced >= KILL_AT_PRODUCED || finished => {
                    Ok((produced, finished))
                }
                p => Err(format!("progress {p:?}")),
            }
        },
    )
    .await;
    templating.kill9();
    let at_kill = progress(&pool, &campaign_id).await.expect("a progress row");
    let stored_at_kill: i64 =
        sqlx::query_scalar("SELECT count(*) FROM notifications WHERE kind = 'campaign' AND source_event_id = $1")
            .bind(&event_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    let first_receipts = streams.iter().filter(|(_, s)| !receipts(s, &event_id).is_empty()).count();
    eprintln!(
        "{} SIGKILL templating-1 {:.2}s after the launch at checkpoint {at_kill:?} (seen {killed_at}); \
         {stored_at_kill} stored, {first_receipts} streams had it",
        at(),
        launched_at.elapsed().as_secs_f64()
    );
    assert!(!at_kill.3, "the fan-out finished before the kill: {at_kill:?}; the kill must land mid fan-out");
    assert!((at_kill.0 as u64) < will_receive, "{at_kill:?}");
    let _dead = std::mem::replace(&mut templating, Tidings::spawn_env("templating-2", &templating_up, &member));

    // The campaign ends done, its counters those of one pass over the audience, then with every
    // recipient's notification stored.
    let done = eventually(
        "the campaign to be done",
        Duration::from_secs(120),
        Duration::from_millis(100),
        &[&templating, &core],
        || async {
            let c = campaign(&http, &ep.http, &campaign_id).await?;
            if c["status"] == "done" {
                Ok(c)
            } else {
                Err(c.to_string())
            }
        },
    )
    .await;
    eprintln!("{} done {:.1}s after the launch: {}", at(), launched_at.elapsed().as_secs_f64(), done["counts"]);
    assert_eq!(will_receive, RECIPIENTS as u64, "will_receive = the audience less the opted-out users");
    let pass = "the counts of one pass over the audience (a resume after the checkpoint)";
    assert_eq!(done["counts"]["produced"], json!(RECIPIENTS), "{pass}: {done}");
    assert_eq!(done["counts"]["suppressed"], json!(OPTED_OUT), "{pass}: {done}");
    assert_eq!(done["audience_estimate"], json!(will_receive), "{done}");
    let stored = eventually(
        "every notification stored",
        Duration::from_secs(120),
        Duration::from_millis(250),
        &[&templating, &core],
        || async {
            let c = campaign(&http, &ep.http, &campaign_id).await?;
            if c["status"] == "done" && c["counts"]["stored"] == json!(will_receive) {
                Ok(c)
            } else {
                Err(c.to_string())
            }
        },
    )
    .await;
    eprintln!("{} all stored {:.1}s after the launch: {}", at(), launched_at.elapsed().as_secs_f64(), stored["counts"]);

    // The store: one row per recipient, none for the opted-out users, each with its own id.
    let (rows, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT user_id) FROM notifications WHERE kind = 'campaign' AND source_event_id = $1",
    )
    .bind(&event_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((rows, distinct), (RECIPIENTS as i64, RECIPIENTS as i64), "stored rows, distinct users");
    let stored: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT id, user_id FROM notifications WHERE kind = 'campaign' AND source_event_id = $1")
            .bind(&event_id)
            .fetch_all(&pool)
            .await
            .unwrap();
    let stored_users: BTreeSet<&str> = stored.iter().map(|(_, u)| u.as_str()).collect();
    let expected: BTreeSet<&str> = users.iter().map(String::as_str).filter(|u| !opted.contains(*u)).collect();
    let missing: Vec<_> = expected.difference(&stored_users).take(5).collect();
    let extra: Vec<_> = stored_users.difference(&expected).take(5).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}, not in the audience {extra:?}");
    let wrong_id: Vec<_> = stored.iter().filter(|(id, u)| *id != Notification::id_for(&event_id, u)).take(5).collect();
    assert!(wrong_id.is_empty(), "rows without their deterministic id: {wrong_id:?}");
    let opted_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications WHERE user_id = ANY($1)")
        .bind(opted.iter().cloned().collect::<Vec<_>>())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(opted_rows, 0, "notifications stored for users who opted out");
    let p = progress(&pool, &campaign_id).await.expect("a progress row");
    assert_eq!((p.0, p.1, p.3), (RECIPIENTS as i64, OPTED_OUT as i64, true), "campaign_progress {p:?}");

    // The topic: each recipient's notification produced; those the checkpoint at the kill covered
    // exactly once (the restart resumed after its cursor, not from the start), the later ones at
    // most twice (the pages produced while their acknowledgements were awaited, then again).
    let cursor = at_kill.2.clone().expect("a checkpoint with a cursor at the kill");
    let on_topic = produced_on_topic(&brokers, &format!("{prefix}notifications"), &event_id).await;
    let topic_users: BTreeSet<&str> = on_topic.keys().map(String::as_str).collect();
    let missing: Vec<_> = expected.difference(&topic_users).take(5).collect();
    let extra: Vec<_> = topic_users.difference(&expected).take(5).collect();
    assert!(missing.is_empty() && extra.is_empty(), "on the topic: missing {missing:?}, not in the audience {extra:?}");
    let twice_covered: Vec<_> = on_topic.iter().filter(|(u, n)| **u <= cursor && **n > 1).take(5).collect();
    let covered = on_topic.keys().filter(|u| **u <= cursor).count();
    assert!(
        twice_covered.is_empty(),
        "notifications produced again although the checkpoint at the kill ({at_kill:?}) covered them, \
         e.g. {twice_covered:?}: the restart did not resume after its cursor"
    );
    let thrice: Vec<_> = on_topic.iter().filter(|(_, n)| **n > 2).take(5).collect();
    assert!(thrice.is_empty(), "notifications produced more than twice with one kill: {thrice:?}");
    let again = on_topic.values().filter(|n| **n == 2).count();
    eprintln!(
        "{} on the topic: {covered} covered by the checkpoint at the kill, each once; {again} of the later ones twice",
        at()
    );
    assert_eq!(covered as i64, at_kill.0, "recipients up to the cursor at the kill = its produced count");

    // A second campaign to the connected users, launched after the first one was done: once each
    // of them has it, their partitions were consumed past every record of the first one; the
    // opted-out users' partitions too, each shared with connected users who get it.
    let topology = tidings_pipeline::topology::Topology::load(&common::topology_path()).unwrap();
    let partitions = topology.topics["notifications"].partitions;
    let partition = |u: &str| tidings_core::kafka::partition_for(u, partitions);
    let covered_parts: BTreeSet<i32> = connected.iter().filter(|u| !opted.contains(*u)).map(|u| partition(u)).collect();
    let uncovered: Vec<_> = connected_opted.iter().filter(|u| !covered_parts.contains(&partition(u))).collect();
    assert!(uncovered.is_empty(), "opted-out users alone on their notifications partition: {uncovered:?}");
    let barrier_id = format!("{campaign_id}-after");
    let barrier = json!({"campaign_id": barrier_id, "category": "campaigns", "title": "Last call",
        "body": "The winter sale ends tonight.", "audience": {"user_ids": connected}});
    let (status, answer) = post_campaign(&http, &ep.http, &barrier).await;
    assert_eq!(status, 201, "the second campaign: {answer}");
    let barrier_event = format!("campaign:{barrier_id}");
    eventually(
        "every connected user who did not opt out to have the second campaign",
        Duration::from_secs(60),
        Duration::from_millis(100),
        &[&templating, &core],
        || async {
            let waiting: Vec<&str> = streams
                .iter()
                .filter(|(u, s)| !opted.contains(u) && receipts(s, &barrier_event).is_empty())
                .map(|(u, _)| u.as_str())
                .collect();
            if waiting.is_empty() {
                Ok(())
            } else {
                Err(format!("{} waiting, e.g. {:?}", waiting.len(), &waiting[..waiting.len().min(5)]))
            }
        },
    )
    .await;

    let receivers = connected.len() - connected_opted.len();
    // Each connected user got the first campaign once, with their own id; the opted-out ones none.
    let mut wrong = Vec::new();
    for (user, seen) in &streams {
        let got = receipts(seen, &event_id);
        let want: BTreeMap<String, usize> = if opted.contains(user) {
            BTreeMap::new()
        } else {
            BTreeMap::from([(Notification::id_for(&event_id, user).to_string(), 1)])
        };
        if got != want {
            wrong.push(format!("{user}: {got:?}"));
        }
        let second = receipts(seen, &barrier_event).values().sum::<usize>();
        if second != usize::from(!opted.contains(user)) {
            wrong.push(format!("{user}: the second campaign {second} times"));
        }
    }
    assert!(wrong.is_empty(), "streams that did not get the campaign exactly once: {wrong:?}");
    eprintln!(
        "{} {} connected users got it once, {} opted-out connected users got nothing",
        at(),
        receivers,
        connected_opted.len()
    );

    // The gateway's delivered count: one per connected recipient.
    eventually("the delivered count", Duration::from_secs(20), Duration::from_millis(200), &[&core], || async {
        let c = campaign(&http, &ep.http, &campaign_id).await?;
        match c["counts"]["delivered"].as_u64() {
            Some(n) if n as usize == receivers => Ok(()),
            _ => Err(c.to_string()),
        }
    })
    .await;

    common::sigterm(&mut templating).await;
    common::sigterm(&mut core).await;
    eprintln!("{} the whole test", at());
}
