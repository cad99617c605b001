//! Secure by default, on the embedded defaults: the dev secret and dev ingest token only with
//! `--dev`; event ingest only on its own listener and only for a service token (401 without or
//! with an unknown one, 403 for a user's token); the public port does not serve it at all. Weak
//! secrets and tokens are refused, every bad setting at once (exit 64) before anything starts;
//! the embedded registry takes writes only with its write token, from loopback too.

mod common;

use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tidings_gateway::auth::{mint_hs256, DEV_SECRET};
use tidings_gateway::service_auth::DEV_SERVICE_TOKEN;

/// A `tidings up` on embedded defaults in its own data directory; killed when dropped.
struct Up {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn command(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tidings"));
    c.arg("up")
        .args(["--http", "127.0.0.1:0", "--registry-listen", "127.0.0.1:0", "--ingest-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir)
        .arg("--topology")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../topology.yaml"))
        .args(args)
        .env("TIDINGS_LOG", "warn")
        .env_remove("TIDINGS_DEV")
        .env_remove("TIDINGS_JWT_SECRET")
        .env_remove("TIDINGS_INGEST_TOKENS")
        .env_remove("TIDINGS_BROKERS")
        .env_remove("TIDINGS_DATABASE_URL")
        .env_remove("TIDINGS_REGISTRY_WRITE_TOKEN")
        .env_remove("TIDINGS_JWT_PUBLIC_KEY_FILE")
        .stdin(Stdio::null());
    c
}

/// Starts `up` and waits for its endpoints file.
fn start(args: &[&str]) -> (Up, Value) {
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("up.log")).unwrap();
    let child = command(dir.path(), args).stdout(Stdio::null()).stderr(log).spawn().unwrap();
    let mut up = Up { child, dir };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(ep) = std::fs::read(up.dir.path().join("endpoints.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        {
            return (up, ep);
        }
        if let Some(status) = up.child.try_wait().unwrap() {
            let log = std::fs::read_to_string(up.dir.path().join("up.log")).unwrap_or_default();
            panic!("`up {args:?}` exited ({status}) before it was up:\n{log}");
        }
        assert!(Instant::now() < deadline, "`up {args:?}` did not start within 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn order() -> Value {
    json!({"event_id": uuid::Uuid::new_v4().to_string(), "occurred_at": chrono::Utc::now().timestamp_micros(),
        "order_id": "o-sec", "buyer_id": "u-sec", "payload": {"OrderPaid": {"amount_cents": 100, "currency": "EUR",
        "payment_method": "card"}}})
}

/// POSTs an order event to `base`, with `token` as the bearer when given: (status, error code).
async fn post(base: &str, token: Option<&str>) -> (u16, String) {
    let mut req = reqwest::Client::new().post(format!("{base}/v1/events/orders")).json(&order());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("POST");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (status, body["error"]["code"].as_str().unwrap_or_default().to_string())
}

fn user_token(secret: &str) -> String {
    mint_hs256(secret.as_bytes(), "u-sec", Duration::from_secs(600), None, None).unwrap()
}

#[test]
fn without_dev_mode_or_a_jwt_key_up_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = command(dir.path(), &[]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "`up` started with the public dev secret outside --dev:\n{stderr}");
    assert!(stderr.contains("--jwt-secret") && stderr.contains("--dev"), "unclear error:\n{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_takes_only_service_tokens_and_only_on_its_own_listener() {
    let (_up, ep) = start(&["--dev"]);
    let (http, ingest) = (ep["http"].as_str().unwrap(), ep["ingest"].as_str().unwrap());
    assert!(!ingest.is_empty() && ingest != http, "ingest must have its own listener: {ep}");

    assert_eq!(post(http, Some(DEV_SERVICE_TOKEN)).await.0, 404, "the public port serves ingest");
    assert_eq!(post(ingest, None).await, (401, "missing_credential".to_string()));
    assert_eq!(post(ingest, Some("not-a-known-token-at-all")).await, (401, "invalid_credential".to_string()));
    assert_eq!(post(ingest, Some(&user_token(DEV_SECRET))).await, (403, "user_token".to_string()));
    assert_eq!(post(ingest, Some(DEV_SERVICE_TOKEN)).await.0, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_dev_mode_only_configured_secrets_and_tokens_work() {
    let secret = "a-real-secret-for-this-test-only";
    let service = "svc-orders-7f3c9a1e5b2d";

    // No ingest token configured: ingest is off, and the dev secret is refused.
    let (_up, ep) = start(&["--jwt-secret", secret]);
    assert_eq!(ep["ingest"], "", "ingest served without any service token: {ep}");
    assert!(ep["ingest_token"].is_null(), "a token written outside dev mode: {ep}");
    let inbox = |base: &str, token: String| {
        let req = reqwest::Client::new().get(format!("{base}/v1/notifications")).bearer_auth(token);
        async move { req.send().await.expect("GET").status().as_u16() }
    };
    let http = ep["http"].as_str().unwrap();
    assert_eq!(inbox(http, user_token(DEV_SECRET)).await, 401, "the dev secret was accepted outside --dev");
    assert_eq!(inbox(http, user_token(secret)).await, 200);

    // A configured service token: accepted; the dev token is not.
    let (_up2, ep) = start(&["--jwt-secret", secret, "--ingest-token", service]);
    let ingest = ep["ingest"].as_str().unwrap();
    assert_eq!(post(ingest, Some(DEV_SERVICE_TOKEN)).await.0, 401, "the dev token was accepted outside --dev");
    assert_eq!(post(ingest, Some(service)).await.0, 202);

    // Guessable tokens are refused at startup.
    let dir = tempfile::tempdir().unwrap();
    let out = command(dir.path(), &["--jwt-secret", secret, "--ingest-token", "short"]).output().unwrap();
    assert!(!out.status.success(), "a 5-character service token was accepted");
}

/// A config file's secrets and lists are used as their flags would be (without the file's key,
/// `up` outside --dev would refuse to start), and a flag still wins over the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_holds_what_flags_hold() {
    use std::os::unix::fs::PermissionsExt;
    let service = "svc-from-the-config-file-01";
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tidings.toml");
    let text = format!("jwt-secret = \"{SECRET}\"\ningest-token = [\"{service}\"]\nhttp = \"127.0.0.1:1\"\n");
    std::fs::write(&config, text).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    // `command` passes --http 127.0.0.1:0, which must beat the file's port 1.
    let (_up, ep) = start(&["--config", config.to_str().unwrap()]);
    let (http, ingest) = (ep["http"].as_str().unwrap(), ep["ingest"].as_str().unwrap());
    assert_ne!(http, "http://127.0.0.1:1", "the file's --http beat the flag");
    let status = reqwest::Client::new()
        .get(format!("{http}/v1/notifications"))
        .bearer_auth(user_token(SECRET))
        .send()
        .await
        .expect("GET")
        .status();
    assert_eq!(status, 200, "the file's jwt-secret is not the gateway's key");
    assert_eq!(post(ingest, Some(service)).await.0, 202, "the file's ingest token is not accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_move_off_the_public_port() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics_addr = free.local_addr().unwrap().to_string();
    drop(free);
    let (_up, ep) = start(&["--dev", "--metrics-listen", &metrics_addr]);
    let http = ep["http"].as_str().unwrap();
    let get = |url: String| async move { reqwest::get(url).await.expect("GET") };
    assert_eq!(get(format!("{http}/metrics")).await.status(), 404, "/metrics still on the public port");
    let resp = get(format!("http://{metrics_addr}/metrics")).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("tidings_"), "no tidings metrics on the metrics port");
}

/// A secret long enough for HS256 (32 bytes).
const SECRET: &str = "a-real-secret-for-this-test-only";

/// Runs `up` with `args` and `env` in a data directory that does not exist yet, expecting a
/// refusal: (exit code, stderr), after checking the data directory was not created.
fn refused(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    refused_with(|data_dir| command(data_dir, args), env)
}

/// [`refused`] for the command `up` makes for a data directory. An `up` that starts instead is
/// killed after 30 s and fails the test.
fn refused_with(up: impl Fn(&Path) -> Command, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let parent = tempfile::tempdir().unwrap();
    let data_dir = parent.path().join("data");
    let log_path = parent.path().join("stderr.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = up(&data_dir).envs(env.iter().copied()).stdout(Stdio::null()).stderr(log).spawn().unwrap();
    let status = exit_within(&mut child, Duration::from_secs(30), &log_path, "`up` started instead of refusing");
    let stderr = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(!data_dir.exists(), "a refused `up` created its data directory:\n{stderr}");
    (status.code(), stderr)
}

#[test]
fn weak_jwt_secrets_are_refused_outside_dev_mode() {
    let short = &format!("--jwt-secret={}", &SECRET[1..]);
    let dev = &format!("--jwt-secret={DEV_SECRET}");
    for arg in ["--jwt-secret=", short, dev] {
        let (code, stderr) = refused(&[arg], &[]);
        assert_eq!(code, Some(64), "{arg} not refused as a usage error:\n{stderr}");
        assert!(stderr.contains("--jwt-secret"), "the error does not name the setting:\n{stderr}");
    }
    // An unset variable of a deployment template: TIDINGS_JWT_SECRET= .
    let (code, stderr) = refused(&[], &[("TIDINGS_JWT_SECRET", "")]);
    assert_eq!(code, Some(64), "an empty TIDINGS_JWT_SECRET was accepted:\n{stderr}");
    assert!(stderr.contains("TIDINGS_JWT_SECRET") && stderr.contains("empty"), "{stderr}");
    let (_, stderr) = refused(&[short], &[]);
    assert!(stderr.contains("31 bytes") && stderr.contains("at least 32"), "{stderr}");
    let (_, stderr) = refused(&[dev], &[]);
    assert!(stderr.contains("dev secret"), "{stderr}");
}

#[test]
fn weak_registry_write_tokens_are_refused() {
    for token in ["", "0123456789abcdef"] {
        let token_arg = format!("--registry-write-token={token}");
        let (code, stderr) = refused(&["--jwt-secret", SECRET, &token_arg], &[]);
        assert_eq!(code, Some(64), "--registry-write-token {token:?} not refused:\n{stderr}");
        assert!(stderr.contains("--registry-write-token"), "the error does not name the setting:\n{stderr}");
    }
}

#[test]
fn every_bad_setting_is_reported_at_once_before_anything_starts() {
    let Some(brokers) = common::brokers_or_skip() else { return };
    let prefix = common::unique_prefix();
    let ports: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", common::free_port())).collect();
    let key = tempfile::tempdir().unwrap();
    let missing_key = key.path().join("no-such-key.pem");
    // A config file with a typo'd key beside a good one.
    let config = key.path().join("tidings.toml");
    std::fs::write(&config, "grace-secs = 5\nmax-conections = 100\n").unwrap();
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--brokers",
        &brokers,
        "--topic-prefix",
        &prefix,
        "--ingest-token",
        "svc-orders-7f3c9a1e5b2d",
        "--jwt-public-key-file",
        missing_key.to_str().unwrap(),
        "--stages",
        "templating,persistence,gateway,teleport",
        "--redirect-allow",
        "ftp://gw.example.com",
        "--database-url",
        "mysql://db.example.com/tidings",
        "--kafka-opt",
        "enable.auto.commit=true",
        "--stream-secret",
        "too-short",
    ];
    // `command` with the three listeners on ports known to be free.
    let up = |data_dir: &Path| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tidings"));
        c.arg("up")
            .args(["--http", &ports[0], "--registry-listen", &ports[1], "--ingest-listen", &ports[2]])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--topology")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../topology.yaml"))
            .args(args)
            .env("TIDINGS_LOG", "warn")
            .env_remove("TIDINGS_DEV")
            .env_remove("TIDINGS_JWT_SECRET")
            .stdin(Stdio::null());
        c
    };
    let (code, stderr) = refused_with(up, &[]);
    for named in [
        "--jwt-public-key-file",
        "--stages",
        "teleport",
        "--redirect-allow",
        "--database-url",
        "enable.auto.commit",
        "--stream-secret",
        "unknown key `max-conections`",
    ] {
        assert!(stderr.contains(named), "{named} not reported:\n{stderr}");
    }
    assert_eq!(code, Some(64), "not a usage error:\n{stderr}");
    for port in &ports {
        std::net::TcpListener::bind(port).unwrap_or_else(|e| panic!("{port} is taken after a refused `up`: {e}"));
    }
    assert_eq!(common::topics_with_prefix(&brokers, &prefix), Vec::<String>::new(), "topics created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_registry_takes_writes_only_with_its_generated_token() {
    let (up, ep) = start(&["--dev"]);
    let base = ep["schema_registry_url"].as_str().unwrap();
    let path = up.dir.path().join("registry-write-token");
    let token = std::fs::read_to_string(&path).expect("the generated write token");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600, "{}", path.display());
    assert!(token.len() >= 32, "a short token: {token:?}");

    let client = reqwest::Client::new();
    let schema = json!({"schema": r#"{"type":"record","name":"T","fields":[{"name":"a","type":"string"}]}"#});
    let register = |auth: Option<&str>, content_type: Option<&str>| {
        let mut req = client.post(format!("{base}/subjects/probe-value/versions")).body(schema.to_string());
        if let Some(a) = auth {
            req = req.bearer_auth(a);
        }
        if let Some(t) = content_type {
            req = req.header("content-type", t);
        }
        async move { req.send().await.expect("POST").status().as_u16() }
    };
    // From loopback, as a browser page's simple request or a local process without the token.
    assert_eq!(register(None, Some("application/json")).await, 401, "loopback still counts as a credential");
    assert_eq!(register(Some(&token), None).await, 415, "a write without a JSON content type");
    assert_eq!(register(Some(&token), Some("application/vnd.schemaregistry.v1+json")).await, 200);
    let read = client.get(format!("{base}/subjects/probe-value/versions")).send().await.unwrap();
    assert_eq!(read.status(), 200, "reads stay open");
}

/// A templating-only `up` beside another's embedded registry, without its write token: the
/// topology's schemas are there already (reads do), but registering templating's output is
/// refused (401), a configuration error: `up` exits non-zero naming the credential settings
/// instead of restarting the stage with a growing backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_without_registry_write_credentials_ends_up_naming_the_setting() {
    let (_first, ep) = start(&["--dev"]);
    let registry = ep["schema_registry_url"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("up.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = command(dir.path(), &["--dev", "--stages", "templating", "--schema-registry-url", registry])
        .env_remove("TIDINGS_SCHEMA_REGISTRY_BEARER_TOKEN")
        .env_remove("TIDINGS_SCHEMA_REGISTRY_BASIC_AUTH")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let status = exit_within(&mut child, Duration::from_secs(60), &log_path, "`up` still runs after 60 s");
    let stderr = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(!status.success(), "`up` exited cleanly:\n{stderr}");
    assert!(
        stderr.contains("templating") && stderr.contains("HTTP 401") && stderr.contains("TIDINGS_REGISTRY_WRITE_TOKEN"),
        "the error does not name the stage, the status and the setting:\n{stderr}"
    );
}

/// Waits for `child` to exit within `limit`; past it, kills it and fails with `what` and its log.
fn exit_within(
    child: &mut std::process::Child,
    limit: Duration,
    log: &std::path::Path,
    what: &str,
) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}:\n{}", std::fs::read_to_string(log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
