//! Secured Kafka on the real broker: `tidings up` over SASL/SCRAM (the test broker's SASL
//! listener) and over TLS and SASL_SSL (a second broker this test starts with a CA and
//! certificate it generates), end to end from HTTP ingest to a stored notification; a wrong
//! password or an untrusted certificate makes `up` exit at once with a clear error, not hang.

mod common;

use common::{count_notifications, eventually, Tidings, Up};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tidings_core::kafka::{probe, ConnectError, KafkaConfig};

fn env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: run the tests through .ci/test (compose/start-kafka.sh)"))
}

fn secured(brokers: &str, opts: &[(&str, &str)]) -> KafkaConfig {
    KafkaConfig::with_opts(brokers, opts.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()).unwrap()
}

async fn probe_async(cfg: KafkaConfig) -> Result<(), ConnectError> {
    tokio::task::spawn_blocking(move || probe(&cfg, Duration::from_secs(15))).await.unwrap()
}

/// All stages of `up` on a fresh database, with the given `TIDINGS_*` security settings.
async fn spawn_up(name: &str, brokers: &str, security: &[(&str, &str)]) -> (sqlx::PgPool, Tidings) {
    let (pool, db_url) = common::fresh_pg().await;
    let prefix = common::unique_prefix();
    let stages = "templating,persistence,gateway";
    let up = Up { brokers, database_url: &db_url, prefix: &prefix, stages, registry_url: None };
    (pool, Tidings::spawn_env(name, &up, security))
}

/// Runs `up` with the given security settings, posts one order event and waits for its row.
async fn end_to_end(name: &str, brokers: &str, security: &[(&str, &str)]) {
    let (pool, mut up) = spawn_up(name, brokers, security).await;
    let ep = up.endpoints(Duration::from_secs(60)).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().unwrap();
    let event = json!({"event_id": uuid::Uuid::new_v4().to_string(),
        "occurred_at": chrono::Utc::now().timestamp_micros(), "order_id": format!("o-{name}"), "buyer_id": "u-sec",
        "payload": {"OrderPaid": {"amount_cents": 1200, "currency": "EUR", "payment_method": "card"}}});
    let (status, answer) = common::post(&http, &ep.ingest, "orders", &event).await;
    assert_eq!(status, 202, "{name}: ingest answered {status}: {answer}\n{}", up.log_tail(30));
    eventually(
        &format!("{name}: the notification stored"),
        Duration::from_secs(60),
        Duration::from_millis(200),
        &[&up],
        || async {
            match count_notifications(&pool).await {
                1 => Ok(()),
                n => Err(format!("{n} rows")),
            }
        },
    )
    .await;
    up.signal("TERM");
    let status = up.wait_exit(Duration::from_secs(30)).await;
    assert!(status.is_some_and(|s| s.success()), "{name}: no clean exit: {status:?}\n{}", up.log_tail(30));
}

/// How long a refused `up` may take to exit: longer than the broker probe's 30 s, so the message,
/// not the clock, tells a refusal from a timeout (which would say that no broker answered).
const REFUSED_WITHIN: Duration = Duration::from_secs(45);

