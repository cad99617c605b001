//! Every `tidings up` process serves `/metrics`, whatever `--stages` it runs: a templating-only and
//! a persistence-only process on Apache Kafka and PostgreSQL report their groups' consumer lag
//! (`kafka_consumergroup_lag`, `_lag_sum`), which rises while templating is stopped and falls again.

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
    let mut persistence =
        Tidings::spawn_env("persistence", &stage("persistence"), &[STATS, ("TIDINGS_METRICS_LISTEN", &p_metrics)]);
    let (t_url, p_url) = (format!("http://{t_metrics}"), format!("http://{p_metrics}"));
    for url in [&t_url, &p_url] {
        common::await_ready(&http, url, &[&ingest, &templating, &persistence]).await;
    }
    // An ingest-only process serves them too, and is ready once its ingest listener is up.
    for path in ["metrics", "healthz", "readyz"] {
        let r = http.get(format!("http://{ingest_metrics}/{path}")).send().await.expect("ingest's metrics listener");
        assert_eq!(r.status(), 200, "ingest's /{path}");
    }

    let t_lag = vec![format!("consumergroup=\"{prefix}tidings-templating\""), format!("topic=\"{prefix}orders\"")];
    let p_lag =
        vec![format!("consumergroup=\"{prefix}tidings-persistence\""), format!("topic=\"{prefix}notifications\"")];
    let procs = [&ingest, &templating, &persistence];
    let caught_up = |url: String, labels: Vec<String>, what: &'static str| {
        let http = http.clone();
        async move {
            match sample(&http, &url, "kafka_consumergroup_lag_sum", &labels).await? {
                0.0 => Ok(()),
                lag => Err(format!("{what} lag {lag}")),
            }
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
    // Both stage-only processes serve their group's lag, per partition and summed, caught up.
    eventually("both groups caught up", Duration::from_secs(30), Duration::from_millis(100), &procs, || async {
        caught_up(t_url.clone(), t_lag.clone(), "templating").await?;
        caught_up(p_url.clone(), p_lag.clone(), "persistence").await
    })
    .await;
    let partition = [t_lag.clone(), vec!["partition=\"0\"".to_string()]].concat();
    let lag = sample(&http, &t_url, "kafka_consumergroup_lag", &partition).await.unwrap();
    assert_eq!(lag, 0.0, "templating's partition 0 lag");

    // Templating stopped while orders arrive: its group's lag is what the restarted process reports
    // first, and it falls back to 0 as the process catches up.
    sigterm(&mut templating).await;
    orders(&http, &ep.ingest, 1_000).await;
    let mut templating = Tidings::spawn_env("templating-again", &templating_up, &t_env);
    let procs = [&ingest, &templating, &persistence];
    let highest = std::sync::Arc::new(std::sync::Mutex::new(0.0_f64));
    eventually("templating's lag back to 0", Duration::from_secs(90), Duration::from_millis(20), &procs, || {
        let (http, highest) = (http.clone(), highest.clone());
        let (url, labels) = (t_url.clone(), t_lag.clone());
        async move {
            let lag = sample(&http, &url, "kafka_consumergroup_lag_sum", &labels).await?;
            let mut highest = highest.lock().unwrap();
            *highest = highest.max(lag);
            if lag == 0.0 && *highest > 0.0 {
                Ok(())
            } else {
                Err(format!("lag {lag}, highest {highest}"))
            }
        }
    })
    .await;
    let highest = *highest.lock().unwrap();
    assert!(highest > 0.0 && highest <= 1_000.0, "templating's lag after the stop: {highest}");
    eventually("1,020 rows stored", Duration::from_secs(60), Duration::from_millis(200), &procs, || async {
        match common::count_notifications(&pool).await {
            1_020 => Ok(()),
            n => Err(format!("{n} rows")),
        }
    })
    .await;
    for p in [&mut templating, &mut persistence, &mut ingest] {
        sigterm(p).await;
    }
}
