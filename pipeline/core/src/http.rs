//! The HTTP server loop behind every tidings listener: hyper with a timer, so a client that
//! trickles a request head (the first or a later keep-alive one) is cut off, a cap on open
//! connections, and a graceful shutdown that lets in-flight requests finish.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Bounds on what one client can hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time to send a complete request head, each request of a keep-alive connection included.
    pub header_timeout: Duration,
    /// Time from a complete head to the response, body read included (not for streams).
    pub request_timeout: Duration,
    /// Open connections, shared by every listener given the same `Limits`.
    pub connections: Arc<Semaphore>,
}

impl Limits {
    pub fn new(max_connections: usize) -> Self {
        Limits {
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            connections: Arc::new(Semaphore::new(max_connections)),
        }
    }

    /// A permit for one more connection, or `None` at the cap (the caller closes the socket).
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        match self.connections.clone().try_acquire_owned() {
            Ok(p) => {
                metrics::gauge!("tidings_http_open_connections").increment(1.0);
                Some(p)
            }
            Err(_) => {
                metrics::counter!("tidings_http_connections_refused_total").increment(1);
                None
            }
        }
    }

    /// Gives a permit back (when its connection ends).
    pub fn release(&self, permit: OwnedSemaphorePermit) {
        drop(permit);
        metrics::gauge!("tidings_http_open_connections").decrement(1.0);
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::new(50_000)
    }
}

/// Something that hands out accepted connections, with their admission already decided.
pub trait Accept: Send + 'static {
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn accept(
        &mut self,
    ) -> impl std::future::Future<Output = (Self::Io, SocketAddr, Option<OwnedSemaphorePermit>)> + Send;
}

/// A plain listener: each connection takes a permit from `limits` (at the cap it is closed).
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

    async fn accept(&mut self) -> (Self::Io, SocketAddr, Option<OwnedSemaphorePermit>) {
        loop {
            match self.listener.accept().await {
                Ok((sock, addr)) => match self.limits.admit() {
                    Some(permit) => return (sock, addr, Some(permit)),
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

/// Serves `app` on the connections `accept` yields until `shutdown`, then lets open requests
/// finish (the caller's grace timeout bounds that). Handlers see `ConnectInfo<SocketAddr>`.
pub async fn serve<A: Accept>(
    mut accept: A,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let conns = TaskTracker::new();
    loop {
        let (io, addr, permit) = tokio::select! {
            _ = shutdown.cancelled() => break,
            c = accept.accept() => c,
        };
        let svc = app.clone().map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(addr));
            req.map(axum::body::Body::new)
        });
        let (stop, limits) = (shutdown.clone(), limits.clone());
        conns.spawn(async move {
            let mut builder = Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(svc));
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            if let Some(p) = permit {
                limits.release(p);
            }
        });
    }
    conns.close();
    conns.wait().await;
    Ok(())
}

/// Middleware for routers of short requests (not streams): 408 when a request, body read
/// included, takes longer than the state's duration. Use with
/// `axum::middleware::from_fn_with_state(limits.request_timeout, request_timeout)`.
pub async fn request_timeout(
    axum::extract::State(timeout): axum::extract::State<Duration>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => axum::response::IntoResponse::into_response((
            axum::http::StatusCode::REQUEST_TIMEOUT,
            "request not completed in time",
        )),
    }
}