/// `up` with bad credentials must exit non-zero within [`REFUSED_WITHIN`], saying `expect`.
async fn refused(name: &str, brokers: &str, security: &[(&str, &str)], expect: &str) {
    let within = REFUSED_WITHIN;
    let (_pool, mut up) = spawn_up(name, brokers, security).await;
    let started = Instant::now();
    let status = up.wait_exit(within).await;
    let log = up.log_tail(20);
    assert!(status.is_some(), "{name}: `up` still running after {within:?} (hangs instead of failing)\n{log}");
    assert!(!status.unwrap().success(), "{name}: `up` exited 0\n{log}");
    assert!(log.contains(expect), "{name}: the error does not say {expect:?}\n{log}");
    eprintln!("{name}: refused in {:.1}s", started.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_scram_and_plain_work_and_a_wrong_password_fails_fast() {
    if common::brokers_or_skip().is_none() {
        return;
    }
    let sasl = env("TIDINGS_TEST_SASL_BROKERS");
    let (user, password) = (env("TIDINGS_TEST_SASL_USER"), env("TIDINGS_TEST_SASL_PASSWORD"));
    for mechanism in ["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"] {
        let cfg = secured(
            &sasl,
            &[
                ("security.protocol", "SASL_PLAINTEXT"),
                ("sasl.mechanism", mechanism),
                ("sasl.username", &user),
                ("sasl.password", &password),
            ],
        );
        probe_async(cfg).await.unwrap_or_else(|e| panic!("{mechanism}: {e}"));
        let wrong = secured(
            &sasl,
            &[
                ("security.protocol", "SASL_PLAINTEXT"),
                ("sasl.mechanism", mechanism),
                ("sasl.username", &user),
                ("sasl.password", "not-the-password"),
            ],
        );
        match probe_async(wrong).await {
            Err(ConnectError::Authentication { .. }) => {}
            other => panic!("{mechanism} with a wrong password: expected an authentication error, got {other:?}"),
        }
    }

    let good = [
        ("TIDINGS_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT"),
        ("TIDINGS_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
        ("TIDINGS_KAFKA_SASL_USERNAME", user.as_str()),
        ("TIDINGS_KAFKA_SASL_PASSWORD", password.as_str()),
    ];
    end_to_end("scram-e2e", &sasl, &good).await;
    let mut bad = good;
    bad[3].1 = "not-the-password";
    refused("scram-wrong-password", &sasl, &bad, "Kafka authentication failed").await;
    // A plaintext client on the SASL listener is also an authentication failure, not a hang.
    refused("sasl-listener-without-sasl", &sasl, &[], "Kafka").await;
}

/// A CA and the PEM keystore Kafka takes: an unencrypted PKCS#8 key, then the certificate chain.
fn make_certs(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let c = tidings_core::testing::certificates(dir, name);
    let keystore = dir.join(format!("{name}-keystore.pem"));
    let mut pem = std::fs::read(&c.key_pkcs8).unwrap();
    pem.extend(std::fs::read(&c.cert).unwrap());
    std::fs::write(&keystore, pem).unwrap();
    (c.ca, keystore)
}

/// A broker started by compose/start-kafka.sh for this test alone; stopped (and its storage
/// deleted) when dropped.
struct TlsBroker {
    port: u16,
    state: PathBuf,
    vars: Vec<(String, String)>,
}

impl TlsBroker {
    fn start(port: u16, keystore: &Path, state: PathBuf) -> TlsBroker {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/start-kafka.sh");
        let out = Command::new("bash")
            .arg(script)
            .env("PORT", port.to_string())
            .env("TLS_KEYSTORE_PEM", keystore)
            .env("KAFKA_STATE_DIR", &state)
            .env("KAFKA_HEAP", "384m")
            .output()
            .expect("running start-kafka.sh");
        let mut broker = TlsBroker { port, state, vars: Vec::new() };
        assert!(out.status.success(), "start-kafka.sh failed: {}", String::from_utf8_lossy(&out.stderr));
        broker.vars = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
            .collect();
        broker
    }

    fn var(&self, name: &str) -> String {
        self.vars
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {name} in {:?}", self.vars))
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/stop-kafka.sh");
        let _ = Command::new("bash")
            .arg(script)
            .env("PORT", self.port.to_string())
            .env("KAFKA_STATE_DIR", &self.state)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_sasl_ssl_work_and_an_untrusted_certificate_fails_fast() {
    if common::brokers_or_skip().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (ca, keystore) = make_certs(dir.path(), "good");
    let (other_ca, _) = make_certs(dir.path(), "other");
    // A port block of its own (PORT..PORT+4), away from the shared test broker's 9092-9094.
    let broker = TlsBroker::start(19_392, &keystore, dir.path().join("kafka"));
    let (ssl, sasl_ssl) = (broker.var("TIDINGS_TEST_SSL_BROKERS"), broker.var("TIDINGS_TEST_SASL_SSL_BROKERS"));
    let (user, password) = (broker.var("TIDINGS_TEST_SASL_USER"), broker.var("TIDINGS_TEST_SASL_PASSWORD"));
    let ca_path = ca.display().to_string();

    let scram_tls = secured(
        &sasl_ssl,
        &[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-256"),
            ("sasl.username", &user),
            ("sasl.password", &password),
            ("ssl.ca.location", &ca_path),
        ],
    );
    probe_async(scram_tls).await.expect("SASL_SSL with SCRAM-SHA-256");

    end_to_end(
        "tls-e2e",
        &ssl,
        &[("TIDINGS_KAFKA_SECURITY_PROTOCOL", "SSL"), ("TIDINGS_KAFKA_SSL_CA_LOCATION", &ca_path)],
    )
    .await;
    let other = other_ca.display().to_string();
    refused(
        "tls-untrusted-certificate",
        &ssl,
        &[("TIDINGS_KAFKA_SECURITY_PROTOCOL", "SSL"), ("TIDINGS_KAFKA_SSL_CA_LOCATION", &other)],
        "TLS to Kafka",
    )
    .await;
}

#[tokio::test]
async fn kafka_opts_that_tidings_pins_are_refused_all_at_once() {
    let out = Command::new(env!("CARGO_BIN_EXE_tidings"))
        .args(["up", "--brokers", "127.0.0.1:1"])
        .args(["--kafka-opt", "enable.auto.offset.store=true", "--kafka-opt", "partitioner=consistent_random"])
        .args(["--kafka-opt", "linger.ms=0"])
        .output()
        .expect("running tidings");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "pinned keys accepted: {stderr}");
    for key in ["enable.auto.offset.store", "partitioner"] {
        assert!(
            stderr.contains(&format!("--kafka-opt {key} is set by tidings itself")),
            "{key} not reported: {stderr}"
        );
    }
    assert!(!stderr.contains("linger.ms"), "an overridable key was refused: {stderr}");
}
