//! Each listener of `tidings up` has a connection cap of its own: with the public gateway's cap
//! taken by clients that send nothing, HTTP ingest and the embedded registry still accept and
//! answer (on the embedded defaults: mock Kafka, SQLite, embedded registry).

// Only the embedded start of the shared helpers is used here.
#[allow(unused_imports)]
mod common;

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn up(data: &Path, args: &[&str]) -> (Guard, serde_json::Value) {
    let log = std::fs::File::create(data.join("up.log")).unwrap();
    let child = common::embedded_up(data, log).args(args).spawn().unwrap();
    let guard = Guard(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    let path = data.join("endpoints.json");
    while !path.exists() {
        assert!(Instant::now() < deadline, "tidings up did not start within 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    (guard, serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap())
}

/// `host:port` of an `http://host:port` URL.
fn authority(url: &serde_json::Value) -> String {
    url.as_str().unwrap().trim_start_matches("http://").trim_end_matches('/').to_string()
}

/// Whether the server closes `sock` within `within` (reading nothing else).
fn closed_within(sock: &mut TcpStream, within: Duration) -> bool {
    sock.set_read_timeout(Some(within)).unwrap();
    match sock.read(&mut [0u8; 64]) {
        Ok(n) => n == 0,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

#[tokio::test]
async fn ingest_and_the_registry_still_answer_when_the_public_cap_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let (_up, endpoints) = up(dir.path(), &["--max-connections", "6"]);
    let public = authority(&endpoints["http"]);
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).timeout(Duration::from_secs(5)).build().unwrap();
    // Wait until the process is ready, then fill the public listener with silent clients.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http.get(format!("http://{public}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
        assert!(Instant::now() < deadline, "not ready within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let held: Vec<TcpStream> = (0..6).map(|_| TcpStream::connect(&public).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut over = TcpStream::connect(&public).unwrap();
    assert!(closed_within(&mut over, Duration::from_secs(2)), "the public listener took a 7th connection");

    // Neither other listener shares that cap.
    let registry = authority(&endpoints["schema_registry_url"]);
    let r = http.get(format!("http://{registry}/subjects")).send().await.expect("the registry refused a connection");
    assert_eq!(r.status(), 200);
    let ingest = authority(&endpoints["ingest"]);
    let r = http.get(format!("http://{ingest}/healthz")).send().await.expect("ingest refused a connection");
    assert_eq!(r.status(), 200);
    drop(held);
}
