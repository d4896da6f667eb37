//! A transport wrapper that bounds how a client sends each request head: the whole head must
//! arrive within `header_timeout` of its first byte, and stay under `max_header_bytes` and
//! `max_headers` lines.
//!
//! Pingora bounds each read of a head (60 s) and the head's size (1 MB), but not the whole:
//! a client sending one byte every 59 s holds a worker's connection for weeks. Pingora parses the
//! head itself, so the bound lives below it, on the bytes: this wrapper watches reads until the
//! blank line that ends a head, and a response head written by the gateway re-arms it for the
//! next request on the connection.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, TimingDigest, UniqueID,
    UniqueIDType, ALPN,
};
use prometheus::IntCounterVec;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::refusal;
use super::scanner::{HeadScanner, Scan, Violation};

#[derive(Debug, Clone)]
pub struct HeadLimits {
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
}

/// Where the connection is in its request/response cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading a request head; the deadline runs.
    Head,
    /// The head is in; the body (if any) and the answer follow, bounded elsewhere.
    Body,
    /// An answer started; the next byte read begins the next request's head.
    Between,
    /// A limit was broken and answered; the connection is done.
    Refused,
}

pub struct HeadGuard {
    inner: Stream,
    limits: Arc<HeadLimits>,
    violations: IntCounterVec,
    phase: Phase,
    /// Pingora's timer wheel (10 ms resolution), not tokio's: arming tokio's timer wakes its
    /// driver with a syscall on every request head.
    deadline: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
    scanner: HeadScanner,
}

impl HeadGuard {
    pub fn new(inner: Stream, limits: Arc<HeadLimits>, violations: IntCounterVec) -> Self {
        let scanner = HeadScanner::new(limits.max_header_bytes, limits.max_headers);
        let mut g = HeadGuard { inner, limits, violations, phase: Phase::Between, deadline: None, scanner };
        // The clock starts at accept: a connection that never sends a byte is a slow head too.
        g.start_head();
        g
    }

    fn start_head(&mut self) {
        self.phase = Phase::Head;
        self.deadline = Some(Box::pin(pingora_timeout::fast_timeout::fast_sleep(self.limits.header_timeout)));
        self.scanner.reset();
    }

    /// Answers the refusal as best it can without waiting (a few hundred bytes always fit in a
    /// fresh socket's send buffer) and fails the read, which ends the connection.
    fn refuse(&mut self, cx: &mut Context<'_>, r: Refusal) -> Poll<io::Result<()>> {
        self.phase = Phase::Refused;
        self.deadline = None;
        self.violations.with_label_values(&[r.reason()]).inc();
        let message = r.message(&self.limits);
        let answer = refusal(r.status(), message.clone());
        let _ = Pin::new(&mut *self.inner).poll_write(cx, &answer);
        let _ = Pin::new(&mut *self.inner).poll_flush(cx);
        let kind = if r == Refusal::Timeout { io::ErrorKind::TimedOut } else { io::ErrorKind::InvalidData };
        Poll::Ready(Err(io::Error::new(kind, message)))
    }
}

/// Why a head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Timeout,
    Head(Violation),
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Refusal::Timeout => "header_timeout",
            Refusal::Head(Violation::UriTooLong) => "uri_too_long",
            Refusal::Head(Violation::HeaderTooLarge) => "header_too_large",
            Refusal::Head(Violation::TooManyHeaders) => "too_many_headers",
            Refusal::Head(Violation::Malformed(_)) => "malformed_head",
            Refusal::Head(Violation::Connect) => "connect",
        }
    }
    fn status(self) -> u16 {
        match self {
            Refusal::Timeout => 408,
            Refusal::Head(Violation::UriTooLong) => 414,
            Refusal::Head(Violation::HeaderTooLarge | Violation::TooManyHeaders) => 431,
            Refusal::Head(Violation::Malformed(_)) => 400,
            Refusal::Head(Violation::Connect) => 405,
        }
    }
    fn message(self, l: &HeadLimits) -> String {
        match self {
            Refusal::Timeout => format!("the request head did not arrive within {:?}", l.header_timeout),
            Refusal::Head(Violation::UriTooLong) => {
                format!("the request line is longer than {} bytes", l.max_header_bytes)
            }
            Refusal::Head(Violation::HeaderTooLarge) => {
                format!("the request head is larger than {} bytes", l.max_header_bytes)
            }
            Refusal::Head(Violation::TooManyHeaders) => {
                format!("the request has more than {} header lines", l.max_headers)
            }
            Refusal::Head(Violation::Malformed(what)) => format!("malformed request: {what}"),
            Refusal::Head(Violation::Connect) => {
                "CONNECT is not allowed here: this is an API gateway, not a tunnel".into()
            }
        }
    }
}

impl AsyncRead for HeadGuard {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.phase == Phase::Refused {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionAborted, "request refused")));
        }
        if this.phase == Phase::Head {
            if let Some(d) = this.deadline.as_mut() {
                if d.as_mut().poll(cx).is_ready() {
                    return this.refuse(cx, Refusal::Timeout);
                }
            }
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut *this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let new = &buf.filled()[before..];
            if new.is_empty() {
                return polled;
            }
            if this.phase == Phase::Between {
                this.start_head();
            }
            if this.phase == Phase::Head {
                match this.scanner.feed(new) {
                    Scan::Incomplete => {}
                    Scan::Complete(_) => {
                        this.phase = Phase::Body;
                        this.deadline = None;
                    }
                    Scan::Refused(v) => return this.refuse(cx, Refusal::Head(v)),
                }
            }
        }
        polled
    }
}

impl AsyncWrite for HeadGuard {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        // A final (non-1xx) response head means the request is over: the next read starts a new
        // head. Interim 100 Continue leaves the body to come.
        if data.starts_with(b"HTTP/1.") && data.get(9).is_some_and(|&c| c != b'1') {
            self.phase = Phase::Between;
            self.deadline = None;
        }
        Pin::new(&mut *self.inner).poll_write(cx, data)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            if first.starts_with(b"HTTP/1.") && first.get(9).is_some_and(|&c| c != b'1') {
                self.phase = Phase::Between;
                self.deadline = None;
            }
        }
        Pin::new(&mut *self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

// The rest of Pingora's transport interface passes straight through.

#[async_trait]
impl Shutdown for HeadGuard {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for HeadGuard {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeadGuard {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeadGuard {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeadGuard {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: pingora::protocols::raw_connect::ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for HeadGuard {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: pingora::protocols::SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for HeadGuard {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

impl fmt::Debug for HeadGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeadGuard").field("inner", &self.inner).field("phase", &self.phase).finish()
    }
}
