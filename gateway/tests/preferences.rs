//! `GET`/`PUT /v1/me/preferences` served for real on a local port over a SQLite store: a token is
//! required, a bad body is refused with 422 naming each problem (and stores nothing), a good one
//! round-trips, and users do not see each other's preferences.

use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tidings_gateway::auth::{AuthConfig, Key};
use tidings_gateway::preferences::{Category, PreferencesState, MAX_BODY_BYTES};
use tidings_gateway::{Parts, Readiness};

const SECRET: &[u8] = b"test-secret";

fn token(sub: &str) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let claims = json!({"sub": sub, "iat": now, "exp": now + 600});
    let h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    jsonwebtoken::encode(&h, &claims, &jsonwebtoken::EncodingKey::from_secret(SECRET)).unwrap()
}

fn category(name: &str, critical: bool) -> Category {
    Category { name: name.into(), critical, description: format!("{name} notifications") }
}

struct Server {
    url: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn start() -> Server {
    let (store, dir) = tidings_store::testing::fresh_sqlite().await.unwrap();
    let auth = AuthConfig { keys: vec![Key::hs256(SECRET)], ..Default::default() };
    let categories = vec![
        category("orders", false),
        category("payment", true),
        category("campaigns", false),
        category("coupons", false),
    ];
    let state = PreferencesState { store, auth: Arc::new(auth), categories: Arc::new(categories) };
    let app = tidings_gateway::app(Parts { preferences: Some(state), ..Default::default() }, Readiness::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/me/preferences", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Server { url, http: reqwest::Client::new(), _dir: dir }
}

impl Server {
    async fn get(&self, user: Option<&str>) -> (u16, Value) {
        let mut req = self.http.get(&self.url);
        if let Some(u) = user {
            req = req.bearer_auth(token(u));
        }
        respond(req).await
    }

    async fn put(&self, user: Option<&str>, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let mut req = self.http.put(&self.url).header("content-type", "application/json").body(body);
        if let Some(u) = user {
            req = req.bearer_auth(token(u));
        }
        respond(req).await
    }
}

async fn respond(req: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_token_is_required() {
    let s = start().await;
    let (status, body) = s.get(None).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = s.put(None, json!({"opt_out": []}).to_string()).await;
    assert_eq!(status, 401, "{body}");
    let forged = s.http.get(&s.url).bearer_auth("not.a.token").send().await.unwrap();
    assert_eq!(forged.status().as_u16(), 401);
}

#[tokio::test]
async fn defaults_then_a_round_trip_per_user() {
    let s = start().await;
    let (status, body) = s.get(Some("alice")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["opt_out"], json!([]));
    assert_eq!(body["time_zone"], "UTC");
    assert_eq!(body["quiet_hours"], Value::Null);
    // The categories the page shows, critical ones marked.
    assert_eq!(
        body["categories"][1],
        json!({"name": "payment", "critical": true, "description": "payment notifications"})
    );
    assert_eq!(body["categories"].as_array().unwrap().len(), 4);

    let prefs = json!({
        "opt_out": ["coupons", "campaigns", "coupons"],
        "time_zone": "Asia/Seoul",
        "quiet_hours": {"start": "22:00", "end": "08:00"},
    });
    let (status, body) = s.put(Some("alice"), prefs.to_string()).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = s.get(Some("alice")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["opt_out"], json!(["campaigns", "coupons"]), "sorted, each once");
    assert_eq!(body["time_zone"], "Asia/Seoul");
    assert_eq!(body["quiet_hours"], json!({"start": "22:00", "end": "08:00"}));
    // Bob still has the defaults.
    assert_eq!(s.get(Some("bob")).await.1["opt_out"], json!([]));

    // A replace: no quiet hours, one opt-out.
    let (status, _) = s
        .put(
            Some("alice"),
            json!({"opt_out": ["orders"], "time_zone": "Europe/Berlin", "quiet_hours": null}).to_string(),
        )
        .await;
    assert_eq!(status, 200);
    let body = s.get(Some("alice")).await.1;
    assert_eq!((body["opt_out"].clone(), body["quiet_hours"].clone()), (json!(["orders"]), Value::Null));
    assert_eq!(body["time_zone"], "Europe/Berlin");
}

#[tokio::test]
async fn a_bad_body_names_each_problem_and_stores_nothing() {
    let s = start().await;
    let bad = json!({
        "opt_out": ["campaigns", "newsletters", "payment"],
        "time_zone": "Mars/Olympus",
        "quiet_hours": {"start": "25:00", "end": "8am"},
    });
    let (status, body) = s.put(Some("alice"), bad.to_string()).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_preferences");
    let problems: Vec<(String, String)> = body["error"]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["path"].as_str().unwrap().to_owned(), p["message"].as_str().unwrap().to_owned()))
        .collect();
    let paths: Vec<&str> = problems.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(paths, ["opt_out[1]", "opt_out[2]", "time_zone", "quiet_hours.start", "quiet_hours.end"], "{body}");
    assert!(problems[0].1.contains("unknown category \"newsletters\""), "{body}");
    assert!(problems[1].1.contains("\"payment\" is critical"), "{body}");
    assert!(problems[2].1.contains("\"Mars/Olympus\" is not an IANA time zone"), "{body}");
    assert!(problems[3].1.contains("\"25:00\" is not a time of day as HH:MM"), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("time_zone:"), "{body}");
    // Nothing of it was stored, not even the valid opt-out.
    assert_eq!(s.get(Some("alice")).await.1["opt_out"], json!([]));

    // Equal start and end, an unknown field, a wrong type, not JSON, too large.
    let (status, body) =
        s.put(Some("alice"), json!({"quiet_hours": {"start": "08:00", "end": "08:00"}}).to_string()).await;
    assert_eq!((status, body["error"]["problems"][0]["path"].as_str()), (422, Some("quiet_hours")), "{body}");
    let (status, body) = s.put(Some("alice"), json!({"opt_outs": ["campaigns"]}).to_string()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("invalid_json")), "{body}");
    let (status, body) = s.put(Some("alice"), json!({"opt_out": "campaigns"}).to_string()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("invalid_json")), "{body}");
    let (status, _) = s.put(Some("alice"), "{not json").await;
    assert_eq!(status, 400);
    let huge = json!({"opt_out": vec!["campaigns"; MAX_BODY_BYTES / 8]}).to_string();
    let (status, body) = s.put(Some("alice"), huge).await;
    assert_eq!((status, body["error"]["code"].as_str()), (413, Some("body_too_large")), "{body}");
}

