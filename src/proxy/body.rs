//! The bodies a proxied exchange carries, and the bookkeeping that has to live as long as
//! they do: the request body streaming upstream with a copy kept for a replay (the tee), the
//! upstream's response body streaming back with the in-flight count and a mid-body failure
//! report riding on it, and the bodies tokengate writes whole (its own errors, a replayed
//! copy). Both directions share one body type, [`ProxyBody`], so its end-of-stream and size
//! rules are written once.
//!
//! It decides nothing: whether a request is replayed is the service's choice (`mod.rs`).

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::upstream::classify_upstream;
use crate::error::chain;
use crate::telemetry::IntegrationMetrics;

/// The body of a request sent upstream: the client's body streaming through (with an optional
/// copy kept for a replay), or a kept copy being replayed. The stream is boxed: the request is
/// moved through every layer of the send and sits in hyper's dispatch queue, and most requests
/// (a GET) have no body at all, so they should not carry the tee's size.
pub(crate) type ReqBody = ProxyBody<Pin<Box<Tee>>>;

/// The body of a response to the client: the upstream's, streaming, or one tokengate wrote.
pub(crate) type ResBody = ProxyBody<UpstreamBody>;

pin_project_lite::pin_project! {
    /// A body tokengate holds whole, or one streaming through it.
    #[project = ProxyBodyProj]
    pub(crate) enum ProxyBody<S> {
        Full { data: Option<Bytes> },
        Stream { #[pin] inner: S },
    }
}

impl<S> From<Bytes> for ProxyBody<S> {
    fn from(b: Bytes) -> Self {
        ProxyBody::Full { data: Some(b) }
    }
}

impl<S: Body<Data = Bytes>> Body for ProxyBody<S> {
    type Data = Bytes;
    type Error = S::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, S::Error>>> {
        match self.project() {
            ProxyBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBodyProj::Stream { inner } => inner.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full { data } => data.is_none(),
            ProxyBody::Stream { inner } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map(|d| d.len() as u64).unwrap_or(0))
            }
            ProxyBody::Stream { inner } => inner.size_hint(),
        }
    }
}

/// Why the client's request body failed while it streamed upstream (the client went away
/// mid-body, or sent a malformed chunk), once it has. Shared by the body, the request and its
/// response: the upstream connection then abandons the upstream exchange, and whatever error that
/// produces (HTTP/1 names the body error, HTTP/2 only a reset stream) is the client's doing,
/// not the upstream's: a 400, never counted in `tokengate_upstream_errors_total`.
pub(crate) type ClientBodyFailure = Arc<OnceLock<String>>;

/// Splits a client's request body into the body sent upstream and the replay copy's other
/// end. A copy is kept only while the body fits in `limit` (`max_replay_body`); a body that
/// announces more is streamed without one. `failed` is made here, only for a request with a
/// body (most have none).
pub(crate) fn tee(
    body: Incoming,
    limit: u64,
    failed: &mut Option<ClientBodyFailure>,
) -> (ReqBody, KeptBody) {
    if body.is_end_stream() {
        return (
            ProxyBody::Full { data: None },
            KeptBody::Complete(Bytes::new()),
        );
    }
    if body.size_hint().lower() > limit {
        let inner = Tee {
            inner: body,
            kept: None,
            limit: 0,
            done: None,
            failed: failed.get_or_insert_default().clone(),
        };
        return (
            ProxyBody::Stream {
                inner: Box::pin(inner),
            },
            KeptBody::TooLarge,
        );
    }
    let (tx, rx) = oneshot::channel();
    let inner = Tee {
        inner: body,
        kept: Some(Kept::default()),
        limit: limit as usize,
        done: Some(tx),
        failed: failed.get_or_insert_default().clone(),
    };
    (
        ProxyBody::Stream {
            inner: Box::pin(inner),
        },
        KeptBody::Pending(rx),
    )
}

