//! `tidings status` against a running system on Apache Kafka and PostgreSQL: templating with
//! ingest, persistence in a process of its own, and two gateways. Its JSON names every
//! notifications partition's one owner (as each gateway announces it), the groups' lag, the dead
//! letters by reason and the streams per gateway, and exits 0 while all is OK; persistence stopped
//! with SIGTERM shows as stopped with its lag, and the exit status is then 3.

mod common;

use common::{eventually, Tidings, Up};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;
use tidings_core::kafka::{partition_for, KafkaConfig};

const NOTIFICATION_PARTITIONS: i32 = 12;

/// `tidings status --json` over a short window: its exit code and report.
fn status(brokers: &str, prefix: &str, db: &str) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_tidings"))
        .args(["status", "--json", "--window", "2s", "--brokers", brokers, "--topic-prefix", prefix])
        .args(["--database-url", db, "--topology"])
        .arg(common::topology_path())
        .env("TIDINGS_LOG", "warn")
        .output()
        .expect("running tidings status");
    let code = out.status.code().unwrap_or(-1);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("status printed no JSON ({e}), exit {code}:\n{}", String::from_utf8_lossy(&out.stderr))
    });
    (code, report)
}

fn group<'a>(report: &'a Value, stage: &str) -> Result<&'a Value, String> {
    report["groups"]
        .as_array()
        .and_then(|gs| gs.iter().find(|g| g["stage"] == stage))
        .ok_or_else(|| format!("no {stage} group in {}", report["groups"]))
}

