//! The integration listener: the accept loop and each client connection's life. HTTP/1.1 and
//! HTTP/2 (by preface) are served on one port; a connection that brings no request head within
//! `header_read_timeout` (at first, or after its last response) is closed; every open
//! connection is known to [`Connections`], which drains and then closes them at shutdown.
//! Malformed HTTP is hyper's to refuse (400, 431 or a closed connection) before [`Gate`] sees
//! it.
//!
//! Nothing here runs a timer or takes a lock per request. The head deadline is a task per
//! connection that sleeps until the earliest moment the connection could be overdue and then
//! looks at what its requests recorded (a count and the time the last one ended); the drain
//! reaches a connection through an atomic flag and its task's waker. hyper's own
//! `header_read_timeout` armed and dropped a boxed timer for every request head, and a watch
//! per connection for the drain took a waiter-list lock on every wake-up.

use std::future::{poll_fn, Future as _};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use futures_util::task::AtomicWaker;
use http::Version;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{Affinity, Gate, MAX_BUF};
use crate::shutdown::Shutdown;

/// What a connection's task is asked to do, in [`ClientConn::stop`].
const RUN: u8 = 0;
/// Finish what is in flight, take no new request (HTTP/1: close when idle; HTTP/2: GOAWAY).
const GRACEFUL: u8 = 1;
/// Close now: the drain's grace period is over.
const CLOSE: u8 = 2;
/// Close now: no request head within `header_read_timeout`.
const IDLE: u8 = 3;

/// Every open client connection of every integration, so that shutdown can let their requests
/// finish and then close what is left. Its lock is taken once when a connection opens and once
/// when it closes, never per request.
#[derive(Default)]
pub(crate) struct Connections {
    live: Mutex<Live>,
    /// Notified when the last connection closed.
    emptied: Notify,
}

#[derive(Default)]
struct Live {
    next: u64,
    conns: std::collections::HashMap<u64, Arc<ClientConn>>,
    /// What a connection registered from now on starts with (a connection accepted while the
    /// drain began).
    mode: u8,
}

impl Connections {
    fn register(&self, conn: &Arc<ClientConn>) -> u64 {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        live.next += 1;
        let id = live.next;
        if live.mode != RUN {
            conn.signal(live.mode);
        }
        live.conns.insert(id, conn.clone());
        id
    }

    fn remove(&self, id: u64) {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        live.conns.remove(&id);
        if live.conns.is_empty() {
            self.emptied.notify_waiters();
        }
    }

    fn signal_all(&self, mode: u8) {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        live.mode = mode;
        for conn in live.conns.values() {
            conn.signal(mode);
        }
    }

    /// Asks every connection to finish its requests in flight and close (HTTP/2: GOAWAY), and
    /// resolves when all have closed.
    pub(crate) async fn drain(&self) {
        self.signal_all(GRACEFUL);
        loop {
            let mut emptied = pin!(self.emptied.notified());
            emptied.as_mut().enable();
            if self
                .live
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .conns
                .is_empty()
            {
                return;
            }
            emptied.await;
        }
    }

    /// Closes every connection now, requests and bodies in flight included.
    pub(crate) fn close_all(&self) {
        self.signal_all(CLOSE);
    }
}

/// One client connection, shared by its task, its requests and its head-deadline task.
pub(crate) struct ClientConn {
    /// The upstream connection its requests use (`upstream`).
    pub(crate) affinity: Affinity,
    stop: AtomicU8,
    /// The connection task's, woken when `stop` changes.
    waker: AtomicWaker,
    accepted: Instant,
    /// Requests whose response has not ended yet.
    active: AtomicU32,
    /// When the last response ended, in nanoseconds since `accepted`.
    idle_since: AtomicU64,
    /// An HTTP/2 client: its connection idles between streams as it likes.
    multiplexed: AtomicBool,
}

impl ClientConn {
    fn new() -> ClientConn {
        ClientConn {
            affinity: Affinity::default(),
            stop: AtomicU8::new(RUN),
            waker: AtomicWaker::new(),
            accepted: Instant::now(),
            active: AtomicU32::new(0),
            idle_since: AtomicU64::new(0),
            multiplexed: AtomicBool::new(false),
        }
    }

    fn signal(&self, mode: u8) {
        // A close is never downgraded to a graceful end.
        self.stop.fetch_max(mode, Ordering::AcqRel);
        self.waker.wake();
    }
}

/// A request of this connection, from its head to the end of its response body (it rides on
/// the body): while one is active, the connection is not waiting for a head.
pub(crate) struct Active(Arc<ClientConn>);

