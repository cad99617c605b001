//! Partitions added to `notifications` while one `tidings up` runs on Apache Kafka: templating and
//! the gateway follow the new count without a restart. A user whose partition moved gets
//! `reconnect` on the stream opened before, `reset` when resuming from the old partition, and then
//! every notification for them (keyed, and a campaign's group record) on their new partition.

mod common;

use common::{eventually, metric, open_stream, Seen, Tidings, Up};
use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
use rdkafka::client::DefaultClientContext;
use serde_json::json;
use std::time::Duration;
use tidings_core::kafka::{partition_for, KafkaConfig};

/// `notifications` in topology.yaml.
const BEFORE: i32 = 12;
const AFTER: i32 = 16;

/// Three users who move to one of the new partitions (the same for all three) when the topic grows.
fn moved_users() -> (Vec<String>, i32) {
    let moved = (0..).map(|i| format!("mv{i:03}")).filter(|u| partition_for(u, AFTER) >= BEFORE);
    let first = moved.clone().next().unwrap();
    let home = partition_for(&first, AFTER);
    (moved.filter(|u| partition_for(u, AFTER) == home).take(3).collect(), home)
}

fn campaign(id: &str, users: &[String]) -> serde_json::Value {
    json!({"event_id": uuid::Uuid::new_v4().to_string(), "occurred_at": chrono::Utc::now().timestamp_micros(),
        "coupon_id": id, "payload": {"CampaignLaunched": {"campaign_id": id, "title": format!("sale {id}"),
        "discount_percent": 10, "audience": {"InlineAudience": {"user_ids": users}}}}})
}

fn coupon(user: &str, code: &str) -> serde_json::Value {
    json!({"event_id": uuid::Uuid::new_v4().to_string(), "occurred_at": chrono::Utc::now().timestamp_micros(),
        "coupon_id": code, "payload": {"CouponIssued": {"user_id": user, "code": code, "discount_percent": 5,
        "expires_at": chrono::Utc::now().timestamp_micros() + 86_400_000_000i64}}})
}

/// The positions (`partition.offset`) at which `seen` got the events named `name` whose title is `title`.
fn positions(seen: &Seen, name: &str, title: &str) -> Vec<String> {
    seen.named(|e| e == name)
        .into_iter()
        .filter(|(_, d)| d["title"].as_str().is_some_and(|t| t.contains(title)))
        .map(|(_, d)| d["position"].as_str().unwrap_or_default().to_string())
        .collect()
}

