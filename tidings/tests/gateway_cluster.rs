//! Three gateway processes on Apache Kafka deliver to 1,500 reconnecting SSE clients while
//! notifications flow; one gateway is SIGKILLed (the two survivors must take over its partitions
//! by themselves once its session expires) and later another is stopped with SIGTERM (the last one
//! then owns every partition). Every client must receive every one of its notifications exactly
//! once and in order, following redirects and resuming with Last-Event-ID.

mod common;

use common::{eventually, Tidings, Up};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidings_core::kafka::KafkaConfig;
use tidings_core::{FramedEncoder, Notification, RegistryClient};
use tidings_loadgen::{http_client, Client, Totals};
use tokio_util::sync::CancellationToken;

const USERS: usize = 1_500;
const PER_USER: usize = 12;
/// Notifications per second while producing (18,000 in all: about 30 s).
const RATE: usize = 600;

fn user(i: usize) -> String {
    format!("cu{i:04}")
}

fn notification(u: usize, n: usize) -> Notification {
    let user = user(u);
    let event = format!("ev-{u}-{n}");
    Notification {
        notification_id: Notification::id_for(&event, &user),
        user_id: user,
        kind: "test.cluster".into(),
        title: format!("n{n}"),
        body: "multi-instance delivery".into(),
        link: None,
        source_event_id: event,
        occurred_at: 1_700_000_000_000_000 + n as i64,
        source_topic: "orders".into(),
        source_partition: 0,
        source_offset: n as i64,
        data: None,
        inbox: true,
        category: String::new(),
        recipients: vec![],
    }
}

/// `tidings_gateway_owned_partitions` of the gateway at `url`.
async fn owned_partitions(http: &reqwest::Client, url: &str) -> Result<u64, String> {
    Ok(common::metric(http, url, "tidings_gateway_owned_partitions").await? as u64)
}

/// Waits until the gateways at `urls` together own all `partitions`, each exactly once.
async fn await_owners(http: &reqwest::Client, urls: &[&str], partitions: u64, what: &str, procs: &[&Tidings]) {
    eventually(what, Duration::from_secs(45), Duration::from_millis(250), procs, || async {
        let mut owned = Vec::new();
        for u in urls {
            owned.push(owned_partitions(http, u).await?);
        }
        if owned.iter().sum::<u64>() == partitions {
            Ok(())
        } else {
            Err(format!("owned partitions {owned:?}"))
        }
    })
    .await;
}

