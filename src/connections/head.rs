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
use tokio::time::Sleep;

use super::refusal;

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
    deadline: Option<Pin<Box<Sleep>>>,
    /// Bytes of the current head so far.
    bytes: usize,
    /// Lines of the current head so far (the request line included).
    lines: usize,
    /// The current line has no character yet (apart from `\r`): a `\n` now ends the head.
    line_empty: bool,
}

impl HeadGuard {
    pub fn new(inner: Stream, limits: Arc<HeadLimits>, violations: IntCounterVec) -> Self {
        let mut g = HeadGuard {
            inner,
            limits,
            violations,
            phase: Phase::Between,
            deadline: None,
            bytes: 0,
            lines: 0,
            line_empty: false,
        };
        // The clock starts at accept: a connection that never sends a byte is a slow head too.
        g.start_head();
        g
    }

    fn start_head(&mut self) {
        self.phase = Phase::Head;
        self.deadline = Some(Box::pin(tokio::time::sleep(self.limits.header_timeout)));
        self.bytes = 0;
        self.lines = 0;
        self.line_empty = false;
    }

    /// Follows the head through `data`. Returns the limit it breaks, if any.
    fn scan(&mut self, data: &[u8]) -> Option<Violation> {
        for &b in data {
            self.bytes += 1;
            match b {
                b'\n' if self.line_empty => {
                    self.phase = Phase::Body;
                    self.deadline = None;
                    return None;
                }
                b'\n' => {
                    self.lines += 1;
                    self.line_empty = true;
                    // The request line plus the header lines.
                    if self.lines > self.limits.max_headers + 1 {
                        return Some(Violation::TooManyHeaders);
                    }
                }
                b'\r' => {}
                _ => self.line_empty = false,
            }
            if self.bytes > self.limits.max_header_bytes {
                // Still on the first line: it is the request target that is too long.
                return Some(if self.lines == 0 { Violation::UriTooLong } else { Violation::HeaderTooLarge });
            }
        }
        None
    }

    /// Answers the violation as best it can without waiting (a few hundred bytes always fit in
    /// a fresh socket's send buffer) and fails the read, which ends the connection.
    fn refuse(&mut self, cx: &mut Context<'_>, v: Violation) -> Poll<io::Result<()>> {
        self.phase = Phase::Refused;
        self.deadline = None;
        self.violations.with_label_values(&[v.reason()]).inc();
        let answer = refusal(v.status(), v.message(&self.limits));
        let _ = Pin::new(&mut *self.inner).poll_write(cx, &answer);
        let _ = Pin::new(&mut *self.inner).poll_flush(cx);
        Poll::Ready(Err(io::Error::new(v.io_kind(), v.message(&self.limits))))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Violation {
    Timeout,
    UriTooLong,
    HeaderTooLarge,
    TooManyHeaders,
}

impl Violation {
    fn reason(self) -> &'static str {
        match self {
            Violation::Timeout => "header_timeout",
            Violation::UriTooLong => "uri_too_long",
            Violation::HeaderTooLarge => "header_too_large",
            Violation::TooManyHeaders => "too_many_headers",
        }
    }
    fn status(self) -> u16 {
        match self {
            Violation::Timeout => 408,
            Violation::UriTooLong => 414,
            Violation::HeaderTooLarge | Violation::TooManyHeaders => 431,
        }
    }
    fn io_kind(self) -> io::ErrorKind {
        match self {
            Violation::Timeout => io::ErrorKind::TimedOut,
            _ => io::ErrorKind::InvalidData,
        }
    }
    fn message(self, l: &HeadLimits) -> String {
        match self {
            Violation::Timeout => format!("the request head did not arrive within {:?}", l.header_timeout),
            Violation::UriTooLong => format!("the request line is longer than {} bytes", l.max_header_bytes),
            Violation::HeaderTooLarge => format!("the request head is larger than {} bytes", l.max_header_bytes),
            Violation::TooManyHeaders => format!("the request has more than {} header lines", l.max_headers),
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
                    return this.refuse(cx, Violation::Timeout);
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
                if let Some(v) = this.scan(new) {
                    return this.refuse(cx, v);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(max_bytes: usize, max_headers: usize) -> HeadGuard {
        let limits =
            Arc::new(HeadLimits { header_timeout: Duration::from_secs(10), max_header_bytes: max_bytes, max_headers });
        let counter = IntCounterVec::new(prometheus::Opts::new("t", "t"), &["reason"]).unwrap();
        let (a, _b) = tokio::io::duplex(64);
        HeadGuard {
            inner: Box::new(TestIo(a)),
            limits,
            violations: counter,
            phase: Phase::Head,
            deadline: None,
            bytes: 0,
            lines: 0,
            line_empty: false,
        }
    }

    #[test]
    fn a_head_ends_at_the_blank_line_in_any_split() {
        let head = b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: k\r\n\r\n{\"body\":\"\r\n\r\n\"}";
        for split in 0..head.len() {
            let mut g = guard(1 << 10, 10);
            assert_eq!(g.scan(&head[..split]), None);
            if g.phase == Phase::Head {
                assert_eq!(g.scan(&head[split..]), None);
            }
            assert_eq!(g.phase, Phase::Body, "split at {split}");
            assert_eq!(g.lines, 3);
        }
        // Bare LF line ends (which Pingora's parser accepts) end a head too.
        let mut g = guard(1 << 10, 10);
        assert_eq!(g.scan(b"GET / HTTP/1.1\nHost: gw\n\n"), None);
        assert_eq!(g.phase, Phase::Body);
    }

    #[test]
    fn limits_name_what_was_too_big() {
        assert_eq!(guard(64, 10).scan(&[b'a'; 65]), Some(Violation::UriTooLong));
        let mut long_header = b"GET / HTTP/1.1\r\nx: ".to_vec();
        long_header.extend([b'a'; 64]);
        assert_eq!(guard(64, 10).scan(&long_header), Some(Violation::HeaderTooLarge));
        let many = b"GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nc: 3\r\n";
        assert_eq!(guard(1 << 10, 2).scan(many), Some(Violation::TooManyHeaders));
        assert_eq!(guard(1 << 10, 3).scan(many), None);
    }

    #[derive(Debug)]
    struct TestIo(tokio::io::DuplexStream);
    impl AsyncRead for TestIo {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }
    impl AsyncWrite for TestIo {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, data)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }
    #[async_trait]
    impl Shutdown for TestIo {
        async fn shutdown(&mut self) {}
    }
    impl UniqueID for TestIo {
        fn id(&self) -> UniqueIDType {
            0
        }
    }
    impl Ssl for TestIo {}
    impl GetTimingDigest for TestIo {
        fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
            vec![]
        }
    }
    impl GetProxyDigest for TestIo {
        fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
            None
        }
    }
    impl GetSocketDigest for TestIo {
        fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
            None
        }
    }
    impl Peek for TestIo {}
}
