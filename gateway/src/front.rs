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
use axum::http::HeaderValue;
use tidings_core::http::{Limits, Permit};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::delivery::stream::{open_subscription, StreamCursor};
use crate::delivery::StreamState;

/// Largest request head read before handing the connection to axum (which answers 431).
const MAX_HEAD: usize = 16 * 1024;
/// Connections sniffed but not yet taken by axum's accept loop.
const HANDOFF_QUEUE: usize = 1024;

/// The response head of a stream, but its blank line: CORS headers may follow (see `serve_stream`).
const STREAM_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
x-accel-buffering: no\r\nconnection: close\r\nvary: origin\r\n";

/// A connection whose first bytes were already read; they are replayed before the socket's.
pub struct Replayed {
    head: Vec<u8>,
    pos: usize,
    inner: TcpStream,
}

/// A connection on its way to axum, with its place under the connection cap.
type Handoff = (Replayed, SocketAddr, Permit);

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
    rx: mpsc::Receiver<Handoff>,
}

impl tidings_core::http::Accept for FrontListener {
    type Io = Replayed;

    async fn accept(&mut self) -> (Self::Io, SocketAddr, Permit) {
        match self.rx.recv().await {
            Some(handoff) => handoff,
            // The front stopped accepting (shutdown): the server loop's shutdown ends it.
            None => std::future::pending().await,
        }
    }
}

/// Starts accepting on `listener`: streams are served here (tracked by `streams`), the rest is
/// handed to the returned listener for axum. Stops accepting when `shutdown` is cancelled.
pub fn front(
    listener: TcpListener,
    stream: Option<StreamState>,
    limits: Limits,
    shutdown: CancellationToken,
    streams: TaskTracker,
) -> io::Result<FrontListener> {
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
            // At a cap (the listener's, or its address's) the connection is closed at once (and counted).
            let Some(permit) = limits.admit(addr.ip()) else { continue };
            let (tx, stream, stop, limits) = (tx.clone(), stream.clone(), shutdown.clone(), limits.clone());
            tracker.spawn(async move { connection(sock, addr, permit, stream, tx, &limits, stop).await });
        }
    });
    Ok(FrontListener { rx })
}

async fn connection(
    mut sock: TcpStream,
    addr: SocketAddr,
    permit: Permit,
    stream: Option<StreamState>,
    handoff: mpsc::Sender<Handoff>,
    limits: &Limits,
    shutdown: CancellationToken,
) {
    let _ = sock.set_nodelay(true);
    // A client that has not sent its request by shutdown gets nothing: stopping does not wait for it.
    let head = tokio::select! {
        r = tokio::time::timeout(limits.header_timeout, Box::pin(read_head(&mut sock))) => match r {
            Ok(Ok(h)) => h,
            Ok(Err(_)) => return,
            Err(_) => return tidings_core::http::count_timeout(limits.name, "header"),
        },
        _ = shutdown.cancelled() => return,
    };
    if let Some(state) = &stream {
        let opened = match stream_request(&head) {
            // Boxed: the task keeps its largest state's size for its whole life, and this one
            // (token checks, a store read for the resume) is only needed for a moment.
            Some(mut parts) => {
                let origin = crate::delivery::browser::allowed_origin(state, &parts.headers);
                Box::pin(open_subscription(state, &mut parts)).await.ok().map(|sub| (sub, origin))
            }
            None => None,
        };
        if let Some((sub, origin)) = opened {
            drop(head);
            // The permit is held until the stream ends.
            return serve_stream(sock, StreamCursor::new(sub, state.hub.clone()), origin, limits).await;
        }
    }
    // If axum's loop has stopped (shutdown), the connection and its permit are dropped here.
    let _ = Box::pin(handoff.send((Replayed { head, pos: 0, inner: sock }, addr, permit))).await;
}