fn spawn_gateway<'a>(name: &str, up: &Up<'a>) -> Tidings {
    Tidings::spawn_env(name, up, &[("TIDINGS_SSE_RETRY_MS", "300"), ("TIDINGS_GRACE_SECS", "10")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_deliver_exactly_once_in_order_through_sigkill_and_sigterm() {
    let Some(brokers) = common::brokers_or_skip() else { return };
    let (_pool, db_url) = common::fresh_pg().await;
    let prefix = common::unique_prefix();
    eprintln!("topic prefix {prefix}, database {db_url}");
    // The persistence stage and the embedded registry (and topic creation) live in one process.
    let mut core = Tidings::spawn(
        "core",
        &Up { brokers: &brokers, database_url: &db_url, prefix: &prefix, stages: "persistence", registry_url: None },
    );
    let ep = core.endpoints(Duration::from_secs(60)).await;
    let gw_up = Up::gateway(&brokers, &db_url, &prefix, &ep.schema_registry_url);
    let mut gws: Vec<Tidings> = Vec::new();
    let mut urls = Vec::new();
    for i in 0..3 {
        let mut g = spawn_gateway(&format!("gateway-{i}"), &gw_up);
        urls.push(g.endpoints(Duration::from_secs(60)).await.http);
        gws.push(g);
    }
    let http = reqwest::Client::new();
    eventually(
        "all three gateways ready",
        Duration::from_secs(90),
        Duration::from_millis(500),
        &[&gws[0], &gws[1], &gws[2]],
        || async {
            for u in &urls {
                common::ready(&http, u).await?;
            }
            Ok(())
        },
    )
    .await;

    // 1,500 clients, spread over the three instances; each follows redirects to its owner.
    let stop = CancellationToken::new();
    let totals = Arc::new(Totals::default());
    let sse_http = http_client();
    let mut clients = Vec::new();
    for u in 0..USERS {
        let token = tidings_gateway::auth::mint_hs256(
            tidings_gateway::auth::DEV_SECRET.as_bytes(),
            &user(u),
            Duration::from_secs(3600),
            None,
            None,
        )
        .unwrap();
        let c = Client { gateways: urls.clone(), token, http: sse_http.clone(), reconnect_after_close: true };
        let (stop, totals) = (stop.clone(), totals.clone());
        clients.push(tokio::spawn(async move { c.run(u, stop, totals, |_, _| {}).await }));
    }
    eventually(
        "1,500 streams open",
        Duration::from_secs(60),
        Duration::from_millis(250),
        &[&gws[0], &gws[1], &gws[2]],
        || async {
            let n = totals.connected.load(Ordering::Relaxed);
            if n as usize == USERS {
                Ok(())
            } else {
                Err(format!("{n} connected"))
            }
        },
    )
    .await;
    eprintln!("all {USERS} streams open");

    // Produce straight to the notifications topic (what the templating stage emits).
    let topic = format!("{prefix}notifications");
    let partitions = common::high_watermarks(&brokers, &topic).await.len() as u64;
    let registry = RegistryClient::new(&ep.schema_registry_url).unwrap();
    let (id, schema) = registry.latest(&format!("{topic}-value")).await.expect("notifications schema registered");
    let encoder = FramedEncoder::new(id, schema).unwrap();
    let producer: FutureProducer = KafkaConfig::new(brokers.clone()).producer().create().unwrap();
    let producing = {
        let topic = topic.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut pending = Vec::new();
            for n in 0..PER_USER {
                for u in 0..USERS {
                    let i = n * USERS + u;
                    let notif = notification(u, n);
                    let payload = encoder.encode(notif.to_value()).unwrap();
                    let rec = FutureRecord::to(&topic).key(notif.user_id.as_str()).payload(&payload[..]);
                    pending.push(common::send_when_room(&producer, rec, &format!("notification {i}")).await);
                    if i % 100 == 99 {
                        for d in pending.drain(..) {
                            d.await.unwrap().map_err(|(e, _)| e).expect("acknowledged");
                        }
                        let due = started + Duration::from_secs_f64((i + 1) as f64 / RATE as f64);
                        tokio::time::sleep_until(due.into()).await;
                    }
                }
            }
            for d in pending.drain(..) {
                d.await.unwrap().map_err(|(e, _)| e).expect("acknowledged");
            }
            eprintln!("produced {} notifications in {:.1}s", USERS * PER_USER, started.elapsed().as_secs_f64());
        })
    };

    // SIGKILL one gateway mid-stream.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let delivered_before_kill = totals.events.load(Ordering::Relaxed);
    assert!(delivered_before_kill > 0, "nothing delivered in the first 6 s");
    gws[0].kill9();
    eprintln!("SIGKILLed gateway-0 after {delivered_before_kill} deliveries");
    // Nobody restarts it: once its session (10 s) expires, Kafka rebalances the survivors.
    let killed_at = Instant::now();
    await_owners(&http, &[&urls[1], &urls[2]], partitions, "the survivors to own every partition", &[&gws[1], &gws[2]])
        .await;
    eprintln!("survivors own all {partitions} partitions {:.1}s after the SIGKILL", killed_at.elapsed().as_secs_f64());

    // Then stop another one gracefully: its streams get `reconnect`, it leaves the group, exits 0.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let delivered_before_term = totals.events.load(Ordering::Relaxed);
    gws[1].signal("TERM");
    let status = gws[1].wait_exit(Duration::from_secs(20)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "gateway-1 did not exit cleanly within 20 s of SIGTERM: {status:?}\n{}",
        gws[1].log_tail(40)
    );
    eprintln!("gateway-1 stopped by SIGTERM after {delivered_before_term} deliveries");
    await_owners(&http, &[&urls[2]], partitions, "gateway-2 to own every partition", &[&gws[2]]).await;

    producing.await.expect("producer task");
    let want = (USERS * PER_USER) as u64;
    eventually(
        "every notification delivered",
        Duration::from_secs(180),
        Duration::from_millis(500),
        &[&gws[2], &core],
        || async {
            let n = totals.events.load(Ordering::Relaxed);
            if n >= want {
                Ok(())
            } else {
                Err(format!("{n} of {want} delivered"))
            }
        },
    )
    .await;
    // Anything extra (a duplicate) would arrive now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();

    let (mut redirects, mut reconnects, mut resets, mut connects) = (0, 0, 0, 0);
    let mut failures = Vec::new();
    for (u, c) in clients.into_iter().enumerate() {
        let seen = c.await.unwrap();
        redirects += seen.redirects;
        connects += seen.connects;
        resets += seen.resets;
        reconnects += seen.closes.len();
        let expected: Vec<String> = (0..PER_USER).map(|n| notification(u, n).notification_id.to_string()).collect();
        if seen.ids != expected || !seen.duplicates.is_empty() || !seen.out_of_order.is_empty() || seen.resets > 0 {
            failures.push(format!(
                "{}: got {} of {PER_USER}, duplicates {:?}, out of order {:?}, resets {}",
                user(u),
                seen.ids.len(),
                seen.duplicates,
                seen.out_of_order,
                seen.resets
            ));
        }
    }
    eprintln!(
        "{USERS} clients: {connects} streams opened, {redirects} redirects followed, {reconnects} reconnect/close events, {resets} resets"
    );
    assert!(
        failures.is_empty(),
        "{} clients saw a gap, duplicate or reorder:\n{}",
        failures.len(),
        failures[..failures.len().min(20)].join("\n")
    );
    assert!(redirects > 0, "no client was ever redirected to an owner");
    assert!(reconnects > 0, "no stream was told to reconnect (revoke / SIGTERM)");
    assert_eq!(totals.events.load(Ordering::Relaxed), want, "extra deliveries");
}