/// The gateway group's owners: partition → instance, once every partition has exactly one, the
/// owners are the two gateways and each one's announcement lists exactly the partitions shown.
fn owners(report: &Value) -> Result<BTreeMap<i32, String>, String> {
    let g = group(report, "gateway")?;
    let mut out = BTreeMap::new();
    for p in g["partitions"].as_array().into_iter().flatten() {
        let owners = p["owners"].as_array().cloned().unwrap_or_default();
        if owners.len() != 1 {
            return Err(format!("partition {} has owners {owners:?}", p["partition"]));
        }
        out.insert(p["partition"].as_i64().unwrap() as i32, owners[0].as_str().unwrap().to_string());
    }
    if out.len() != NOTIFICATION_PARTITIONS as usize {
        return Err(format!("{} partitions listed: {}", out.len(), g["partitions"]));
    }
    let gateways: BTreeSet<&String> = out.values().collect();
    if gateways.len() != 2 {
        return Err(format!("owners are {gateways:?}, not two gateways"));
    }
    for a in report["instances"].as_array().into_iter().flatten() {
        let Some(owned) = a["groups"].as_object().and_then(|gs| gs.values().find(|o| o["stage"] == "gateway")) else {
            continue;
        };
        let announced: BTreeSet<i32> = owned["partitions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| p["partition"].as_i64().unwrap() as i32)
            .collect();
        let shown: BTreeSet<i32> = out.iter().filter(|(_, o)| **o == a["instance"]).map(|(p, _)| *p).collect();
        if announced != shown {
            return Err(format!("{} announces {announced:?} but is shown owning {shown:?}", a["instance"]));
        }
    }
    Ok(out)
}

async fn orders(http: &reqwest::Client, ingest: &str, n: usize, core: &Tidings) {
    for i in 0..n {
        let body = json!({"event_id": uuid::Uuid::new_v4().to_string(), "occurred_at": chrono::Utc::now().timestamp_micros(),
            "order_id": format!("o-{i}"), "buyer_id": format!("su{i}"), "locale": "en",
            "payload": {"OrderPlaced": {"amount_cents": 1250, "currency": "EUR", "items": []}}});
        common::accept(http, ingest, "orders", &body, core).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_shows_owners_lag_dead_letters_streams_and_a_stopped_stage() {
    let Some(brokers) = common::brokers_or_skip() else { return };
    let (_pool, db) = common::fresh_pg().await;
    let prefix = common::unique_prefix();
    eprintln!("topic prefix {prefix}");
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();

    let up = Up {
        brokers: &brokers,
        database_url: &db,
        prefix: &prefix,
        stages: "templating,ingest,claims",
        registry_url: None,
    };
    let metrics = [("TIDINGS_METRICS_LISTEN", "127.0.0.1:0")];
    let mut core = Tidings::spawn_env("core", &up, &metrics);
    let ep = core.endpoints(Duration::from_secs(60)).await;
    let persist_up = Up { stages: "persistence", registry_url: Some(&ep.schema_registry_url), ..up };
    let mut persistence = Tidings::spawn_env("persistence", &persist_up, &metrics);
    persistence.endpoints(Duration::from_secs(60)).await;
    let gw = Up::gateway(&brokers, &db, &prefix, &ep.schema_registry_url);
    let mut g1 = Tidings::spawn("g1", &gw);
    let mut g2 = Tidings::spawn("g2", &gw);
    let (e1, e2) = (g1.endpoints(Duration::from_secs(60)).await, g2.endpoints(Duration::from_secs(60)).await);
    let procs = [&core, &persistence, &g1, &g2];
    common::await_ready(&http, &e1.http, &procs).await;
    common::await_ready(&http, &e2.http, &procs).await;

    // Two dead letters with two reasons: records on `orders` that are not framed Avro.
    let kafka = KafkaConfig::new(brokers.clone());
    let producer: FutureProducer = kafka.producer().create().unwrap();
    let orders_topic = format!("{prefix}orders");
    for bytes in [&b"x"[..], &b"\x07not avro at all"[..]] {
        let rec: FutureRecord<'_, str, [u8]> = FutureRecord::to(&orders_topic).key("bad").payload(bytes);
        producer.send(rec, Duration::from_secs(10)).await.unwrap();
    }
    orders(&http, &ep.ingest, 5, &core).await;
    // A coupon and a claim, decided by the claim stage, which keeps its offsets in the database.
    let coupon = |payload: Value| {
        json!({"event_id": uuid::Uuid::new_v4().to_string(), "occurred_at": 0, "coupon_id": "status-coupon", "payload": payload})
            .to_string()
    };
    let lines = [
        coupon(json!({"CouponDefined": {"title": "Drop", "discount_percent": 20, "stock": 1,
            "claim_opens_at": 0, "claim_closes_at": i64::MAX / 2, "valid_for_micros": 86_400_000_000i64}})),
        coupon(json!({"ClaimRequested": {"claim_id": "c1", "user_id": "claimer"}})),
    ];
    let mut produce = Command::new(env!("CARGO_BIN_EXE_tidings"))
        .args(["produce", "coupon-claims", "--brokers", &brokers, "--topic-prefix", &prefix])
        .args(["--schema-registry-url", &ep.schema_registry_url, "--topology"])
        .arg(common::topology_path())
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    produce.stdin.take().unwrap().write_all(lines.join("\n").as_bytes()).unwrap();
    assert!(produce.wait().unwrap().success(), "producing the coupon");

    // Every partition owned once, by the gateway announcing it; all groups OK with no lag.
    let report = eventually(
        "an OK status with both gateways owning",
        Duration::from_secs(90),
        Duration::from_millis(500),
        &procs,
        || async {
            let (code, r) = status(&brokers, &prefix, &db);
            owners(&r)?;
            for stage in ["templating", "persistence", "claims"] {
                let g = group(&r, stage)?;
                if g["state"] != "ok" || g["lag_messages"] != 0 {
                    return Err(format!("{stage}: {} lag {} ({})", g["state"], g["lag_messages"], g["reason"]));
                }
            }
            let letters = r["dead_letters"]
                .as_array()
                .and_then(|d| d.iter().find(|d| d["topic"] == format!("{prefix}tidings.dlq.templating")));
            if letters.is_none_or(|d| d["total"] != 2) {
                return Err(format!("dead letters {}", r["dead_letters"]));
            }
            if code != 0 {
                return Err(format!("exit {code} with every group OK: {}", r["groups"]));
            }
            Ok(r)
        },
    )
    .await;
    let dlq = report["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["topic"] == format!("{prefix}tidings.dlq.templating"))
        .unwrap();
    assert_eq!(dlq["by_reason"], json!({"too-short": 1, "wrong-magic-byte": 1}), "{dlq}");
    assert_eq!(report["ok"], true);

    // Streams: users placed on each gateway's partitions, opened at their owner.
    let own = owners(&report).unwrap();
    let urls: BTreeMap<String, String> = report["gateways"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["instance"].as_str().unwrap().to_string(), g["url"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(urls.values().cloned().collect::<BTreeSet<_>>(), BTreeSet::from([e1.http.clone(), e2.http.clone()]));
    let mut expected: BTreeMap<String, u64> = urls.keys().map(|i| (i.clone(), 0)).collect();
    let mut streams = Vec::new();
    for i in 0..7 {
        let user = format!("stream-user-{i}");
        let owner = &own[&partition_for(&user, NOTIFICATION_PARTITIONS)];
        *expected.get_mut(owner).unwrap() += 1;
        streams.push(common::open_stream(&http, &urls[owner], &user, None).await);
    }
    eventually("the streams per gateway", Duration::from_secs(30), Duration::from_millis(500), &procs, || async {
        let (_, r) = status(&brokers, &prefix, &db);
        let seen: BTreeMap<String, u64> = r["gateways"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|g| (g["instance"].as_str().unwrap().to_string(), g["streams"].as_u64().unwrap()))
            .collect();
        if seen == expected {
            Ok(())
        } else {
            Err(format!("streams {seen:?}, expected {expected:?}"))
        }
    })
    .await;

    // Persistence stopped: its group is stopped, records wait, the exit status is 3.
    common::sigterm(&mut persistence).await;
    orders(&http, &ep.ingest, 3, &core).await;
    let procs = [&core, &g1, &g2];
    eventually("persistence shown stopped", Duration::from_secs(60), Duration::from_millis(500), &procs, || async {
        let (code, r) = status(&brokers, &prefix, &db);
        let g = group(&r, "persistence")?;
        let lag = g["lag_messages"].as_i64().unwrap_or(0);
        if g["state"] != "stopped" || lag < 3 || g["instances"] != json!([]) {
            return Err(format!("persistence {} lag {lag} instances {}", g["state"], g["instances"]));
        }
        if group(&r, "templating")?["state"] != "ok" || r["ok"] != false {
            return Err(format!("others: {}", r["groups"]));
        }
        if code != 3 {
            return Err(format!("exit {code}, not 3"));
        }
        Ok(())
    })
    .await;

    // The table says the same.
    let out = Command::new(env!("CARGO_BIN_EXE_tidings"))
        .args(["status", "--window", "1s", "--brokers", &brokers, "--topic-prefix", &prefix])
        .args(["--database-url", &db, "--topology"])
        .arg(common::topology_path())
        .env("TIDINGS_LOG", "warn")
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    eprintln!("{table}");
    assert_eq!(out.status.code(), Some(3));
    assert!(table.contains("stopped") && table.contains("wrong-magic-byte") && table.contains(&e1.http), "{table}");
    drop(streams);
    for g in [&mut g1, &mut g2, &mut core] {
        common::sigterm(g).await;
    }
}