/// Reads until the end of the request head, EOF, or `MAX_HEAD` bytes. Each read only scans what
/// it added (plus the 2 bytes before), so a head trickled in byte by byte costs linear time.
async fn read_head(sock: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(1024);
    let mut scanned = 0;
    loop {
        if head_end(&buf, scanned).is_some() || buf.len() >= MAX_HEAD {
            return Ok(buf);
        }
        scanned = buf.len().saturating_sub(2);
        buf.reserve(1024);
        if sock.read_buf(&mut buf).await? == 0 {
            return Ok(buf);
        }
    }
}

/// Where the head in `buf` ends (after its blank line), looking from `from` on. Like hyper
/// (httparse), a bare LF ends a line as well as CRLF: `\n\n` and `\n\r\n` both end the head.
pub fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(p) = buf.get(i..)?.iter().position(|&b| b == b'\n') {
        let nl = i + p;
        match buf.get(nl + 1..) {
            Some([b'\n', ..]) => return Some(nl + 2),
            Some([b'\r', b'\n', ..]) => return Some(nl + 3),
            _ => i = nl + 1,
        }
    }
    None
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

/// Writes the stream until it ends, the client goes away, the hub drops it as slow, or a write
/// makes no progress for `limits.write_timeout` (a client that stopped reading at a moment its
/// queue had no reason to overflow); with CORS headers for `origin` when it is an allowed one
/// (see `crate::delivery::browser`).
async fn serve_stream(mut sock: TcpStream, mut cursor: StreamCursor, origin: Option<HeaderValue>, limits: &Limits) {
    let mut head = STREAM_HEAD.to_vec();
    for (name, value) in origin.into_iter().flat_map(crate::delivery::browser::cors_headers) {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    match tokio::time::timeout(limits.write_timeout, sock.write_all(&head)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return,
        Err(_) => return tidings_core::http::count_timeout(limits.name, "write"),
    }
    drop(head);
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
        // Most frames fit the socket's free buffer: written at once, without a timer or a wait.
        let sent = match wr.try_write(&out) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(_) => return,
        };
        if sent < out.len() {
            // A frame is small: its whole write is held to the timeout, not each step of it.
            let written = tokio::select! {
                r = tokio::time::timeout(limits.write_timeout, wr.write_all(&out[sent..])) => match r {
                    Ok(r) => r.is_ok(),
                    Err(_) => {
                        tidings_core::http::count_timeout(limits.name, "write");
                        false
                    }
                },
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn heads_end_at_a_blank_line_with_crlf_or_bare_lf() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nhost: x\r\n\r\nbody", 0), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.1\nhost: x\n\nbody", 0), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nhost: x\n\r\n", 0), Some(26));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nhost: x\r\n", 0), None);
        assert_eq!(
            stream_request(b"GET /v1/stream HTTP/1.1\nhost: x\n\n").map(|p| p.uri.path().to_string()).as_deref(),
            Some("/v1/stream")
        );
    }

    proptest! {
        /// Scanning each read's new bytes (from 2 before them) finds the same end as scanning the
        /// whole head at once, however the head is split into reads.
        #[test]
        fn incremental_scan_finds_the_same_end(
            lines in proptest::collection::vec("[a-z-]{1,10}: [ -~]{0,20}", 0..8),
            lf_only in any::<bool>(),
            cuts in proptest::collection::vec(1usize..7, 1..40),
        ) {
            let eol = if lf_only { "\n" } else { "\r\n" };
            let mut head = format!("GET /v1/stream HTTP/1.1{eol}");
            for l in &lines {
                head.push_str(l);
                head.push_str(eol);
            }
            head.push_str(eol);
            let bytes = head.as_bytes();
            let whole = head_end(bytes, 0);
            prop_assert_eq!(whole, Some(bytes.len()));
            let (mut buf, mut scanned, mut at, mut found) = (Vec::new(), 0, 0, None);
            for c in cuts.iter().cycle() {
                if at >= bytes.len() { break; }
                let next = (at + c).min(bytes.len());
                buf.extend_from_slice(&bytes[at..next]);
                at = next;
                if let Some(e) = head_end(&buf, scanned) { found = Some(e); break; }
                scanned = buf.len().saturating_sub(2);
            }
            prop_assert_eq!(found, whole);
        }
    }
}