pin_project_lite::pin_project! {
    /// The client's body on its way upstream, kept in `kept` while it fits in `limit`; what
    /// was kept goes to `done` when the body ends.
    pub(crate) struct Tee {
        #[pin]
        inner: Incoming,
        kept: Option<Kept>,
        limit: usize,
        done: Option<oneshot::Sender<Kept>>,
        failed: ClientBodyFailure,
    }
}

/// A chunk at least this large is kept by reference, a smaller one copied.
const SHARED_CHUNK: usize = 4 * 1024;

/// A request body kept for a replay. Its large chunks are kept as they came, references to the
/// bytes hyper read (sent upstream from the same memory), so keeping a body costs no copy of
/// it and hardly any memory of its own: at 256 connections uploading 64 KiB each, copying it
/// held 98–106 MiB at peak against 70–80 MiB without the copy (bench/NOTES.md session 6), and
/// cost a 64 KiB copy per request. Small chunks are copied together instead: a client sending
/// a body in tiny chunks must not make the list grow with every byte, nor pin a whole read
/// buffer per byte it keeps.
#[derive(Default)]
pub(crate) struct Kept {
    chunks: Vec<Bytes>,
    /// Small chunks since the last large one.
    small: BytesMut,
    len: usize,
}

impl Kept {
    fn push(&mut self, data: &Bytes) {
        self.len += data.len();
        if data.len() < SHARED_CHUNK {
            self.small.extend_from_slice(data);
            return;
        }
        if !self.small.is_empty() {
            self.chunks.push(self.small.split().freeze());
        }
        self.chunks.push(data.clone());
    }

    /// The whole body, for a replay: the one chunk itself, or a copy of them all.
    fn join(mut self) -> Bytes {
        if !self.small.is_empty() {
            self.chunks.push(self.small.freeze());
        }
        if self.chunks.len() <= 1 {
            return self.chunks.pop().unwrap_or_default();
        }
        let mut body = BytesMut::with_capacity(self.len);
        for chunk in &self.chunks {
            body.extend_from_slice(chunk);
        }
        body.freeze()
    }
}

impl Tee {
    fn finish(kept: &mut Option<Kept>, done: &mut Option<oneshot::Sender<Kept>>) {
        if let (Some(body), Some(tx)) = (kept.take(), done.take()) {
            let _ = tx.send(body);
        }
    }
}

