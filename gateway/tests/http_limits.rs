//! What one client can hold on the gateway's HTTP listener: a request head trickled in (the first,
//! or a later one on a keep-alive connection) is cut at the header timeout, and past the
//! connection cap new connections are closed at once and counted.

use std::time::{Duration, Instant};

use tidings_gateway::{Limits, Parts, Readiness};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

async fn gateway(limits: Limits) -> (String, CancellationToken) {
    let listener = tidings_gateway::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let app = tidings_gateway::app(Parts::default(), Readiness::default());
    let stop = CancellationToken::new();
    tokio::spawn(tidings_gateway::serve_gateway(listener, app, None, limits, stop.clone()));
    (addr, stop)
}

fn limits(header_timeout: Duration, max_connections: usize) -> Limits {
    Limits { header_timeout, ..Limits::new(max_connections) }
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
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let text = http.get(format!("http://{addr}/metrics")).send().await.unwrap().text().await.unwrap();
    let refused = text
        .lines()
        .find_map(|l| l.strip_prefix("tidings_http_connections_refused_total "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(refused.is_some_and(|n| n >= 1.0), "no refusal counted in /metrics:\n{text}");
    assert!(text.contains("tidings_http_open_connections"), "{text}");
    stop.cancel();
    drop(held);
}
