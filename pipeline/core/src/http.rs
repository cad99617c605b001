//! The HTTP server loop behind every tidings listener: hyper with a timer, so a client that trickles
//! a request head, stops reading its responses, sits idle or drags a request out is cut off; a cap
//! on open connections per listener (and optionally per client address); a graceful shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::{Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Bounds on what one client can hold on one listener.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The listener's name in metrics (`listener` label).
    pub name: &'static str,
    /// Time to send a complete request head, each request of a keep-alive connection included
    /// (for HTTP/1 this also bounds the wait for the next request of a keep-alive connection).
    pub header_timeout: Duration,
    /// Time from a complete head to the response, body read included (a stream's body excepted).
    pub request_timeout: Duration,
    /// Time a response write (streams included) may make no progress: a client that stopped
    /// reading is cut off instead of holding its connection and kernel send queue forever.
    pub write_timeout: Duration,
    /// Time a connection may hold no request and send nothing before it is closed.
    pub idle_timeout: Duration,
    /// Open connections, shared by every listener given the same `Limits`.
    pub connections: Arc<Semaphore>,
    /// Open connections per client address, when capped.
    pub per_ip: Option<Arc<PerIp>>,
}

impl Limits {
    pub fn new(max_connections: usize) -> Self {
        Limits {
            name: "http",
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            connections: Arc::new(Semaphore::new(max_connections)),
            per_ip: None,
        }
    }

    /// The same limits, reported under `name` in metrics.
    pub fn named(self, name: &'static str) -> Self {
        Limits { name, ..self }
    }

    /// The same limits with at most `max` open connections per client address (0: no such cap).
    pub fn per_ip(self, max: usize) -> Self {
        Limits { per_ip: (max > 0).then(|| Arc::new(PerIp::new(max))), ..self }
    }

    /// A place for one more connection from `peer`, or `None` at a cap (the caller closes the
    /// socket). The place is given back when the permit is dropped.
    pub fn admit(&self, peer: IpAddr) -> Option<Permit> {
        let refused = |reason: &'static str| {
            metrics::counter!("tidings_http_connections_refused_total", "listener" => self.name, "reason" => reason)
                .increment(1);
            None
        };
        // The listener's place first: an address has a map entry only while one of its connections
        // holds one, so the map never has more entries than the listener has places.
        let Ok(slot) = self.connections.clone().try_acquire_owned() else { return refused("cap") };
        let ip = match &self.per_ip {
            Some(per_ip) => match per_ip.enter(peer) {
                Some(ip) => Some(ip),
                None => return refused("per_ip"),
            },
            None => None,
        };
        let open = metrics::gauge!("tidings_http_open_connections", "listener" => self.name);
        open.increment(1.0);
        Some(Permit { _ip: ip, _slot: slot, open })
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::new(50_000)
    }
}

/// One admitted connection's places under its listener's caps, given back on drop.
pub struct Permit {
    // Dropped before the listener's place (declaration order): see `Limits::admit`.
    _ip: Option<IpSlot>,
    _slot: OwnedSemaphorePermit,
    open: metrics::Gauge,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.open.decrement(1.0);
    }
}

/// Open connections per client address. Keyed by what clients send us, so bounded: an entry
/// lives only while its address has a connection open, and it is removed when that count is 0.
#[derive(Debug)]
pub struct PerIp {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerIp {
    pub fn new(max: usize) -> Self {
        PerIp { max, open: Mutex::new(HashMap::new()) }
    }

    fn enter(self: &Arc<Self>, peer: IpAddr) -> Option<IpSlot> {
        // An IPv4 client seen on a dual-stack socket counts as the same address.
        let ip = peer.to_canonical();
        let mut open = self.open.lock().expect("lock");
        match open.get_mut(&ip) {
            Some(n) if *n >= self.max => return None,
            Some(n) => *n += 1,
            None => {
                open.insert(ip, 1);
            }
        }
        Some(IpSlot { per_ip: self.clone(), ip })
    }

    /// Addresses with a connection open.
    pub fn addresses(&self) -> usize {
        self.open.lock().expect("lock").len()
    }
}

#[derive(Debug)]
struct IpSlot {
    per_ip: Arc<PerIp>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.per_ip.open.lock().expect("lock");
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Something that hands out accepted connections, with their admission already decided.
pub trait Accept: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&mut self) -> impl Future<Output = (Self::Io, SocketAddr, Permit)> + Send;
}

/// A plain listener: each connection takes a permit from `limits` (at a cap it is closed).
pub struct Capped {
    listener: tokio::net::TcpListener,
    limits: Limits,
}

impl Capped {
    pub fn new(listener: tokio::net::TcpListener, limits: Limits) -> Self {
        Capped { listener, limits }
    }
}

impl Accept for Capped {
    type Io = tokio::net::TcpStream;