impl Body for Tee {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        let (mut inner, kept, done) = (this.inner, this.kept, this.done);
        match inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                match frame.data_ref() {
                    Some(data) => {
                        if let Some(body) = kept.as_mut() {
                            if body.len + data.len() > *this.limit {
                                *kept = None;
                                *done = None;
                            } else {
                                body.push(data);
                            }
                        }
                    }
                    // Trailers cannot be replayed faithfully.
                    None => {
                        *kept = None;
                        *done = None;
                    }
                }
                if inner.is_end_stream() {
                    Tee::finish(kept, done);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                Tee::finish(kept, done);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                *kept = None;
                *done = None;
                let _ = this.failed.set(chain(&e));
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The replay copy of a request body, as [`tee`] left it.
pub(crate) enum KeptBody {
    Complete(Bytes),
    Pending(oneshot::Receiver<Kept>),
    TooLarge,
}

impl KeptBody {
    /// The whole body, for a replay.
    pub(crate) fn take(self) -> Option<Bytes> {
        match self {
            KeptBody::Complete(b) => Some(b),
            // The copy exists only if the upstream read the whole body before answering.
            KeptBody::Pending(mut rx) => rx.try_recv().ok().map(Kept::join),
            KeptBody::TooLarge => None,
        }
    }
}

impl ResBody {
    /// The upstream's response body, streaming back with no guard yet (see [`Self::guard`]).
    pub(crate) fn upstream(inner: Incoming) -> ResBody {
        ProxyBody::Stream {
            inner: UpstreamBody { inner, guard: None },
        }
    }

    /// Hands `guard` to a streaming body, to live as long as it does; a body tokengate wrote
    /// whole drops it at once.
    pub(crate) fn guard(&mut self, guard: impl FnOnce() -> InFlightGuard) {
        if let ProxyBody::Stream { inner } = self {
            inner.guard = Some(guard());
        }
    }
}

pin_project_lite::pin_project! {
    /// The upstream's response body on its way to the client, carrying its [`InFlightGuard`].
    pub(crate) struct UpstreamBody {
        #[pin]
        inner: Incoming,
        guard: Option<InFlightGuard>,
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(None) => drop(this.guard.take()),
            Poll::Ready(Some(Err(e))) => {
                if let Some(g) = this.guard.take() {
                    g.body_failed(e);
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Counts a request in flight until its response body ends (or is dropped). It holds the
/// integration's metrics, which the guard below reports through.
pub(crate) struct InFlight(Arc<IntegrationMetrics>);

impl InFlight {
    pub(crate) fn new(metrics: &Arc<IntegrationMetrics>) -> InFlight {
        metrics.in_flight.inc();
        InFlight(metrics.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// Carried by a streaming response body: counts the request in flight until the body ends,
/// and reports an upstream failure mid-body, which happens after the access line was written
/// with the upstream's status and would otherwise be visible only as a truncated body.
pub(crate) struct InFlightGuard {
    pub(crate) in_flight: InFlight,
    /// The request is active on its client connection until the body ends.
    pub(crate) _active: super::listener::Active,
    pub(crate) request_id: HeaderValue,
    /// Set when the client's request body failed: the upstream connection then abandons the
    /// upstream exchange, which fails the response body too, through no fault of the
    /// upstream's. None for a request without a body.
    pub(crate) client_body_failed: Option<ClientBodyFailure>,
}

impl InFlightGuard {
    fn body_failed(self, e: &hyper::Error) {
        if self
            .client_body_failed
            .as_ref()
            .is_some_and(|f| f.get().is_some())
        {
            debug!(integration = %self.in_flight.0.name, request_id = ?self.request_id, "response abandoned because the client's request body failed");
            return;
        }
        let metrics = &self.in_flight.0;
        let kind = classify_upstream(e);
        metrics.upstream_error(kind);
        warn!(
            integration = %metrics.name,
            kind = kind.as_str(),
            error = %chain(e),
            request_id = ?self.request_id,
            "the upstream's response body failed midway; the client got a truncated response"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keep(chunks: &[Bytes]) -> Kept {
        let mut kept = Kept::default();
        for chunk in chunks {
            kept.push(chunk);
        }
        kept
    }

    #[test]
    fn a_large_chunk_is_kept_by_reference_and_small_ones_are_copied_together() {
        let large = Bytes::from(vec![b'L'; SHARED_CHUNK]);
        let kept = keep(std::slice::from_ref(&large));
        assert_eq!(kept.chunks.len(), 1);
        let joined = kept.join();
        assert_eq!(
            joined.as_ptr(),
            large.as_ptr(),
            "no copy of a lone large chunk"
        );

        // A body in one-byte chunks: one copy, not a list entry per byte.
        let tiny: Vec<Bytes> = (0..10_000u32)
            .map(|i| Bytes::from(vec![b'a' + (i % 26) as u8]))
            .collect();
        let kept = keep(&tiny);
        assert!(kept.chunks.is_empty());
        assert_eq!(kept.len, 10_000);
        let joined = kept.join();
        assert_eq!(joined.len(), 10_000);
        assert!(joined
            .iter()
            .enumerate()
            .all(|(i, b)| *b == b'a' + (i % 26) as u8));
    }

    #[test]
    fn mixed_chunks_are_joined_in_order() {
        let parts = [
            Bytes::from_static(b"head-"),
            Bytes::from(vec![b'1'; SHARED_CHUNK + 7]),
            Bytes::from_static(b"-mid-"),
            Bytes::from_static(b"more-"),
            Bytes::from(vec![b'2'; 3 * SHARED_CHUNK]),
            Bytes::from_static(b"-tail"),
        ];
        let kept = keep(&parts);
        assert_eq!(
            kept.chunks.len(),
            4,
            "head, 1s, mid+more, 2s; tail still small"
        );
        let expected: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        assert_eq!(kept.join(), expected);
        assert_eq!(keep(&[]).join(), Bytes::new());
    }
}
