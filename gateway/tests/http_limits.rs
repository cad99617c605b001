//! What one client can hold on the gateway's HTTP listeners: a request head trickled in (the first,
//! or a later one on a keep-alive connection) is cut at the header timeout, a client that stops
//! reading at the write timeout, an idle connection at the idle timeout, a slow request at the
//! request timeout; past the connection cap (or the per-address cap, when on) new connections are
//! closed at once; each of these is counted.

use std::time::{Duration, Instant};

use axum::Router;
use tidings_gateway::web::WebConfig;
use tidings_gateway::{Limits, Parts, Readiness};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

async fn gateway(limits: Limits) -> (String, CancellationToken) {
    gateway_with(limits, tidings_gateway::app(Parts::default(), Readiness::default()), None).await
}

/// The public gateway (its TCP front included) serving `app`, with `send_buffer` as its sockets'
/// kernel send buffer.
async fn gateway_with(limits: Limits, app: Router, send_buffer: Option<u32>) -> (String, CancellationToken) {
    // This test process's recorder: the refusals and timeouts are read back from /metrics.
    tidings_gateway::metrics::install();
    let listener = tidings_gateway::bind("127.0.0.1:0".parse().unwrap(), send_buffer).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    tokio::spawn(tidings_gateway::serve_gateway(listener, app, None, limits, stop.clone()));
    (addr, stop)
}

/// The gateway's `/metrics` text.
async fn metrics(addr: &str) -> String {
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    http.get(format!("http://{addr}/metrics")).send().await.unwrap().text().await.unwrap()
}

/// The sum of the samples of `name` in `text` whose labels include every one of `labels`
/// (0 when there are none).
fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A counter's value in the gateway's `/metrics` (0 when absent).
async fn counter(addr: &str, name: &str, labels: &[&str]) -> f64 {
    sample(&metrics(addr).await, name, labels)
}

/// Sends a request for `path` on `sock` and reads its response; the response's status line.
async fn get(sock: &mut TcpStream, path: &str) -> String {
    sock.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().parse::<usize>())
                })
                .unwrap()
                .unwrap();
            if got.len() >= end + 4 + length {
                return text.lines().next().unwrap().to_string();
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed before answering: {text}");
        got.extend_from_slice(&buf[..n]);
    }
}

fn limits(header_timeout: Duration, max_connections: usize) -> Limits {
    Limits { header_timeout, ..Limits::new(max_connections).named("public") }
}

