//! The registry client against an https, credential-checking registry (Confluent Cloud style):
//! a TLS stand-in with a CA and certificate generated here answers `GET /schemas/ids/1` only
//! with the expected `Authorization`; the client must trust the given CA and send the credentials.
//! Plain stand-ins answering one status show how each is classified, by the client and by a stage.

use rdkafka::consumer::StreamConsumer;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tidings_core::shutdown::StageHealth;
use tidings_core::stage::{self, Domain, Processor, StageError};
use tidings_core::{RegistryClient, RegistryEndpoint, RegistryError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// A CA and a server certificate for 127.0.0.1: (ca, cert, key) as PEM bytes.
fn certs(dir: &Path) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let c = tidings_core::testing::certificates(dir, "registry");
    let read = |p: &Path| std::fs::read(p).unwrap();
    (read(&c.ca), read(&c.cert), read(&c.key_pkcs8))
}

/// Serves `GET /schemas/ids/1` over TLS, 401 unless `Authorization` is `want`; records what came.
async fn serve(cert: Vec<u8>, key: Vec<u8>, want: String, seen: Arc<Mutex<Vec<String>>>) -> String {
    let identity = tokio_native_tls::native_tls::Identity::from_pkcs8(&cert, &key).expect("identity");
    let acceptor = tokio_native_tls::TlsAcceptor::from(
        tokio_native_tls::native_tls::TlsAcceptor::new(identity).expect("acceptor"),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let (acceptor, want, seen) = (acceptor.clone(), want.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut buf = vec![0u8; 8192];
                let mut len = 0;
                while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && len < buf.len() {
                    match tls.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => len += n,
                    }
                }
                let head = String::from_utf8_lossy(&buf[..len]).to_string();
                let auth = head
                    .lines()
                    .find_map(|l| l.strip_prefix("authorization: ").or_else(|| l.strip_prefix("Authorization: ")))
                    .unwrap_or("")
                    .to_string();
                seen.lock().unwrap().push(auth.clone());
                let (status, body) = if auth == want
                    && (head.starts_with("GET /schemas/ids/1 ") || head.starts_with("GET /schemas/ids/1?"))
                {
                    ("200 OK", r#"{"schema":"\"string\""}"#.to_string())
                } else {
                    ("401 Unauthorized", r#"{"error_code":401,"message":"Unauthorized"}"#.to_string())
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    url
}

#[tokio::test]
async fn https_registry_with_basic_auth_or_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certs(dir.path());

    // Basic auth (API key:secret): base64("key-1:s3cret") = a2V5LTE6czNjcmV0.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let url = serve(cert.clone(), key.clone(), "Basic a2V5LTE6czNjcmV0".into(), seen.clone()).await;
    let endpoint = RegistryEndpoint {
        url: url.clone(),
        basic_auth: Some(("key-1".into(), "s3cret".into())),
        ca_pem: Some(ca.clone()),
        ..Default::default()
    };
    let schema = RegistryClient::new(&endpoint).unwrap().schema_by_id(1).await.expect("schema over https + basic auth");
    assert_eq!(schema.canonical_form(), "\"string\"");
    assert_eq!(seen.lock().unwrap().as_slice(), ["Basic a2V5LTE6czNjcmV0"]);

    // Wrong credentials: refused by status (401), not retried as an outage.
    let wrong = RegistryEndpoint { basic_auth: Some(("key-1".into(), "nope".into())), ..endpoint.clone() };
    let got = RegistryClient::new(&wrong).unwrap().schema_by_id(1).await;
    let err = got
        .map(|s| s.canonical_form())
        .expect_err(&format!("wrong password accepted; seen {:?}", seen.lock().unwrap()));
    assert!(!matches!(err, RegistryError::UnknownSchemaId(_)), "a 401 is not an unknown id: {err}");

    // Without the CA the server's certificate is not trusted: the request fails, nothing is read.
    let untrusted = RegistryEndpoint { ca_pem: None, ..endpoint.clone() };
    let before = seen.lock().unwrap().len();
    assert!(
        RegistryClient::new(&untrusted).unwrap().schema_by_id(1).await.is_err(),
        "an untrusted certificate was accepted"
    );
    assert_eq!(seen.lock().unwrap().len(), before, "a request got through without a trusted certificate");

    // Bearer token.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let url = serve(cert, key, "Bearer tok-123".into(), seen.clone()).await;
    let bearer = RegistryEndpoint { url, bearer_token: Some("tok-123".into()), ca_pem: Some(ca), ..Default::default() };
    RegistryClient::new(&bearer).unwrap().schema_by_id(1).await.expect("schema over https + bearer token");
    assert_eq!(seen.lock().unwrap().as_slice(), ["Bearer tok-123"]);
}

/// A plain-HTTP stand-in that answers every request with `status` and a Confluent error body.
async fn answering(status: u16) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut len = 0;
                while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => len += n,
                    }
                }
                let body = format!(r#"{{"error_code":{status},"message":"stand-in says {status}"}}"#);
                let resp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    url
}

/// Registry errors are classified by status: outages and quotas are retried, credentials (401/403)
/// and other refusals (4xx) are configuration, 404 is an unknown id. A record whose schema cannot
/// be fetched for want of the registry or of credentials is never dead-lettered: its decode waits.
#[tokio::test]
async fn registry_errors_are_classified_by_status() {
    for (status, retriable, configuration, decode_retriable) in [
        (401, false, true, true),
        (403, false, true, true),
        (429, true, false, true),
        (500, true, false, true),
        (503, true, false, true),
        (404, false, false, false),
        (400, false, true, false),
        (409, false, true, false),
    ] {
        let client = RegistryClient::new(answering(status).await.as_str()).unwrap();
        let err = client.schema_by_id(7).await.unwrap_err();
        assert_eq!(err.is_retriable(), retriable, "HTTP {status}: {err:?}");
        assert_eq!(err.is_configuration(), configuration, "HTTP {status}: {err:?}");
        match status {
            401 | 403 => assert!(matches!(err, RegistryError::Unauthorized(s, _) if s == status), "{err:?}"),
            429 => assert!(matches!(err, RegistryError::Throttled(_)), "{err:?}"),
            404 => assert!(matches!(err, RegistryError::UnknownSchemaId(7)), "{err:?}"),
            400 | 409 => assert!(matches!(err, RegistryError::Refused(s, _) if s == status), "{err:?}"),
            _ => {}
        }
        let framed = tidings_core::wire::frame(7, &[2, b'x']);
        let decode = client.decode(&framed, &tidings_core::notification::NOTIFICATION_SCHEMA).await.unwrap_err();
        assert_eq!(decode.is_retriable(), decode_retriable, "HTTP {status}: decode gave {decode:?}");
        if status == 404 {
            assert_eq!(decode.reason_code(), "unknown-schema-id");
        }
    }
}

/// A processor for stages whose start fails before any record.
struct Idle;

impl Processor for Idle {
    type Due = ();
    async fn process(&mut self, _: &rdkafka::message::BorrowedMessage<'_>) -> Result<(), StageError> {
        Ok(())
    }
    fn due(&mut self) -> impl std::future::Future<Output = ()> + Send {
        std::future::pending()
    }
    async fn on_due(&mut self, _: ()) -> Result<(), StageError> {
        Ok(())
    }
    async fn finish(self, ended: Result<(), StageError>) -> Result<(), StageError> {
        ended
    }
}

/// Runs a stage whose start registers a schema with a registry answering `status` to everything:
/// (how it ended, how many times it started) once it ended or started `enough` times.
async fn stage_registering_with(status: u16, enough: usize) -> (Option<Result<(), StageError>>, usize) {
    let client = RegistryClient::new(answering(status).await.as_str()).unwrap();
    let (health, shutdown) = (StageHealth::default(), CancellationToken::new());
    let starts = Arc::new(AtomicUsize::new(0));
    let (counted, stop) = (starts.clone(), shutdown.clone());
    let start = move || {
        let (client, counted, stop) = (client.clone(), counted.clone(), stop.clone());
        async move {
            if counted.fetch_add(1, Ordering::SeqCst) + 1 >= enough {
                stop.cancel();
            }
            client.register("notifications-value", r#""string""#).await?;
            unreachable!("the stand-in registered a schema")
        }
    };
    let run = stage::run::<Idle, Arc<StreamConsumer>, _, _>("test", &health, &shutdown, start);
    let ended = tokio::time::timeout(Duration::from_secs(60), run).await.ok();
    let ended = if shutdown.is_cancelled() { None } else { ended };
    (ended, starts.load(Ordering::SeqCst))
}

/// A stage whose registry refuses its credentials at start ends at once with a configuration
/// error naming the credential settings, instead of restarting with a growing backoff; an outage
/// (503) restarts it.
#[tokio::test]
async fn a_stage_refused_by_the_registry_stops_and_one_facing_an_outage_restarts() {
    for status in [401, 403] {
        let (ended, starts) = stage_registering_with(status, 3).await;
        let err = ended.expect("the stage restarted until stopped").expect_err("the stage ended cleanly");
        assert_eq!((err.domain(), starts), (Domain::Configuration, 1), "HTTP {status}: {err}");
        assert!(err.to_string().contains("TIDINGS_SCHEMA_REGISTRY_BEARER_TOKEN"), "{err}");
        assert!(err.to_string().contains("TIDINGS_REGISTRY_WRITE_TOKEN"), "{err}");
    }
    let (ended, starts) = stage_registering_with(503, 2).await;
    assert!(ended.is_none(), "a 503 ended the stage: {ended:?}");
    assert_eq!(starts, 2, "a 503 was not retried");
}
