//! Every `tidings up` process serves `/metrics`, whatever `--stages` it runs: templating-only,
//! persistence-only and gateway-only processes on Apache Kafka and PostgreSQL report their groups'
//! consumer lag in messages (`kafka_consumergroup_lag`, `_lag_sum`) and in seconds
//! (`kafka_consumergroup_lag_seconds`, `_max`), and their latencies as bucketed histograms; the lag
//! of a stopped stage is what its restarted process reports first, and it falls back to 0.

mod common;

use common::{eventually, fresh_pg, sigterm, unique_prefix, Tidings, Up};
use serde_json::json;
use std::time::Duration;
use tokio::task::JoinSet;

/// Reports every 100 ms, so a lag shows within a scrape or two.
const STATS: (&str, &str) = ("TIDINGS_KAFKA_OPTS", "statistics.interval.ms=100");

/// The ingest process's embedded registry's write token: templating registers the schemas it writes.
const REGISTRY_TOKEN: &str = "metrics-everywhere-registry-token-0123456789";

/// A port nothing listens on now (bound and released), for a process's `--metrics-listen`.
fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().unwrap().to_string()
}

/// The value of the `name` sample whose labels include each of `labels` (`key="value"`).
async fn sample(http: &reqwest::Client, url: &str, name: &str, labels: &[String]) -> Result<f64, String> {
    let resp = http.get(format!("{url}/metrics")).send().await.map_err(|e| format!("{url}: {e}"))?;
    let text = resp.text().await.map_err(|e| format!("{url}: {e}"))?;
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|x| l.contains(x.as_str())))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .ok_or_else(|| format!("{url}: no {name} with {labels:?} in /metrics:\n{text}"))
}

/// Whether `/metrics` at `url` has a bucket line of histogram `name` with each of `labels`, and
/// the histogram's count (with those labels) is above 0.
async fn histogram(http: &reqwest::Client, url: &str, name: &str, labels: &[String]) -> Result<(), String> {
    sample(http, url, &format!("{name}_bucket"), &[labels, &["le=\"+Inf\"".to_string()]].concat()).await?;
    match sample(http, url, &format!("{name}_count"), labels).await? {
        n if n > 0.0 => Ok(()),
        _ => Err(format!("{url}: {name} {labels:?} has no observations")),
    }
}