/// Reads until the peer closes the connection or `within` passes; whether it closed.
async fn closed_within(sock: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sock.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// Sends `bytes` one at a time, `every` apart, stopping early if the peer closed; whether it did.
async fn trickle(sock: &mut TcpStream, bytes: &[u8], every: Duration) -> bool {
    for b in bytes {
        if sock.write_all(&[*b]).await.is_err() {
            return true;
        }
        if closed_within(sock, every).await {
            return true;
        }
    }
    false
}

#[tokio::test]
async fn a_trickled_keep_alive_request_head_is_cut_at_the_header_timeout() {
    let (addr, stop) = gateway(limits(Duration::from_millis(800), 100)).await;
    let mut sock = TcpStream::connect(&addr).await.unwrap();
    // A first, complete request, answered: the connection is now a keep-alive one held by hyper.
    sock.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
    // The second head arrives a byte every 200 ms: it would take 8 s; the server must hang up.
    let started = Instant::now();
    let cut = trickle(
        &mut sock,
        b"GET /healthz HTTP/1.1\r\nx-slow: aaaaaaaaaaaaaaaaaaaa\r\n\r\n",
        Duration::from_millis(200),
    )
    .await;
    assert!(cut, "a keep-alive client trickled a whole request head in {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(4), "cut only after {:?}", started.elapsed());

    // The same for a first request, read by the gateway's own front.
    let mut sock = TcpStream::connect(&addr).await.unwrap();
    let started = Instant::now();
    assert!(
        trickle(
            &mut sock,
            b"GET /v1/stream HTTP/1.1\r\nx-slow: aaaaaaaaaaaaaaaaaaaa\r\n\r\n",
            Duration::from_millis(200)
        )
        .await
    );
    assert!(started.elapsed() < Duration::from_secs(4), "cut only after {:?}", started.elapsed());
    // Both counted (only this test lets a header timeout expire on a listener named "public").
    let header = counter(&addr, "tidings_http_timeouts_total", &[r#"kind="header""#, r#"listener="public""#]).await;
    assert!(header >= 2.0, "{header} header timeouts counted");
    stop.cancel();
}

#[tokio::test]
async fn past_the_connection_cap_new_connections_are_closed_and_counted() {
    let (addr, stop) = gateway(limits(Duration::from_secs(30), 3)).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut over = TcpStream::connect(&addr).await.unwrap();
    assert!(closed_within(&mut over, Duration::from_secs(2)).await, "a 4th connection was kept past a cap of 3");

    // One leaves: there is room again, and the refusal shows in /metrics.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = metrics(&addr).await;
    let refused = sample(&text, "tidings_http_connections_refused_total", &[r#"reason="cap""#, r#"listener="public""#]);
    assert!(refused >= 1.0, "no refusal counted in /metrics:\n{text}");
    assert!(sample(&text, "tidings_http_open_connections", &[r#"listener="public""#]) >= 1.0, "{text}");
    stop.cancel();
    drop(held);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_at_the_write_timeout() {
    let limits = Limits { write_timeout: Duration::from_secs(1), ..limits(Duration::from_secs(30), 100) };
    let web = WebConfig { kinds: vec![], dev_sign_in: None, gateways: vec![] };
    let app = tidings_gateway::app(Parts { web: Some(web), ..Default::default() }, Readiness::default());
    // Small kernel buffers on both sides, so the server's writes stall soon.
    let (addr, stop) = gateway_with(limits, app, Some(4096)).await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut sock = socket.connect(addr.parse().unwrap()).await.unwrap();
    // Many pipelined requests for a 30 KB file, none of whose answers is read.
    const REQUESTS: usize = 200;
    let request = b"GET /app.js HTTP/1.1\r\nhost: x\r\n\r\n";
    sock.write_all(&request.repeat(REQUESTS)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // By now the server has given up on the connection: reading finds its end (EOF or reset)
    // after a fraction of the answers. Without the timeout the server would still be waiting,
    // and go on sending every answer as they are read, then keep the connection open.
    let (mut received, mut closed) = (0usize, false);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 64 * 1024];
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), sock.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => received += n,
            Err(_) => {}
        }
    }
    assert!(closed, "a client that read nothing for 3 s still has its connection ({received} bytes read since)");
    assert!(received < REQUESTS * 30_000 / 2, "{received} bytes were sent to a client that did not read");
    let timeouts = counter(&addr, "tidings_http_timeouts_total", &[r#"kind="write""#, r#"listener="public""#]).await;
    assert!(timeouts >= 1.0, "no write timeout counted");
    stop.cancel();
}

#[tokio::test]
async fn every_route_is_under_the_request_timeout() {
    let limits = Limits { request_timeout: Duration::from_secs(1), ..limits(Duration::from_secs(30), 100) };
    // The gateway's own routes (/healthz, /readyz, /metrics, …) answer at once; a route that
    // takes long stands for any of them stalling (a readiness check, a render).
    let app = tidings_gateway::app(Parts::default(), Readiness::default()).route(
        "/slow",
        axum::routing::get(|| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            "late"
        }),
    );
    let (addr, stop) = gateway_with(limits, app, None).await;
    let mut sock = TcpStream::connect(&addr).await.unwrap();
    assert_eq!(get(&mut sock, "/healthz").await, "HTTP/1.1 200 OK");
    let started = Instant::now();
    assert_eq!(get(&mut sock, "/slow").await, "HTTP/1.1 408 Request Timeout");
    assert!(started.elapsed() < Duration::from_secs(3), "408 only after {:?}", started.elapsed());
    let timeouts = counter(&addr, "tidings_http_timeouts_total", &[r#"kind="request""#, r#"listener="public""#]).await;
    assert!(timeouts >= 1.0, "no request timeout counted");
    stop.cancel();
}

#[tokio::test]
async fn idle_connections_are_closed_at_the_idle_timeout_and_busy_ones_kept() {
    let limits = Limits { idle_timeout: Duration::from_secs(1), ..limits(Duration::from_secs(30), 100) };
    let (addr, stop) = gateway(limits.clone()).await;

    // A keep-alive connection used every 400 ms for 3 s stays open.
    let mut sock = TcpStream::connect(&addr).await.unwrap();
    for i in 0..8 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        assert_eq!(get(&mut sock, "/healthz").await, "HTTP/1.1 200 OK");
    }
    // Left idle after its last answer, it is closed 1 s later (the header timeout, 30 s, would be
    // far later).
    let started = Instant::now();
    assert!(closed_within(&mut sock, Duration::from_secs(4)).await, "an idle keep-alive connection was kept");
    assert!(started.elapsed() >= Duration::from_millis(900), "closed after only {:?}", started.elapsed());
    stop.cancel();
}

#[tokio::test]
async fn a_silent_connection_to_a_plain_listener_is_closed_at_the_idle_timeout() {
    // Ingest, the registry and /metrics have no front reading the first head: before its first
    // byte, only the idle timeout bounds a connection there.
    let limits = Limits { idle_timeout: Duration::from_secs(1), ..limits(Duration::from_secs(30), 100) };
    let (addr, stop) = gateway(limits.clone()).await;
    let listener = tidings_gateway::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let plain = listener.local_addr().unwrap();
    let app = tidings_gateway::app(Parts::default(), Readiness::default());
    tokio::spawn(tidings_gateway::serve(listener, app, limits.named("ingest"), stop.clone()));
    let mut silent = TcpStream::connect(plain).await.unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(4)).await, "a silent connection was kept");
    let idle = counter(&addr, "tidings_http_timeouts_total", &[r#"kind="idle""#, r#"listener="ingest""#]).await;
    assert!(idle >= 1.0, "no idle timeout counted");
    stop.cancel();
}

#[tokio::test]
async fn the_per_address_cap_refuses_one_address_past_it_when_on() {
    for per_ip in [2, 0] {
        let (addr, stop) = gateway(limits(Duration::from_secs(30), 100).per_ip(per_ip)).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(TcpStream::connect(&addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut third = TcpStream::connect(&addr).await.unwrap();
        if per_ip == 2 {
            assert!(closed_within(&mut third, Duration::from_secs(2)).await, "a 3rd connection from one address");
            // Another address is still served.
            let other = TcpSocket::new_v4().unwrap();
            other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            let mut other = other.connect(addr.parse().unwrap()).await.unwrap();
            assert_eq!(get(&mut other, "/healthz").await, "HTTP/1.1 200 OK");
            // Once one of the two leaves, the address has room again (for the metrics request).
            drop(held.pop());
            tokio::time::sleep(Duration::from_millis(200)).await;
            let refused = counter(&addr, "tidings_http_connections_refused_total", &[r#"reason="per_ip""#]).await;
            assert!(refused >= 1.0, "no per-address refusal counted");
        } else {
            // Off (0): one address may open as many as the listener's cap.
            assert_eq!(get(&mut third, "/healthz").await, "HTTP/1.1 200 OK");
        }
        stop.cancel();
    }
}