impl Active {
    fn start(conn: &Arc<ClientConn>, version: Version) -> Active {
        if version >= Version::HTTP_2 {
            conn.multiplexed.store(true, Ordering::Relaxed);
        }
        conn.active.fetch_add(1, Ordering::AcqRel);
        Active(conn.clone())
    }

    pub(crate) fn conn(&self) -> &ClientConn {
        &self.0
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        let conn = &self.0;
        if conn.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            let since = conn.accepted.elapsed().as_nanos();
            conn.idle_since
                .store(u64::try_from(since).unwrap_or(u64::MAX), Ordering::Release);
        }
    }
}

/// Closes the connection once it has waited `timeout` for a request head: from its start, or
/// from the end of its last response. It sleeps until the earliest such moment and looks
/// again; a busy connection costs it one wake-up per `timeout`.
async fn head_deadline(conn: Arc<ClientConn>, timeout: Duration) {
    let mut due = conn.accepted + timeout;
    loop {
        tokio::time::sleep_until(due).await;
        if conn.multiplexed.load(Ordering::Relaxed) {
            return;
        }
        let now = Instant::now();
        if conn.active.load(Ordering::Acquire) > 0 {
            due = now + timeout;
            continue;
        }
        let idle = Duration::from_nanos(conn.idle_since.load(Ordering::Acquire));
        due = conn.accepted + idle + timeout;
        if now >= due && conn.active.load(Ordering::Acquire) == 0 {
            conn.signal(IDLE);
            return;
        }
    }
}

/// Accepts connections on one integration listener until `shutdown`, then stops accepting and
/// returns; the connections stay open, known to `connections`, for the caller to drain.
pub(crate) async fn serve(
    listener: TcpListener,
    gate: Arc<Gate>,
    header_read_timeout: Duration,
    connections: Arc<Connections>,
    mut shutdown: Shutdown,
) {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Half-closed clients are answered: a whole request followed by FIN on the write side
    // (`nc -N`, HTTP/1.0-era clients) is a request, not a client that left. hyper's default
    // would close such a connection unanswered, and watching for that EOF costs a read and a
    // fresh read buffer per request while the first one's headers are still in use (−3.6 %
    // instructions per small GET; peak RSS at 256 connections −1.3 MiB for small GETs and
    // −25 MiB for 64 KiB uploads, whose kept bodies held the old buffer; bench/NOTES.md
    // session 7). The price: a client gone before the response head no longer cancels the
    // upstream request; it completes (or meets request_timeout), is counted and logged, and
    // its upstream connection stays reusable.
    builder
        .http1()
        .keep_alive(true)
        .half_close(true)
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
        let client = Arc::new(ClientConn::new());
        let id = connections.register(&client);
        let svc = {
            let (gate, client) = (gate.clone(), client.clone());
            hyper::service::service_fn(move |req: hyper::Request<_>| {
                let active = Active::start(&client, req.version());
                gate.clone().handle(req, peer, active)
            })
        };
        // Every connection must bring a head within header_read_timeout, whatever its
        // protocol: a client that connects and sends nothing, or stalls in the HTTP/2
        // preface, or trickles an HTTP/1 head, would otherwise hold its connection until
        // shutdown.
        let deadline = tokio::spawn(head_deadline(client.clone(), header_read_timeout));
        let (builder, connections) = (builder.clone(), connections.clone());
        tokio::spawn(async move {
            let mut conn = pin!(builder.serve_connection(TokioIo::new(stream), svc));
            let mut graceful = false;
            let ended = poll_fn(|cx| {
                if let Poll::Ready(ended) = conn.as_mut().poll(cx) {
                    return Poll::Ready(Ok(ended));
                }
                client.waker.register(cx.waker());
                match client.stop.load(Ordering::Acquire) {
                    RUN => Poll::Pending,
                    GRACEFUL if graceful => Poll::Pending,
                    GRACEFUL => {
                        graceful = true;
                        conn.as_mut().graceful_shutdown();
                        conn.as_mut().poll(cx).map(Ok)
                    }
                    // Dropping the connection closes it, a request or body in flight included.
                    why => Poll::Ready(Err(why)),
                }
            })
            .await;
            deadline.abort();
            connections.remove(id);
            match ended {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    debug!(peer = %peer, error = %e, "client connection ended with an error")
                }
                Err(IDLE) => {
                    debug!(peer = %peer, "no request head within header_read_timeout; connection closed")
                }
                Err(_) => {
                    debug!(peer = %peer, "client connection closed: shutdown_grace expired")
                }
            }
        });
    }
}