    async fn accept(&mut self) -> (Self::Io, SocketAddr, Permit) {
        loop {
            match self.listener.accept().await {
                Ok((sock, addr)) => match self.limits.admit(addr.ip()) {
                    Some(permit) => return (sock, addr, permit),
                    None => drop(sock),
                },
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed; retrying in 50 ms");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Counts a connection or request cut off by one of the timeouts.
pub fn count_timeout(listener: &'static str, kind: &'static str) {
    metrics::counter!("tidings_http_timeouts_total", "listener" => listener, "kind" => kind).increment(1);
}

/// A connection whose writes must make progress: a write, flush or shutdown still pending
/// `timeout` after it first found the socket full fails with `TimedOut` (the client stopped
/// reading). Any progress restarts the clock, so a slow reader that keeps reading is served.
pub struct WriteTimeout<T> {
    inner: T,
    timeout: Duration,
    /// The stall timer, kept between stalls (reset rather than reallocated).
    stall: Option<Pin<Box<Sleep>>>,
    stalled: bool,
    listener: &'static str,
    activity: Option<Arc<Activity>>,
}

impl<T> WriteTimeout<T> {
    pub fn new(inner: T, timeout: Duration, listener: &'static str) -> Self {
        WriteTimeout { inner, timeout, stall: None, stalled: false, listener, activity: None }
    }

    fn tracked(inner: T, timeout: Duration, listener: &'static str, activity: Arc<Activity>) -> Self {
        WriteTimeout { activity: Some(activity), ..Self::new(inner, timeout, listener) }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Bytes written count as activity for the idle timer; a flush does not: hyper flushes
    /// whenever its task wakes, and the idle timer's own wake-up would otherwise renew itself.
    fn wrote(&self, r: &Poll<io::Result<usize>>) {
        if let (Some(a), Poll::Ready(Ok(n))) = (&self.activity, r) {
            if *n > 0 {
                a.touch();
            }
        }
    }

    fn progress<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if r.is_ready() {
            self.stalled = false;
            return r;
        }
        // The clock starts at the first write that found no room, not at each poll.
        let stall = match &mut self.stall {
            Some(stall) if self.stalled => stall,
            Some(stall) => {
                stall.as_mut().reset(Instant::now() + self.timeout);
                stall
            }
            None => self.stall.insert(Box::pin(tokio::time::sleep(self.timeout))),
        };
        self.stalled = true;
        match stall.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.stalled = false;
                count_timeout(self.listener, "write");
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client read nothing in time")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteTimeout<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        let r = self.progress(cx, r);
        self.wrote(&r);
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.progress(cx, r)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.progress(cx, r)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        let r = self.progress(cx, r);
        self.wrote(&r);
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What a connection is doing, for its idle timer: requests in flight (until their response
/// body ends) and when it last wrote or finished a request.
struct Activity {
    base: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Activity { base: Instant::now(), last_ms: AtomicU64::new(0), in_flight: AtomicUsize::new(0) }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::SeqCst);
    }

    fn idle_since(&self) -> Instant {
        self.base + Duration::from_millis(self.last_ms.load(Ordering::SeqCst))
    }

    /// Resolves once the connection has had no request in flight and written nothing for `idle`.
    async fn idle(&self, idle: Duration) {
        loop {
            let deadline = self.idle_since() + idle;
            if Instant::now() < deadline {
                tokio::time::sleep_until(deadline).await;
            } else if self.in_flight.load(Ordering::SeqCst) > 0 {
                // Busy: look again later (a request's end counts as activity).
                tokio::time::sleep(idle).await;
            } else if Instant::now() >= self.idle_since() + idle {
                return;
            }
        }
    }
}

/// A request in flight on a connection, from its head to the end of its response body.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn enter(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request in flight until it ends (or hyper drops it).
struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `app` on the connections `accept` yields until `shutdown`, then lets open requests
/// finish (the caller's grace timeout bounds that). Handlers see `ConnectInfo<SocketAddr>`.
/// Every route is under `limits.request_timeout` (a response body, e.g. a stream's, is not).
pub async fn serve<A: Accept>(
    mut accept: A,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let app = app.layer(axum::middleware::from_fn_with_state(
        RequestTimeout { timeout: limits.request_timeout, listener: limits.name },
        timed,
    ));
    let conns = TaskTracker::new();
    loop {
        let (io, addr, permit) = tokio::select! {
            _ = shutdown.cancelled() => break,
            c = accept.accept() => c,
        };
        let activity = Arc::new(Activity::new());
        let io = WriteTimeout::tracked(io, limits.write_timeout, limits.name, activity.clone());
        let svc = app
            .clone()
            .map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(addr));
                req.map(Body::new)
            })
            .map_future({
                let activity = activity.clone();
                move |response| {
                    let in_flight = InFlight::enter(&activity);
                    async move {
                        let response: axum::response::Response = response.await?;
                        Ok::<_, std::convert::Infallible>(
                            response.map(|inner| Body::new(Tracked { inner, _in_flight: in_flight })),
                        )
                    }
                }
            });
        let (stop, limits) = (shutdown.clone(), limits.clone());
        conns.spawn(async move {
            let mut builder = Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(svc));
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    let header_timeout = r.as_ref().err().and_then(|e| e.downcast_ref::<hyper::Error>()).is_some_and(|e| e.is_timeout());
                    if header_timeout {
                        count_timeout(limits.name, "header");
                    }
                }
                // Nothing in flight: closing loses nothing (an HTTP/1 client retries on a new connection).
                _ = activity.idle(limits.idle_timeout) => count_timeout(limits.name, "idle"),
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(permit);
        });
    }
    conns.close();
    conns.wait().await;
    Ok(())
}

