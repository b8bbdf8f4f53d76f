//! Accepting connections, with the limits a server on a provisioning network needs: at most
//! [`Limits::connections`] at once (more are closed at accept), the TLS handshake, the request
//! headers and each request (its body included) within their time, no connection idle or open
//! longer than allowed. Both listeners use it: the enrollment API (TLS 1.3) and the plain-HTTP
//! boot files.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// How much and how long a connection may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections at once; more are closed as they are accepted.
    pub connections: usize,
    /// The TLS handshake, from accept.
    pub handshake: Duration,
    /// The request line and headers, from the first byte.
    pub headers: Duration,
    /// One request, from its headers to the end of its response (a body sent slowly included).
    pub request: Duration,
    /// No byte read or written for this long closes the connection.
    pub idle: Duration,
    /// A connection's whole life (a machine waiting for approval reconnects).
    pub lifetime: Duration,
    /// Refused enrollments a source may have per minute before it is answered 429.
    pub failures_per_minute: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: 4096,
            handshake: Duration::from_secs(10),
            headers: Duration::from_secs(10),
            request: Duration::from_secs(60),
            idle: Duration::from_secs(90),
            lifetime: Duration::from_secs(15 * 60),
            failures_per_minute: 20,
        }
    }
}

/// Serves `router` on `listener` until `stop` changes, each connection within `limits`. With
/// `tls`, the handshake comes first and `peer` makes each connection's request extension from
/// it (the client certificate, the channel binding).
pub async fn serve<P, F>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
    limits: Limits,
    peer: F,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    P: Clone + Send + Sync + 'static,
    F: Fn(SocketAddr, Option<&rustls::ServerConnection>) -> P + Send + Sync + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.connections));
    let peer = Arc::new(peer);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!("{} connections open: closing the one from {remote}", limits.connections);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (tls, router, peer, watcher) = (tls.clone(), router.clone(), peer.clone(), graceful.watcher());
        tokio::spawn(async move {
            let _slot = slot;
            match tls {
                Some(acceptor) => {
                    let stream = match tokio::time::timeout(limits.handshake, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => return tracing::debug!("TLS handshake with {remote}: {e}"),
                        Err(_) => return tracing::debug!("TLS handshake with {remote}: timed out"),
                    };
                    let p = peer(remote, Some(stream.get_ref().1));
                    one(Idle::new(stream, limits.idle), router, p, limits, watcher, remote).await;
                }
                None => {
                    let p = peer(remote, None);
                    one(Idle::new(tcp, limits.idle), router, p, limits, watcher, remote).await;
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(super::DRAIN, graceful.shutdown()).await.is_err() {
        tracing::warn!("some connections did not finish within {:?}", super::DRAIN);
    }
}

/// One connection: HTTP/1.1 with the header timeout, each request within its time, the whole
/// connection within its lifetime.
async fn one<IO, P>(
    io: Idle<IO>,
    router: Router,
    peer: P,
    limits: Limits,
    watcher: hyper_util::server::graceful::Watcher,
    remote: SocketAddr,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    P: Clone + Send + Sync + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(peer.clone());
        let router = router.clone();
        async move {
            match tokio::time::timeout(limits.request, router.oneshot(req)).await {
                Ok(r) => r,
                Err(_) => Ok((StatusCode::REQUEST_TIMEOUT, "the request took too long\n").into_response()),
            }
        }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.headers).keep_alive(true).max_buf_size(64 * 1024);
    let conn = http.serve_connection(TokioIo::new(io), svc);
    match tokio::time::timeout(limits.lifetime, watcher.watch(conn)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!("connection {remote}: {e}"),
        Err(_) => tracing::debug!("connection {remote}: open for {:?}, closed", limits.lifetime),
    }
}

/// A stream that fails with `TimedOut` when nothing was read or written for `limit`.
struct Idle<IO> {
    inner: IO,
    limit: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<IO> Idle<IO> {
    fn new(inner: IO, limit: Duration) -> Self {
        Idle { inner, limit, deadline: Box::pin(tokio::time::sleep(limit)) }
    }

    fn progress(&mut self) {
        self.deadline.as_mut().reset(tokio::time::Instant::now() + self.limit);
    }

    /// Pending I/O: an error once the deadline passed (the waker is registered either way).
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.deadline
            .as_mut()
            .poll(cx)
            .is_ready()
            .then(|| io::Error::new(io::ErrorKind::TimedOut, "the connection was idle too long"))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Idle<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.progress();
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.expired(cx).map_or(Poll::Pending, |e| Poll::Ready(Err(e))),
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Idle<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, data) {
            Poll::Ready(r) => {
                self.progress();
                Poll::Ready(r)
            }
            Poll::Pending => self.expired(cx).map_or(Poll::Pending, |e| Poll::Ready(Err(e))),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                self.progress();
                Poll::Ready(r)
            }
            Poll::Pending => self.expired(cx).map_or(Poll::Pending, |e| Poll::Ready(Err(e))),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
