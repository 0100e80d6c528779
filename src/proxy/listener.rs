//! The integration listener: the accept loop and each connection's life. HTTP/1.1 and HTTP/2
//! (by preface) are served on one port; a connection that brings no request within
//! `header_read_timeout` is closed; in-flight connections are watched for the drain. Malformed
//! HTTP is hyper's to refuse (400, 431 or a closed connection) before [`Gate`] sees it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use super::{Affinity, Gate, MAX_BUF};
use crate::shutdown::Shutdown;

/// Accepts connections on one integration listener until `shutdown`, then stops accepting and
/// returns; in-flight connections are tracked by `graceful` for the caller to drain, and
/// closed when `close` fires (the drain's deadline passed). A connection that brings no
/// request within `header_read_timeout` is closed.
pub(crate) async fn serve(
    listener: TcpListener,
    gate: Arc<Gate>,
    header_read_timeout: Duration,
    graceful: Arc<GracefulShutdown>,
    mut shutdown: Shutdown,
    close: Shutdown,
) {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .keep_alive(true)
        .max_buf_size(MAX_BUF);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    loop {
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            _ = shutdown.wait() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(integration = %gate.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let gate = gate.clone();
        // hyper's header_read_timeout covers an HTTP/1 head once the protocol is known, but
        // neither the first bytes (the auto builder waits for them to tell HTTP/1 from the
        // HTTP/2 preface) nor HTTP/2: a client that connects and sends nothing, or stalls in
        // the preface, would hold its connection and task until shutdown. So every connection
        // must bring its first request within header_read_timeout.
        let first_request = Arc::new(AtomicBool::new(false));
        let seen = first_request.clone();
        // The connection's upstream connection, kept between its requests; given to the
        // route's spares when the connection (and with it this service) ends.
        let affinity = Arc::new(Affinity::default());
        let svc = hyper::service::service_fn(move |req| {
            seen.store(true, Ordering::Relaxed);
            let gate = gate.clone();
            let affinity = affinity.clone();
            async move { Ok::<_, Infallible>(gate.handle(req, peer, affinity).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        let mut close = close.clone();
        let mut first_deadline = Some(Box::pin(tokio::time::sleep(header_read_timeout)));
        let no_first_request = std::future::poll_fn(move |cx| {
            // Once a request came, hyper's header_read_timeout guards every later head: the
            // timer goes, rather than being polled on each wake-up of the connection.
            if first_request.load(Ordering::Relaxed) {
                first_deadline = None;
            }
            match first_deadline.as_mut() {
                Some(deadline) => std::future::Future::poll(deadline.as_mut(), cx),
                None => Poll::Pending,
            }
        });
        tokio::spawn(async move {
            tokio::select! {
                // The connection first: it is what wakes this task nearly every time.
                biased;
                ended = conn => if let Err(e) = ended {
                    debug!(peer = %peer, error = %e, "client connection ended with an error");
                },
                // Dropping the connection closes it, a request or body in flight included.
                _ = close.wait() => debug!(peer = %peer, "client connection closed: shutdown_grace expired"),
                () = no_first_request => debug!(peer = %peer, "no request within header_read_timeout; connection closed"),
            }
        });
    }
}
