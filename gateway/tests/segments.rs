//! The segment endpoints served for real on a local port over a SQLite store: a service token
//! only (none 401, a user token 403), CSV and JSON bodies, replace / append / delete / list / show,
//! bad rows a 422 naming their lines with nothing changed, and the body size limit.

use reqwest::StatusCode;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tidings_gateway::auth::{self, AuthConfig, Key};
use tidings_gateway::segments::{SegmentsConfig, SegmentsState};
use tidings_gateway::service_auth::ServiceTokens;
use tidings_gateway::{Parts, Readiness};
use tidings_store::Store;

const SERVICE: &str = "svc-campaigns-0123456789";
const SECRET: &[u8] = b"test-secret";

struct Server {
    base: String,
    http: reqwest::Client,
    store: Store,
    _dir: tempfile::TempDir,
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `method path` with the service token and a body of `content_type`.
    async fn send(&self, method: reqwest::Method, path: &str, content_type: &str, body: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .request(method, self.url(path))
            .bearer_auth(SERVICE)
            .header("content-type", content_type)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self.http.get(self.url(path)).bearer_auth(SERVICE).send().await.unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn members(&self, name: &str) -> Vec<String> {
        self.store.segment_members_page(name, None, u32::MAX).await.unwrap()
    }
}

async fn start(max_body_bytes: usize) -> Server {
    let (store, dir) = tidings_store::testing::fresh_sqlite().await.unwrap();
    let users = AuthConfig { keys: vec![Key::hs256(SECRET)], ..Default::default() };
    let config = SegmentsConfig { max_body_bytes, max_id_bytes: 16, ..Default::default() };
    let state = SegmentsState {
        store: store.clone(),
        tokens: ServiceTokens::new([SERVICE]).unwrap(),
        users: Some(Arc::new(users)),
        config,
    };
    let app =
        tidings_gateway::app(Parts { segments: Some(Arc::new(state)), ..Default::default() }, Readiness::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Server { base, http: reqwest::Client::new(), store, _dir: dir }
}

#[tokio::test]
async fn only_a_service_token_changes_or_reads_segments() {
    let s = start(1 << 20).await;
    let user = auth::mint_hs256(SECRET, "u1", Duration::from_secs(60), None, None).unwrap();
    for (method, path) in [
        (reqwest::Method::PUT, "/v1/segments/vip"),
        (reqwest::Method::POST, "/v1/segments/vip"),
        (reqwest::Method::DELETE, "/v1/segments/vip"),
        (reqwest::Method::GET, "/v1/segments/vip"),
        (reqwest::Method::GET, "/v1/segments"),
    ] {
        let none = s.http.request(method.clone(), s.url(path)).body("user_id\nu1\n").send().await.unwrap();
        assert_eq!(none.status(), StatusCode::UNAUTHORIZED, "{method} {path} without a token");
        let wrong = s.http.request(method.clone(), s.url(path)).bearer_auth("svc-unknown-0123456789").send();
        assert_eq!(wrong.await.unwrap().status(), StatusCode::UNAUTHORIZED, "{method} {path} with an unknown token");
        let as_user = s
            .http
            .request(method.clone(), s.url(path))
            .bearer_auth(&user)
            .header("content-type", "text/csv")
            .body("user_id\nu1\n")
            .send()
            .await
            .unwrap();
        assert_eq!(as_user.status(), StatusCode::FORBIDDEN, "{method} {path} with a user token");
    }
    assert!(s.store.segment("vip").await.unwrap().is_none(), "a refused request changed something");
}

#[tokio::test]
async fn csv_and_json_bodies_replace_append_list_show_and_delete() {
    let s = start(1 << 20).await;
    let put = |body: &'static str| s.send(reqwest::Method::PUT, "/v1/segments/vip", "text/csv; charset=utf-8", body);
    let (status, body) = put("name,user_id\nA,u1\nB,u2\nC,u3\n").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!((body["segment"]["size"].clone(), body["loaded"].clone()), (json!(3), json!(3)), "{body}");

    let (status, body) =
        s.send(reqwest::Method::POST, "/v1/segments/vip", "application/json", r#"{"user_ids": ["u3", "u4"]}"#).await;
    assert_eq!((status, body["added"].clone(), body["segment"]["size"].clone()), (StatusCode::OK, json!(1), json!(4)));
    // A CSV without a header, the id by position.
    let (status, body) =
        s.send(reqwest::Method::POST, "/v1/segments/vip?header=false&column=2", "text/csv", "x,u5\ny,u6\n").await;
    assert_eq!((status, body["added"].clone()), (StatusCode::OK, json!(2)), "{body}");
    assert_eq!(s.members("vip").await, ["u1", "u2", "u3", "u4", "u5", "u6"]);

    // Replace: the new members only.
    let (status, _) =
        s.send(reqwest::Method::PUT, "/v1/segments/vip", "application/json", r#"{"user_ids": ["n1", "n2"]}"#).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s.members("vip").await, ["n1", "n2"]);
    s.send(reqwest::Method::PUT, "/v1/segments/other", "text/csv", "user_id\nz\n").await;

    let (status, one) = s.get("/v1/segments/vip").await;
    assert_eq!((status, one["name"].clone(), one["size"].clone()), (StatusCode::OK, json!("vip"), json!(2)));
    assert!(one["updated_at"].as_str().is_some_and(|t| t.starts_with("20")), "{one}");
    let (_, all) = s.get("/v1/segments").await;
    let names: Vec<_> = all["segments"].as_array().unwrap().iter().map(|s| s["name"].clone()).collect();
    assert_eq!(names, [json!("other"), json!("vip")]);
    let (_, first) = s.get("/v1/segments?limit=1").await;
    assert_eq!((first["segments"].as_array().unwrap().len(), first["next"].clone()), (1, json!("other")));
    let (_, rest) = s.get("/v1/segments?after=other").await;
    assert_eq!(rest["segments"][0]["name"], "vip");

    let del = s.http.delete(s.url("/v1/segments/vip")).bearer_auth(SERVICE).send().await.unwrap();
    assert_eq!(del.status(), StatusCode::NO_CONTENT);
    let (status, body) = s.get("/v1/segments/vip").await;
    assert_eq!((status, body["error"]["code"].clone()), (StatusCode::NOT_FOUND, json!("unknown_segment")));
    let again = s.http.delete(s.url("/v1/segments/vip")).bearer_auth(SERVICE).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bad_input_is_a_4xx_naming_the_problem_and_changes_nothing() {
    let s = start(4096).await;
    s.send(reqwest::Method::PUT, "/v1/segments/vip", "text/csv", "user_id\nold\n").await;
    let before = s.store.segment("vip").await.unwrap().unwrap();

    // Line 3 empty, line 4 one column too many, line 5 longer than 16 bytes.
    let bad_csv = "user_id,plan\nu1,a\n,b\nu2,c,d\nthis-id-is-too-long,e\nu3,f\n";
    for method in [reqwest::Method::PUT, reqwest::Method::POST] {
        let (status, body) = s.send(method.clone(), "/v1/segments/vip", "text/csv", bad_csv).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{method}: {body}");
        assert_eq!(body["error"]["code"], "bad_rows");
        let message = body["error"]["message"].as_str().unwrap();
        for needle in ["3 bad row(s)", "line 3: empty", "line 4: 3 column(s)", "line 5: user id of 19 bytes"] {
            assert!(message.contains(needle), "{method}: {needle:?} not in {message}");
        }
    }
    let (status, body) =
        s.send(reqwest::Method::PUT, "/v1/segments/vip", "application/json", r#"{"user_ids": ["a", "", "b"]}"#).await;
    assert_eq!((status, body["error"]["code"].clone()), (StatusCode::UNPROCESSABLE_ENTITY, json!("bad_user_ids")));
    assert!(body["error"]["message"].as_str().unwrap().contains("user_ids[1]: empty user id"), "{body}");
    let (status, body) = s.send(reqwest::Method::PUT, "/v1/segments/vip", "text/csv", "id\nx\n").await;
    assert_eq!((status, body["error"]["code"].clone()), (StatusCode::UNPROCESSABLE_ENTITY, json!("bad_header")));
    let (status, _) = s.send(reqwest::Method::PUT, "/v1/segments/vip", "application/json", r#"{"ids": []}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = s.send(reqwest::Method::PUT, "/v1/segments/vip", "text/plain", "user_id\nx\n").await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (status, body) = s.send(reqwest::Method::PUT, "/v1/segments/a%20b", "text/csv", "user_id\nx\n").await;
    assert_eq!((status, body["error"]["code"].clone()), (StatusCode::BAD_REQUEST, json!("bad_segment_name")));
    let (status, _) = s.send(reqwest::Method::PUT, "/v1/segments/vip?on_error=maybe", "text/csv", "user_id\nx\n").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let big = format!("user_id\n{}", "u\n".repeat(4096));
    let (status, _) = s.send(reqwest::Method::PUT, "/v1/segments/vip", "text/csv", &big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(s.store.segment("vip").await.unwrap().unwrap(), before, "a refused request changed the segment");
    assert_eq!(s.members("vip").await, ["old"]);

    // Skip mode loads the good rows and names the skipped ones.
    let (status, body) = s.send(reqwest::Method::PUT, "/v1/segments/vip?on_error=skip", "text/csv", bad_csv).await;
    assert_eq!((status, body["skipped"].clone()), (StatusCode::OK, json!(3)), "{body}");
    assert_eq!(body["skipped_rows"][0], json!({"line": 3, "problem": "empty user id"}));
    assert_eq!(s.members("vip").await, ["u1", "u3"]);
}