#[tokio::test]
async fn a_locale_is_saved_replaced_and_checked() {
    let s = start().await;
    assert_eq!(s.get(Some("alice")).await.1["locale"], Value::Null, "no locale: each campaign's default");
    let (status, body) = s.put(Some("alice"), json!({"locale": "pt-BR", "time_zone": "Asia/Seoul"}).to_string()).await;
    assert_eq!((status, body["locale"].clone()), (200, json!("pt-BR")), "{body}");
    assert_eq!(s.get(Some("alice")).await.1["locale"], "pt-BR");
    assert_eq!(s.get(Some("bob")).await.1["locale"], Value::Null);
    // Malformed: 422 naming it with the other problems, nothing stored.
    let (status, body) =
        s.put(Some("alice"), json!({"locale": "pt_BR!", "time_zone": "Mars/Olympus"}).to_string()).await;
    assert_eq!(status, 422, "{body}");
    let paths: Vec<&str> =
        body["error"]["problems"].as_array().unwrap().iter().map(|p| p["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["locale", "time_zone"], "{body}");
    assert!(body["error"]["problems"][0]["message"].as_str().unwrap().contains("\"pt_BR!\" is not a language tag"));
    assert_eq!(s.get(Some("alice")).await.1["locale"], "pt-BR");
    // A body without one is a replace to none.
    let (status, _) = s.put(Some("alice"), json!({"opt_out": []}).to_string()).await;
    assert_eq!(status, 200);
    assert_eq!(s.get(Some("alice")).await.1["locale"], Value::Null);
}
