//! The accept loop: HTTP/1.1 connections with a connection limit, a header timeout and an
//! idle keep-alive timeout, so slow or idle clients cannot hold the server's sockets.
//!
//! - **Connection limit.** At most `max_connections` are served at once; one more is
//!   accepted and closed at once (so it does not sit in the kernel's backlog) and counted.
//! - **Header timeout.** From the first byte of a request until its headers are complete:
//!   a client sending a byte a minute is closed after `header_timeout`.
//! - **Idle timeout.** A connection with no request in flight and no byte read or written
//!   for `idle_timeout` is closed.
//!
//! A request's body and handler are bounded by the router's request timeout instead.
//! Each connection is watched by a timer computed from its last activity (and woken when a
//! request's first byte arrives), not by polling.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tower::ServiceExt;

use crate::Metrics;

/// The limits of the accept loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
}

impl ConnectionLimits {
    pub fn from_config(c: &spendguard_core::config::HttpConfig) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: usize::try_from(c.max_connections).unwrap_or(usize::MAX),
            header_timeout: Duration::from_secs(c.header_timeout_seconds),
            idle_timeout: Duration::from_secs(c.idle_timeout_seconds),
        }
    }
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits::from_config(&spendguard_core::Config::default().http)
    }
}

/// No time recorded.
const NONE: u64 = u64::MAX;

/// What a connection's watchdog needs: times are milliseconds since `base`.
#[derive(Debug)]
struct Activity {
    base: Instant,
    /// The last byte read or written.
    last: AtomicU64,
    /// The first byte read while no request was in flight (a request's head arriving).
    head_since: AtomicU64,
    in_flight: AtomicUsize,
    /// Wakes the watchdog when a request's head starts (its deadline moves closer).
    head_started: Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            base: Instant::now(),
            last: AtomicU64::new(0),
            head_since: AtomicU64::new(NONE),
            in_flight: AtomicUsize::new(0),
            head_started: Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    fn read(&self, n: usize) {
        if n == 0 {
            return;
        }
        let now = self.now();
        self.last.store(now, Ordering::Relaxed);
        if self.in_flight.load(Ordering::Acquire) == 0
            && self
                .head_since
                .compare_exchange(NONE, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.head_started.notify_one();
        }
    }

    fn wrote(&self, n: usize) {
        if n > 0 {
            self.last.store(self.now(), Ordering::Relaxed);
        }
    }

    fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(NONE, Ordering::Release);
    }

    fn request_finished(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.last.store(self.now(), Ordering::Relaxed);
    }

    /// Resolves when the connection has been idle, or in the middle of a request's head,
    /// for too long.
    async fn expired(&self, header: Duration, idle: Duration) {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(NONE - 1);
        let (header, idle) = (ms(header), ms(idle));
        loop {
            let now = self.now();
            let deadline = if self.in_flight.load(Ordering::Acquire) > 0 {
                // The request timeout bounds the request; look again later.
                now.saturating_add(header.min(idle))
            } else {
                match self.head_since.load(Ordering::Acquire) {
                    NONE => self.last.load(Ordering::Relaxed).saturating_add(idle),
                    since => since.saturating_add(header),
                }
            };
            if deadline <= now {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(deadline - now)) => {}
                _ = self.head_started.notified() => {}
            }
        }
    }
}

/// A stream that notes its reads and writes in an [`Activity`].
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            self.activity.read(buf.filled().len() - before);
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.activity.wrote(*n);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            self.activity.wrote(*n);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves `app` on `listener` until `shutdown` resolves; then lets in-flight requests
/// finish, closes idle connections and returns when every connection is closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, go on.
                    tracing::warn!(error = %e, "could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.connection_refused();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (app, metrics, stop) = (app.clone(), metrics.clone(), stop_rx.clone());
        connections.spawn(async move {
            metrics.connection(true);
            connection(stream, peer, app, limits, stop).await;
            metrics.connection(false);
            drop(slot);
        });
    }
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
    });
    let seen = activity.clone();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        seen.request_started();
        let (app, seen) = (app.clone(), seen.clone());
        async move {
            let response = app.oneshot(req).await;
            seen.request_finished();
            response
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let watchdog = activity.expired(limits.header_timeout, limits.idle_timeout);
    tokio::pin!(watchdog);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = &mut watchdog => return,
        _ = stop.wait_for(|s| *s) => {}
    }
    // Shutting down: finish the request in flight, if any, then close.
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = &mut watchdog => {}
    }
}
