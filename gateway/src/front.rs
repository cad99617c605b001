//! The gateway's TCP front. Each connection's request head is read into a small buffer: a
//! `GET /v1/stream` that opens a stream is then served straight from the socket; every other
//! request (and every stream request answered with 401/307/503) goes to axum, replayed in full.
//!
//! Written by hand because memory per idle stream is what limits a gateway: hyper keeps a 16 KiB
//! read and an 8 KiB write buffer for every connection for its whole life (measured with massif:
//! 24 of the 39 KiB of heap per stream), while a stream only ever writes. Here an idle stream holds
//! its task, its queue and its subscription, and buffers only while writing.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::request::Parts;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::delivery::stream::{open_subscription, StreamCursor};
use crate::delivery::StreamState;

/// Largest request head read before handing the connection to axum (which answers 431).
const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take to send its request head (slow-loris bound).
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// A write to a stream that does not complete within this drops the connection (a client that
/// stopped reading, at a moment its queue had no reason to overflow, e.g. during shutdown).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections sniffed but not yet taken by axum's accept loop.
const HANDOFF_QUEUE: usize = 1024;

const STREAM_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
x-accel-buffering: no\r\nconnection: close\r\n\r\n";

/// A connection whose first bytes were already read; they are replayed before the socket's.
pub struct Replayed {
    head: Vec<u8>,
    pos: usize,
    inner: TcpStream,
}

impl AsyncRead for Replayed {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.pos < self.head.len() {
            let n = (self.head.len() - self.pos).min(buf.remaining());
            let from = self.pos;
            buf.put_slice(&self.head[from..from + n]);
            self.pos += n;
            if self.pos == self.head.len() {
                self.head = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replayed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What axum accepts from: connections the front did not serve itself.
pub struct FrontListener {
    rx: mpsc::Receiver<(Replayed, SocketAddr)>,
    local: SocketAddr,
}

impl axum::serve::Listener for FrontListener {
    type Io = Replayed;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The front stopped accepting (shutdown): axum's graceful shutdown ends the loop.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Starts accepting on `listener`: streams are served here (tracked by `streams`), the rest is
/// handed to the returned listener for axum. Stops accepting when `shutdown` is cancelled.
pub fn front(
    listener: TcpListener,
    stream: Option<StreamState>,
    shutdown: CancellationToken,
    streams: TaskTracker,
) -> io::Result<FrontListener> {
    let local = listener.local_addr()?;
    let (tx, rx) = mpsc::channel(HANDOFF_QUEUE);
    let tracker = streams.clone();
    streams.spawn(async move {
        loop {
            let (sock, addr) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed; retrying in 50 ms");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let (tx, stream, stop) = (tx.clone(), stream.clone(), shutdown.clone());
            tracker.spawn(async move { connection(sock, addr, stream, tx, stop).await });
        }
    });
    Ok(FrontListener { rx, local })
}

async fn connection(
    mut sock: TcpStream,
    addr: SocketAddr,
    stream: Option<StreamState>,
    handoff: mpsc::Sender<(Replayed, SocketAddr)>,
    shutdown: CancellationToken,
) {
    let _ = sock.set_nodelay(true);
    // A client that has not sent its request by shutdown gets nothing: stopping does not wait for it.
    let head = tokio::select! {
        r = tokio::time::timeout(HEAD_TIMEOUT, Box::pin(read_head(&mut sock))) => match r {
            Ok(Ok(h)) => h,
            _ => return,
        },
        _ = shutdown.cancelled() => return,
    };
    if let Some(state) = &stream {
        let opened = match stream_request(&head) {
            // Boxed: the task keeps its largest state's size for its whole life, and this one
            // (token checks, a store read for the resume) is only needed for a moment.
            Some(mut parts) => Box::pin(open_subscription(state, &mut parts)).await.ok(),
            None => None,
        };
        if let Some(sub) = opened {
            drop(head);
            serve_stream(sock, StreamCursor::new(sub, state.hub.clone())).await;
            return;
        }
    }
    let _ = Box::pin(handoff.send((Replayed { head, pos: 0, inner: sock }, addr))).await;
}

/// Reads until the end of the request head, EOF, or `MAX_HEAD` bytes.
async fn read_head(sock: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if buf.len() >= MAX_HEAD || buf.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(buf);
        }
        buf.reserve(1024);
        if sock.read_buf(&mut buf).await? == 0 {
            return Ok(buf);
        }
    }
}

/// The request's parts when `head` is a complete `GET /v1/stream` request head (untrusted bytes
/// straight from the socket; fuzzed by `fuzz/` target `sse_request`).
pub fn stream_request(head: &[u8]) -> Option<Parts> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    let path = req.path?;
    if req.method? != "GET" || path.split('?').next()? != "/v1/stream" {
        return None;
    }
    let mut builder = axum::http::Request::builder().method("GET").uri(path);
    for h in req.headers.iter() {
        builder = builder.header(h.name, h.value);
    }
    builder.body(()).ok().map(|r| r.into_parts().0)
}

/// Writes the stream until it ends, the client goes away, or the hub drops it as slow.
async fn serve_stream(mut sock: TcpStream, mut cursor: StreamCursor) {
    if sock.write_all(STREAM_HEAD).await.is_err() {
        return;
    }
    let (mut rd, mut wr) = sock.split();
    let mut probe = [0u8; 64];
    let mut out = Vec::new();
    loop {
        out.clear();
        let more = tokio::select! {
            more = cursor.next_chunk(&mut out) => more,
            // Nothing more is expected from the client: EOF or an error means it left.
            r = rd.read(&mut probe) => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            },
        };
        if !out.is_empty() {
            let written = tokio::select! {
                r = tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&out)) => matches!(r, Ok(Ok(()))),
                // A stalled client is cut off when its queue overflows, even mid-write.
                _ = cursor.aborted() => false,
            };
            if !written {
                return;
            }
        }
        if !more {
            let _ = wr.shutdown().await;
            return;
        }
        // Idle streams hold no write buffer.
        if out.capacity() > 4096 {
            out = Vec::new();
        }
    }
}
