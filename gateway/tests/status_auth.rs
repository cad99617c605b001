//! `GET /v1/status` answers only a service token or an admin user's token: none is 401, an
//! unknown or expired token 401, a plain user 403, a service or an admin 200 with the report.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tidings_core::status::{GroupStatus, State, StatusReport};
use tidings_gateway::auth::{mint_hs256, AuthConfig, Key, DEV_SECRET};
use tidings_gateway::service_auth::ServiceTokens;
use tidings_gateway::status::{StatusSource, StatusState};
use tidings_gateway::{Parts, Readiness};

const SERVICE: &str = "svc-status-0123456789";

struct Fixed(StatusReport);

impl StatusSource for Fixed {
    fn report(&self) -> Pin<Box<dyn Future<Output = Result<StatusReport, String>> + Send + '_>> {
        Box::pin(async move { Ok(self.0.clone()) })
    }
}

fn report() -> StatusReport {
    StatusReport {
        generated_at_ms: 1,
        window_ms: 0,
        samples: 1,
        ok: false,
        topology: vec![],
        instances: vec![],
        groups: vec![GroupStatus {
            stage: "persistence".into(),
            group: "tidings-persistence".into(),
            state: State::Stopped,
            reason: Some("no live instance runs it".into()),
            members: 0,
            instances: vec![],
            lag_messages: Some(4),
            lag_seconds: Some(2.5),
            partitions: vec![],
        }],
        dead_letters: vec![tidings_core::status::DeadLetterCount {
            topic: "tidings.dlq.templating".into(),
            total: 2,
            counted: 2,
            by_reason: BTreeMap::from([("unknown-schema-id".into(), 2)]),
        }],
        gateways: vec![],
    }
}

async fn start(admins: &[&str]) -> String {
    let state = StatusState {
        source: Arc::new(Fixed(report())),
        services: ServiceTokens::new([SERVICE]).unwrap(),
        auth: Arc::new(AuthConfig { keys: vec![Key::hs256(DEV_SECRET.as_bytes())], ..Default::default() }),
        admins: Arc::new(admins.iter().map(|a| a.to_string()).collect()),
    };
    let app = tidings_gateway::app(Parts { status: Some(state), ..Default::default() }, Readiness::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

fn user(sub: &str) -> String {
    mint_hs256(DEV_SECRET.as_bytes(), sub, Duration::from_secs(60), None, None).unwrap()
}

async fn get(base: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new().get(format!("{base}/v1/status"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(serde_json::Value::Null))
}

#[tokio::test]
async fn only_services_and_admins_read_the_status() {
    let base = start(&["root-admin"]).await;
    assert_eq!(get(&base, None).await.0, 401, "no credential");
    assert_eq!(get(&base, Some("svc-unknown-0123456789")).await.0, 401, "unknown token");
    let other_key =
        mint_hs256(b"another-secret-of-32-bytes-or-more!!", "root-admin", Duration::from_secs(60), None, None);
    assert_eq!(get(&base, Some(&other_key.unwrap())).await.0, 401, "a token signed with another key");
    let (status, body) = get(&base, Some(&user("alice"))).await;
    assert_eq!(status, 403, "a plain user: {body}");
    assert_eq!(body["error"]["code"], "not_admin");

    for token in [SERVICE.to_string(), user("root-admin")] {
        let (status, body) = get(&base, Some(&token)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["ok"], false);
        assert_eq!(body["groups"][0]["state"], "stopped");
        assert_eq!(body["dead_letters"][0]["by_reason"]["unknown-schema-id"], 2);
    }
}

#[tokio::test]
async fn no_admins_by_default() {
    let base = start(&[]).await;
    assert_eq!(get(&base, Some(&user("root-admin"))).await.0, 403);
    assert_eq!(get(&base, Some(SERVICE)).await.0, 200);
}
