//! The web page's routes on a real local port: the files and their headers, `/config.json`, and
//! `POST /v1/dev/token` only in dev mode (404 otherwise), its tokens accepted by the inbox.

use std::time::Duration;
use tidings_gateway::auth::{AuthConfig, Key, DEV_SECRET};
use tidings_gateway::delivery::owners::RedirectAllow;
use tidings_gateway::web::{DevSignIn, WebConfig, CSP};
use tidings_gateway::{Limits, Parts, Readiness};
use tokio_util::sync::CancellationToken;

async fn start(web: WebConfig) -> (String, CancellationToken) {
    let listener = tidings_gateway::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = tidings_gateway::app(Parts { web: Some(web), ..Default::default() }, Readiness::default());
    let stop = CancellationToken::new();
    tokio::spawn(tidings_gateway::serve(listener, app, Limits::default(), stop.clone()));
    (url, stop)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap()
}

#[tokio::test]
async fn files_with_their_headers_and_no_dev_sign_in_outside_dev_mode() {
    let (url, stop) = start(WebConfig { kinds: vec!["order.paid".into()], dev_sign_in: None, gateways: vec![] }).await;
    let http = client();
    for (path, ty) in [
        ("/", "text/html; charset=utf-8"),
        ("/index.html", "text/html; charset=utf-8"),
        ("/app.js", "text/javascript; charset=utf-8"),
        ("/app.css", "text/css; charset=utf-8"),
        ("/config.json", "application/json"),
    ] {
        let r = http.get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["content-type"], ty, "{path}");
        assert_eq!(r.headers()["cache-control"], "no-cache", "{path}");
        assert_eq!(r.headers()["content-security-policy"], CSP, "{path}");
        assert_eq!(r.headers()["x-content-type-options"], "nosniff", "{path}");
        assert!(!r.text().await.unwrap().is_empty(), "{path}");
    }
    assert!(CSP.starts_with("default-src 'self'"));
    let config: serde_json::Value = http.get(format!("{url}/config.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(config, serde_json::json!({"kinds": ["order.paid"], "dev_sign_in": false}));
    let r =
        http.post(format!("{url}/v1/dev/token")).json(&serde_json::json!({"user_id": "alice"})).send().await.unwrap();
    assert_eq!(r.status(), 404, "dev sign-in outside dev mode");
    assert_eq!(http.get(format!("{url}/nope.js")).send().await.unwrap().status(), 404);
    stop.cancel();
}

#[tokio::test]
async fn dev_sign_in_signs_tokens_the_gateway_accepts() {
    let dev = DevSignIn { issuer: Some("tidings-dev".into()), audience: Some("web".into()) };
    let (url, stop) = start(WebConfig { kinds: vec![], dev_sign_in: Some(dev), gateways: vec![] }).await;
    let http = client();
    let config: serde_json::Value = http.get(format!("{url}/config.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(config["dev_sign_in"], true);
    let r =
        http.post(format!("{url}/v1/dev/token")).json(&serde_json::json!({"user_id": "alice"})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let token = r.json::<serde_json::Value>().await.unwrap()["token"].as_str().unwrap().to_string();
    let auth = AuthConfig {
        issuer: Some("tidings-dev".into()),
        audience: Some("web".into()),
        keys: vec![Key::hs256(DEV_SECRET.as_bytes())],
    };
    assert_eq!(auth.verify(&token).unwrap(), "alice");
    for bad in [serde_json::json!({"user_id": ""}), serde_json::json!({"user_id": "a\nb"}), serde_json::json!({})] {
        let r = http.post(format!("{url}/v1/dev/token")).json(&bad).send().await.unwrap();
        assert_eq!(r.status(), 422, "{bad}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(body["error"]["code"].is_string(), "{body}");
    }
    stop.cancel();
}

/// With `--redirect-allow` origins the page may follow its stream's 307 to them: they, and only
/// they, join `connect-src`; everything else stays as strict.
#[tokio::test]
async fn redirect_targets_are_the_only_other_origins_the_page_may_connect_to() {
    let allow =
        RedirectAllow::new(["https://gw-2.example.com", "https://*.gw.example.com", "http://10.0.0.7:8080"]).unwrap();
    let (url, stop) = start(WebConfig { kinds: vec![], dev_sign_in: None, gateways: allow.origins() }).await;
    let r = client().get(format!("{url}/")).send().await.unwrap();
    let policy = r.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert_eq!(
        policy,
        "default-src 'self'; connect-src 'self' https://gw-2.example.com https://*.gw.example.com http://10.0.0.7:8080; \
         object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    );
    stop.cancel();
}