/// Follows `what`'s lag (each of `names` with `labels`) at `url` until every one is 0 after having
/// been above 0; returns the highest value of each.
async fn lag_falls<const N: usize>(
    http: &reqwest::Client,
    url: &str,
    names: [&'static str; N],
    labels: &[String],
    what: &str,
    procs: &[&Tidings],
) -> [f64; N] {
    let highest = std::sync::Arc::new(std::sync::Mutex::new([0.0_f64; N]));
    eventually(what, Duration::from_secs(90), Duration::from_millis(20), procs, || {
        let (http, highest, url, labels) = (http.clone(), highest.clone(), url.to_string(), labels.to_vec());
        async move {
            let mut lags = [0.0; N];
            for (lag, name) in lags.iter_mut().zip(names) {
                *lag = sample(&http, &url, name, &labels).await?;
            }
            let mut highest = highest.lock().unwrap();
            for (h, lag) in highest.iter_mut().zip(lags) {
                *h = h.max(lag);
            }
            if lags.iter().all(|l| *l == 0.0) && highest.iter().all(|h| *h > 0.0) {
                Ok(())
            } else {
                Err(format!("{names:?} {lags:?}, highest {highest:?}"))
            }
        }
    })
    .await;
    let highest = *highest.lock().unwrap();
    highest
}

/// Posts `n` OrderPlaced events over HTTP ingest, 16 at a time.
async fn orders(http: &reqwest::Client, ingest: &str, n: usize) {
    let mut posts = JoinSet::new();
    for i in 0..n {
        if posts.len() >= 16 {
            posts.join_next().await.unwrap().unwrap();
        }
        let (http, url) = (http.clone(), format!("{ingest}/v1/events/orders"));
        posts.spawn(async move {
            let id = uuid::Uuid::new_v4().to_string();
            let body = json!({"event_id": id, "occurred_at": chrono::Utc::now().timestamp_micros(),
                "order_id": format!("o-{i}"), "buyer_id": format!("u{}", i % 50), "locale": "en",
                "payload": {"OrderPlaced": {"amount_cents": 1250, "currency": "EUR", "items": []}}});
            let r = http.post(url).bearer_auth(common::ingest_token()).json(&body).send().await.expect("POST");
            assert_eq!(r.status(), 202, "ingest refused an order: {}", r.text().await.unwrap_or_default());
        });
    }
    while let Some(r) = posts.join_next().await {
        r.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stage_only_processes_serve_their_groups_lag() {
    let Some(brokers) = common::brokers_or_skip() else { return };
    let (pool, db) = fresh_pg().await;
    let prefix = unique_prefix();
    let http = reqwest::Client::new();
    let (ingest_metrics, t_metrics, p_metrics) = (free_port(), free_port(), free_port());

    // Ingest (with the embedded registry) in a process of its own, so templating can stop alone.
    let up = Up { brokers: &brokers, database_url: &db, prefix: &prefix, stages: "ingest", registry_url: None };
    let mut ingest = Tidings::spawn_env(
        "ingest",
        &up,
        &[STATS, ("TIDINGS_METRICS_LISTEN", &ingest_metrics), ("TIDINGS_REGISTRY_WRITE_TOKEN", REGISTRY_TOKEN)],
    );
    let ep = ingest.endpoints(Duration::from_secs(60)).await;
    let stage = |stages| Up {
        brokers: &brokers,
        database_url: &db,
        prefix: &prefix,
        stages,
        registry_url: Some(&ep.schema_registry_url),
    };
    let templating_up = stage("templating");
    let t_env = [
        STATS,
        ("TIDINGS_METRICS_LISTEN", t_metrics.as_str()),
        ("TIDINGS_SCHEMA_REGISTRY_BEARER_TOKEN", REGISTRY_TOKEN),
    ];
    let mut templating = Tidings::spawn_env("templating", &templating_up, &t_env);
    let persistence_up = stage("persistence");
    let p_env = [STATS, ("TIDINGS_METRICS_LISTEN", p_metrics.as_str())];
    let mut persistence = Tidings::spawn_env("persistence", &persistence_up, &p_env);
    // A gateway-only process serves /metrics on its own HTTP listener.
    let mut gateway = Tidings::spawn_env("gateway", &stage("gateway"), &[STATS]);
    let g_url = gateway.endpoints(Duration::from_secs(60)).await.http;
    let (t_url, p_url) = (format!("http://{t_metrics}"), format!("http://{p_metrics}"));
    for url in [&t_url, &p_url, &g_url] {
        common::await_ready(&http, url, &[&ingest, &templating, &persistence, &gateway]).await;
    }
    // An ingest-only process serves them too, and is ready once its ingest listener is up.
    for path in ["metrics", "healthz", "readyz"] {
        let r = http.get(format!("http://{ingest_metrics}/{path}")).send().await.expect("ingest's metrics listener");
        assert_eq!(r.status(), 200, "ingest's /{path}");
    }
    // Buyer u0's stream: its orders' notifications are written to it (end to end, `delivered`).
    let stream = common::open_stream(&http, &g_url, "u0", None).await;

    let group_topic = |group: &str, topic: &str| {
        vec![format!("consumergroup=\"{prefix}{group}\""), format!("topic=\"{prefix}{topic}\"")]
    };
    let t_lag = group_topic("tidings-templating", "orders");
    let p_lag = group_topic("tidings-persistence", "notifications");
    let g_lag = group_topic("tidings-delivery", "notifications");
    let procs = [&ingest, &templating, &persistence, &gateway];
    let caught_up = |url: String, labels: Vec<String>, what: &'static str| {
        let http = http.clone();
        async move {
            for name in ["kafka_consumergroup_lag_sum", "kafka_consumergroup_lag_seconds_max"] {
                match sample(&http, &url, name, &labels).await? {
                    0.0 => {}
                    lag => return Err(format!("{what} {name} {lag}")),
                }
            }
            Ok(())
        }
    };
    orders(&http, &ep.ingest, 20).await;
    eventually("20 rows stored", Duration::from_secs(60), Duration::from_millis(200), &procs, || async {
        match common::count_notifications(&pool).await {
            20 => Ok(()),
            n => Err(format!("{n} rows")),
        }
    })
    .await;
    // Each stage-only process serves its group's lag, per partition and summed, in messages and in
    // seconds, caught up.
    eventually("every group caught up", Duration::from_secs(30), Duration::from_millis(100), &procs, || async {
        caught_up(t_url.clone(), t_lag.clone(), "templating").await?;
        caught_up(p_url.clone(), p_lag.clone(), "persistence").await?;
        caught_up(g_url.clone(), g_lag.clone(), "delivery").await
    })
    .await;
    for (url, labels) in [(&t_url, &t_lag), (&p_url, &p_lag), (&g_url, &g_lag)] {
        let partition = [labels.clone(), vec!["partition=\"0\"".to_string()]].concat();
        for name in ["kafka_consumergroup_lag", "kafka_consumergroup_lag_seconds"] {
            assert_eq!(sample(&http, url, name, &partition).await.unwrap(), 0.0, "{name} {partition:?}");
        }
    }
    // The latencies are Prometheus histograms with buckets, per stage and end to end.
    eventually("the u0 stream got its orders", Duration::from_secs(30), Duration::from_millis(100), &procs, || {
        let n = stream.names().len();
        async move {
            if n > 0 {
                Ok(())
            } else {
                Err("no event yet".to_string())
            }
        }
    })
    .await;
    let stage_label = |s: &str| vec![format!("stage=\"{s}\"")];
    let to = |t: &str| vec![format!("to=\"{t}\"")];
    eventually("every histogram observed", Duration::from_secs(30), Duration::from_millis(200), &procs, || async {
        histogram(&http, &t_url, "tidings_stage_processing_seconds", &stage_label("templating")).await?;
        histogram(&http, &p_url, "tidings_stage_processing_seconds", &stage_label("persistence")).await?;
        histogram(&http, &p_url, "tidings_stage_batch_records", &stage_label("persistence")).await?;
        histogram(&http, &p_url, "tidings_end_to_end_seconds", &to("stored")).await?;
        histogram(&http, &g_url, "tidings_stage_processing_seconds", &stage_label("delivery")).await?;
        histogram(&http, &g_url, "tidings_end_to_end_seconds", &to("delivered")).await
    })
    .await;
    for (url, stage) in [(&t_url, "templating"), (&p_url, "persistence"), (&g_url, "delivery")] {
        let labels = stage_label(stage);
        let records_in = sample(&http, url, "tidings_stage_records_in_total", &labels).await.unwrap();
        assert!(records_in >= 1.0, "{stage}: tidings_stage_records_in_total {records_in}");
    }
    let stored = sample(&http, &p_url, "tidings_stage_records_out_total", &stage_label("persistence")).await.unwrap();
    assert!(stored >= 20.0, "persistence stored {stored} rows");
    let produced = sample(&http, &t_url, "tidings_stage_records_out_total", &stage_label("templating")).await.unwrap();
    assert!(produced >= 20.0, "templating produced {produced} records");
    let text = http.get(format!("{p_url}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(!text.contains("quantile="), "a summary left in /metrics:\n{text}");

    // Templating and persistence stopped while orders arrive: each group's lag is what its
    // restarted process reports first (in seconds at least as long as the orders waited), and it
    // falls back to 0 as the process catches up.
    sigterm(&mut templating).await;
    sigterm(&mut persistence).await;
    orders(&http, &ep.ingest, 1_000).await;
    let stopped = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut templating = Tidings::spawn_env("templating-again", &templating_up, &t_env);
    let procs = [&ingest, &templating, &persistence, &gateway];
    let waited = stopped.elapsed().as_secs_f64();
    let lags = ["kafka_consumergroup_lag_sum", "kafka_consumergroup_lag_seconds_max"];
    let [highest, highest_s] = lag_falls(&http, &t_url, lags, &t_lag, "templating's lag back to 0", &procs).await;
    assert!(highest > 0.0 && highest <= 1_000.0, "templating's lag after the stop: {highest}");
    assert!(highest_s >= waited - 0.5 && highest_s < 120.0, "templating's lag after the stop: {highest_s} s");
    // Templating wrote 1,000 notifications while persistence was stopped. Persistence keeps its
    // offsets in PostgreSQL: restarted while its table is locked, it reads but stores nothing, so
    // its lag (from the offsets in the database) is seen growing until the lock goes.
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE notifications IN SHARE MODE").execute(&mut *lock).await.unwrap();
    let mut persistence = Tidings::spawn_env("persistence-again", &persistence_up, &p_env);
    let procs = [&ingest, &templating, &persistence, &gateway];
    let first = std::sync::Arc::new(std::sync::Mutex::new(None::<f64>));
    eventually("persistence's lag growing", Duration::from_secs(60), Duration::from_millis(100), &procs, || {
        let (http, url, labels, first) = (http.clone(), p_url.clone(), p_lag.clone(), first.clone());
        async move {
            let lag = sample(&http, &url, "kafka_consumergroup_lag_seconds_max", &labels).await?;
            let messages = sample(&http, &url, "kafka_consumergroup_lag_sum", &labels).await?;
            let first = *first.lock().unwrap().get_or_insert(lag);
            if lag > first + 1.0 && messages >= 1_000.0 {
                Ok(())
            } else {
                Err(format!("lag {lag} s (first {first} s), {messages} messages"))
            }
        }
    })
    .await;
    assert_eq!(common::count_notifications(&pool).await, 20, "stored through the lock");
    lock.rollback().await.unwrap();
    let [highest_s] =
        lag_falls(&http, &p_url, ["kafka_consumergroup_lag_seconds_max"], &p_lag, "persistence's lag in s", &procs)
            .await;
    assert!((2.0..120.0).contains(&highest_s), "persistence's lag after the stop: {highest_s} s");
    eventually("1,020 rows stored", Duration::from_secs(60), Duration::from_millis(200), &procs, || async {
        match common::count_notifications(&pool).await {
            1_020 => Ok(()),
            n => Err(format!("{n} rows")),
        }
    })
    .await;
    for p in [&mut templating, &mut persistence, &mut gateway, &mut ingest] {
        sigterm(p).await;
    }
}
