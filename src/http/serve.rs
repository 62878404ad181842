//! The accept loop. It holds the server together at the edges: a cap on
//! connections sized so the process keeps file descriptors for the database
//! and for new clients, a deadline on every request head (slow and idle
//! clients are let go), accept errors that are survived rather than looped
//! on, and a shutdown that waits for requests in flight only so long.
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::time::Sleep;
use tower::ServiceExt;

/// How the accept loop bounds its clients.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Longest a client may take to send a request's head; a connection
    /// that sends nothing, or idles between requests, closes after it too.
    pub header_timeout: Duration,
    /// Most HTTP connections at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Longest a shutdown waits for requests in flight and websockets.
    pub shutdown_timeout: Duration,
}

/// Descriptors kept back from connections: the database pool's come on top.
const RESERVED_DESCRIPTORS: usize = 32;
/// Connection caps when the open-file limit is unknown or very high.
const MAX_DEFAULT_CONNECTIONS: usize = 50_000;
const MAX_DEFAULT_WEBSOCKETS: usize = 10_000;

/// Connections the kernel may hold, accepted, until the loop takes them:
/// clients beyond the connection cap wait here rather than time out.
const LISTEN_BACKLOG: u32 = 4096;

/// A listener on `address` with a deep backlog (tokio's own is 128).
pub fn bind(address: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The process's soft limit on open files (Linux: /proc/self/limits).
pub fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Default caps on HTTP connections and on websockets, from the open-file
/// limit: a quarter of what is left after the database pool and a reserve
/// may be websockets, the rest plain connections.
pub fn default_caps(open_files: Option<usize>, db_connections: usize) -> (usize, usize) {
    let Some(open_files) = open_files else {
        return (MAX_DEFAULT_CONNECTIONS, MAX_DEFAULT_WEBSOCKETS);
    };
    let budget = open_files
        .saturating_sub(db_connections + RESERVED_DESCRIPTORS)
        .max(8);
    let websockets = (budget / 4).clamp(1, MAX_DEFAULT_WEBSOCKETS);
    let connections = (budget - websockets).clamp(1, MAX_DEFAULT_CONNECTIONS);
    (connections, websockets)
}

/// Counts accept errors so a burst is logged once, not once per failure.
struct AcceptErrors {
    since: Option<Instant>,
    count: u64,
}

impl AcceptErrors {
    async fn note(&mut self, err: std::io::Error) {
        self.count += 1;
        if self
            .since
            .is_none_or(|since| since.elapsed() > Duration::from_secs(5))
        {
            tracing::warn!(error = %err, errors = self.count, "cannot accept connections");
            self.since = Some(Instant::now());
            self.count = 0;
        }
        // Out of descriptors or memory: give connections in flight a moment
        // to finish instead of spinning on the same error.
        let resources = matches!(err.raw_os_error(), Some(23 | 24 | 105 | 12));
        let pause = if resources { 100 } else { 5 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// Serves `router` on `listener` until `signal`, then shuts down within the
/// deadline: stops accepting, tells websockets to close (through
/// `shutdown`), lets requests in flight finish, and waits for every
/// websocket to give back its `websockets` permit (of `max_websockets`).
pub async fn run(
    listener: TcpListener,
    router: Router,
    limits: ServeLimits,
    shutdown: watch::Sender<bool>,
    websockets: (Arc<Semaphore>, usize),
    signal: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let builder = builder.http1_only();
    let mut errors = AcceptErrors {
        since: None,
        count: 0,
    };
    let mut signal = std::pin::pin!(signal);
    loop {
        let slot = tokio::select! {
            slot = connections.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            _ = &mut signal => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    errors.note(err).await;
                    continue;
                }
            },
            _ = &mut signal => break,
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::default());
        let stream = Watched::new(stream, activity.clone(), limits.header_timeout);
        let service = TowerToHyperService::new(counted(router.clone(), activity));
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(slot);
        });
    }

    tracing::info!("shutting down: finishing requests in flight");
    drop(listener);
    let _ = shutdown.send(true);
    let (websocket_slots, max_websockets) = websockets;
    let drained = async {
        graceful.shutdown().await;
        let _ = websocket_slots
            .acquire_many(u32::try_from(max_websockets).unwrap_or(u32::MAX))
            .await;
    };
    if tokio::time::timeout(limits.shutdown_timeout, drained)
        .await
        .is_err()
    {
        tracing::warn!(
            deadline = ?limits.shutdown_timeout,
            connections = limits.max_connections - connections.available_permits(),
            websockets = max_websockets - websocket_slots.available_permits(),
            "the shutdown deadline passed; closing what is left"
        );
    }
    Ok(())
}

/// What a connection is doing, as its requests see it.
#[derive(Default)]
struct Activity {
    /// Requests being answered.
    busy: AtomicUsize,
    /// Switched protocols (a websocket): its own pings judge it from then on.
    upgraded: AtomicBool,
}

/// Counts a request as busy until its response is ready (or it is dropped).
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The router, marking the connection busy while it answers.
fn counted(
    router: Router,
    activity: Arc<Activity>,
) -> impl tower::Service<
    axum::http::Request<Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<axum::response::Response, std::convert::Infallible>> + Send,
> + Clone {
    tower::service_fn(move |request: axum::http::Request<Incoming>| {
        activity.busy.fetch_add(1, Ordering::Relaxed);
        let busy = Busy(activity.clone());
        let answer = router.clone().oneshot(request.map(Body::new));
        async move {
            let response = answer.await;
            if let Ok(response) = &response
                && response.status() == axum::http::StatusCode::SWITCHING_PROTOCOLS
            {
                busy.0.upgraded.store(true, Ordering::Relaxed);
            }
            drop(busy);
            response
        }
    })
}

/// A client connection that is let go once it has been quiet for the
/// header timeout while no request of its is being answered: one that
/// never sends anything, or idles between requests. (hyper's own header
/// timeout only starts at a request's first byte.)
struct Watched<IO> {
    io: IO,
    activity: Arc<Activity>,
    quiet: Pin<Box<Sleep>>,
    limit: Duration,
}

impl<IO> Watched<IO> {
    fn new(io: IO, activity: Arc<Activity>, limit: Duration) -> Self {
        Self {
            io,
            activity,
            quiet: Box::pin(tokio::time::sleep(limit)),
            limit,
        }
    }

    fn heard(&mut self) {
        let deadline = tokio::time::Instant::now() + self.limit;
        self.quiet.as_mut().reset(deadline);
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.heard();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let idle = self.activity.busy.load(Ordering::Relaxed) == 0
                    && !self.activity.upgraded.load(Ordering::Relaxed);
                if idle && self.quiet.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client sent nothing within the header timeout",
                    )));
                }
                Poll::Pending
            }
            ready => ready,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written
            && n > 0
        {
            self.heard();
        }
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = written
            && n > 0
        {
            self.heard();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_leave_room_for_the_pool_and_new_clients() {
        assert_eq!(default_caps(Some(256), 10), (161, 53));
        let (connections, websockets) = default_caps(Some(1 << 20), 10);
        assert_eq!((connections, websockets), (50_000, 10_000));
        assert_eq!(default_caps(None, 10), (50_000, 10_000));
        // A limit too low for the reserve still serves someone.
        let (connections, websockets) = default_caps(Some(20), 10);
        assert!(connections >= 1 && websockets >= 1);
    }
}