#[derive(Clone, Copy)]
struct RequestTimeout {
    timeout: Duration,
    listener: &'static str,
}

async fn timed(
    axum::extract::State(t): axum::extract::State<RequestTimeout>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match tokio::time::timeout(t.timeout, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => {
            count_timeout(t.listener, "request");
            axum::response::IntoResponse::into_response((
                axum::http::StatusCode::REQUEST_TIMEOUT,
                "request not completed in time",
            ))
        }
    }
}

/// Middleware for routers of short requests (not streams): 408 when a request, body read
/// included, takes longer than the state's duration. [`serve`] already puts every route under
/// its listener's request timeout; this is for a tighter bound on some routes. Use with
/// `axum::middleware::from_fn_with_state(duration, request_timeout)`.
pub async fn request_timeout(
    axum::extract::State(timeout): axum::extract::State<Duration>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    timed(axum::extract::State(RequestTimeout { timeout, listener: "route" }), req, next).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_write_that_makes_no_progress_fails_after_the_timeout() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = WriteTimeout::new(server, Duration::from_secs(5), "test");
        io.write_all(&[1; 64]).await.unwrap();
        let started = Instant::now();
        let err = io.write_all(&[2; 10]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        // What was written before the stall was delivered; the connection is the caller's to drop.
        let mut got = [0; 64];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [1; 64]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_reading_is_served() {
        let (mut client, server) = tokio::io::duplex(16);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0; 16];
            loop {
                // Each read comes 4 s after the last: under the 5 s timeout, though the whole
                // write takes minutes.
                tokio::time::sleep(Duration::from_secs(4)).await;
                match client.read(&mut buf).await.unwrap() {
                    0 => return got,
                    n => got.extend_from_slice(&buf[..n]),
                }
            }
        });
        let mut io = WriteTimeout::new(server, Duration::from_secs(5), "test");
        let started = Instant::now();
        io.write_all(&[7; 1000]).await.unwrap();
        io.shutdown().await.unwrap();
        drop(io);
        assert!(started.elapsed() > Duration::from_secs(200), "{:?}", started.elapsed());
        assert_eq!(reader.await.unwrap(), vec![7; 1000]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flush_that_stalls_fails_too_and_a_later_stall_gets_a_full_timeout() {
        let (mut client, server) = tokio::io::duplex(8);
        let mut io = tokio::io::BufWriter::new(WriteTimeout::new(server, Duration::from_secs(5), "test"));
        io.write_all(&[1; 8]).await.unwrap();
        io.flush().await.unwrap();
        // Stalls for 3 s, then the client reads: no error, and the clock starts over.
        io.write_all(&[2; 8]).await.unwrap();
        let flush = tokio::spawn(async move {
            let r = io.flush().await;
            (io, r)
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut buf = [0; 8];
        client.read_exact(&mut buf).await.unwrap();
        let (mut io, r) = flush.await.unwrap();
        r.unwrap();
        io.write_all(&[3; 8]).await.unwrap();
        let started = Instant::now();
        let err = io.flush().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[test]
    fn per_address_places_are_capped_and_given_back() {
        let limits = Limits::new(10).per_ip(2);
        let per_ip = limits.per_ip.clone().unwrap();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = limits.admit(a).unwrap();
        let a2 = limits.admit(a).unwrap();
        assert!(limits.admit(a).is_none(), "a third connection from one address");
        // The same address seen as IPv4-mapped IPv6 is the same client.
        assert!(limits.admit("::ffff:10.0.0.1".parse().unwrap()).is_none());
        let b1 = limits.admit(b).unwrap();
        assert_eq!(per_ip.addresses(), 2);
        drop(a1);
        let a3 = limits.admit(a).unwrap();
        drop((a2, a3, b1));
        // Entries go when their count reaches 0: the map holds only addresses with open connections.
        assert_eq!(per_ip.addresses(), 0);
        assert_eq!(limits.connections.available_permits(), 10);
    }

    #[test]
    fn the_address_map_never_outgrows_the_connection_cap() {
        let limits = Limits::new(3).per_ip(1);
        let per_ip = limits.per_ip.clone().unwrap();
        let held: Vec<_> = (0..100u8).filter_map(|i| limits.admit(IpAddr::from([10, 0, 0, i]))).collect();
        assert_eq!(held.len(), 3);
        assert_eq!(per_ip.addresses(), 3);
        drop(held);
        assert_eq!(per_ip.addresses(), 0);
    }

    #[test]
    fn without_a_per_address_cap_one_address_may_use_every_place() {
        let limits = Limits::new(3).per_ip(0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<_> = (0..5).filter_map(|_| limits.admit(ip)).collect();
        assert_eq!(held.len(), 3);
    }
}