async fn has(seen: &Seen, name: &str) -> Result<(), String> {
    if seen.names().iter().any(|n| n == name) {
        Ok(())
    } else {
        Err(format!("no {name} in {:?}", seen.names()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_whose_partition_moved_keep_getting_their_notifications() {
    let Some(brokers) = common::brokers_or_skip() else { return };
    let (pool, db_url) = common::fresh_pg().await;
    let prefix = common::unique_prefix();
    let mut up = Tidings::spawn("grow", &Up::all(&brokers, &db_url, &prefix));
    let ep = up.endpoints(Duration::from_secs(60)).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().unwrap();
    // Streams stay open for the whole test: no overall timeout on them.
    let sse = reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).build().unwrap();
    common::await_ready(&http, &ep.http, &[&up]).await;
    let (users, home) = moved_users();
    let user = &users[0];
    let old_home = partition_for(user, BEFORE);

    // Before: the user's stream gets a campaign on the old partition.
    let before = open_stream(&sse, &ep.http, user, None).await;
    common::accept(&http, &ep.ingest, "coupons", &campaign("grow-1", &users), &up).await;
    let got = eventually("the first campaign", Duration::from_secs(30), Duration::from_millis(100), &[&up], || async {
        match positions(&before, "coupon.campaign", "grow-1").as_slice() {
            [p] => Ok(p.clone()),
            other => Err(format!("{other:?} in {:?}", before.names())),
        }
    })
    .await;
    assert!(got.starts_with(&format!("{old_home}.")), "{user} on partition {old_home}, delivered at {got}");

    let topic = format!("{prefix}notifications");
    let admin: AdminClient<DefaultClientContext> = KafkaConfig::new(&brokers).admin().create().unwrap();
    let grown = admin.create_partitions(&[NewPartitions::new(&topic, AFTER as usize)], &AdminOptions::new()).await;
    assert!(grown.unwrap().iter().all(Result::is_ok), "adding partitions to {topic}");

    // The group takes the new partitions (a rebalance: every stream gets `reconnect`), and the
    // client comes back from where it was, still to the old partition while the gateway waits
    // for templating to route by the new count.
    eventually("`reconnect` on the first stream", Duration::from_secs(60), Duration::from_millis(250), &[&up], || {
        has(&before, "reconnect")
    })
    .await;
    let again = open_stream(&sse, &ep.http, user, before.last_id().as_deref()).await;
    for stage in ["templating", "delivery"] {
        let sample = format!("tidings_notifications_partitions{{stage=\"{stage}\"}}");
        eventually(&sample, Duration::from_secs(90), Duration::from_millis(250), &[&up], || async {
            match metric(&http, &ep.http, &sample).await? as i32 {
                AFTER => Ok(()),
                n => Err(format!("{n}")),
            }
        })
        .await;
    }
    // Routing by the new count, the gateway ends that stream too (or, had it come after the
    // switch, resets it); resuming from the old partition gives `reset` on the new one.
    let now =
        eventually("`reset` or `reconnect`", Duration::from_secs(10), Duration::from_millis(100), &[&up], || async {
            match (has(&again, "reset").await, has(&again, "reconnect").await) {
                (Ok(()), _) => Ok(None),
                (_, Ok(())) => Ok(Some(again.last_id().or_else(|| before.last_id()))),
                _ => Err(format!("{:?}", again.names())),
            }
        })
        .await;
    let after = match now {
        None => again,
        Some(last) => {
            let third = open_stream(&sse, &ep.http, user, last.as_deref()).await;
            eventually("`reset` on the resume", Duration::from_secs(10), Duration::from_millis(100), &[&up], || {
                has(&third, "reset")
            })
            .await;
            third
        }
    };
    eventually(
        "the gateway to own every partition",
        Duration::from_secs(30),
        Duration::from_millis(250),
        &[&up],
        || async {
            match metric(&http, &ep.http, "tidings_gateway_owned_partitions").await? as i32 {
                AFTER => Ok(()),
                n => Err(format!("{n} partitions owned")),
            }
        },
    )
    .await;

    common::accept(&http, &ep.ingest, "coupons", &campaign("grow-2", &users), &up).await;
    common::accept(&http, &ep.ingest, "coupons", &coupon(user, "GROW3"), &up).await;
    let got =
        eventually("both notifications after", Duration::from_secs(30), Duration::from_millis(100), &[&up], || async {
            let campaign = positions(&after, "coupon.campaign", "grow-2");
            let issued: Vec<String> = after
                .named(|e| e == "coupon.issued")
                .into_iter()
                .map(|(_, d)| d["position"].as_str().unwrap_or_default().to_string())
                .collect();
            match (campaign.as_slice(), issued.as_slice()) {
                ([c], [i]) => Ok((c.clone(), i.clone())),
                _ => Err(format!("campaign {campaign:?}, coupon {issued:?} in {:?}", after.names())),
            }
        })
        .await;
    for at in [&got.0, &got.1] {
        assert!(at.starts_with(&format!("{home}.")), "{user} moved to partition {home}, delivered at {at}");
    }
    // The store has them too: persistence reads the new partition.
    eventually("the campaign's rows", Duration::from_secs(30), Duration::from_millis(200), &[&up], || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications WHERE title = 'sale grow-2'")
            .fetch_one(&pool)
            .await
            .map_err(|e| e.to_string())?;
        if n == users.len() as i64 {
            Ok(())
        } else {
            Err(format!("{n} rows"))
        }
    })
    .await;
    up.signal("TERM");
    assert!(up.wait_exit(Duration::from_secs(30)).await.is_some_and(|s| s.success()), "{}", up.log_tail(20));
}
