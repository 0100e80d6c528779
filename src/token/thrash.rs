//! Revocation thrash: tokens of one app refused again and again soon after issue (several
//! holders of one app on a server that revokes the previous token on each issue). Named in
//! the log at most once a minute and in `/status`, never punished with a longer wait.

use tokio::time::{Duration, Instant};

/// The thrash error is logged at most this often.
pub(super) const THRASH_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Tokens revoked early within one log interval that make it thrash rather than bad luck.
const THRASH_THRESHOLD: u32 = 3;

/// What the thrash error and the `/status` warning say.
pub(super) fn thrash_message(count: u32) -> String {
    format!(
        "tokens keep being revoked soon after they are issued ({count} within a minute): most likely several tokengate replicas or other systems share this Delivery Hub app and the server revokes the previous token on each new issue. Give them one token through fleet mode ([fleet] with a shared Redis), or give each replica its own app. Calls are still replayed, but each revocation makes some wait for a new token"
    )
}

/// Counts early revocations (tokens refused while younger than half their lifetime), one per
/// refused token however many requests carried it, so that a ping-pong between two holders
/// of one app is named once a minute, not once per request.
pub(super) struct Thrash {
    window_start: Instant,
    count: u32,
    last_log: Option<Instant>,
    last_early: Option<Instant>,
    /// The generation last counted: concurrent 401s for one token are one revocation.
    last_generation: u64,
}

/// What one early revocation means for the operator.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ThrashSignal {
    /// Not (yet) a pattern.
    Quiet,
    /// Thrash, `count` early revocations in the current window; `log` when the error line is
    /// due (at most once per [`THRASH_LOG_INTERVAL`]).
    Thrashing { count: u32, log: bool },
}

impl Thrash {
    pub(super) fn new(now: Instant) -> Thrash {
        Thrash {
            window_start: now,
            count: 0,
            last_log: None,
            last_early: None,
            last_generation: 0,
        }
    }

    /// Records that the token of `generation` was revoked early.
    pub(super) fn note(&mut self, generation: u64, now: Instant) -> ThrashSignal {
        if generation <= self.last_generation {
            return ThrashSignal::Quiet;
        }
        self.last_generation = generation;
        self.last_early = Some(now);
        if now.duration_since(self.window_start) > THRASH_LOG_INTERVAL {
            self.window_start = now;
            self.count = 0;
        }
        self.count += 1;
        if self.count < THRASH_THRESHOLD {
            return ThrashSignal::Quiet;
        }
        let log = self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= THRASH_LOG_INTERVAL);
        if log {
            self.last_log = Some(now);
        }
        ThrashSignal::Thrashing {
            count: self.count,
            log,
        }
    }

    /// Whether no token was revoked early for a whole log interval: the warning can go.
    pub(super) fn calm(&self, now: Instant) -> bool {
        self.last_early
            .is_none_or(|t| now.duration_since(t) > THRASH_LOG_INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thrash_is_named_after_three_early_revocations_and_logged_once_a_minute() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut t = Thrash::new(start);
        assert_eq!(t.note(1, start), ThrashSignal::Quiet);
        // Many requests refused with one token are one revocation.
        for _ in 0..10 {
            assert_eq!(t.note(1, start), ThrashSignal::Quiet);
        }
        assert_eq!(t.note(2, at(1)), ThrashSignal::Quiet);
        let thrashing = |count, log| ThrashSignal::Thrashing { count, log };
        assert_eq!(t.note(3, at(2)), thrashing(3, true));
        assert_eq!(
            t.note(4, at(3)),
            thrashing(4, false),
            "logged once a minute"
        );
        assert_eq!(t.note(5, at(30)), thrashing(5, false));
        assert!(!t.calm(at(31)));
        // A new window: three more within it are named again.
        assert_eq!(t.note(6, at(63)), ThrashSignal::Quiet);
        assert_eq!(t.note(7, at(64)), ThrashSignal::Quiet);
        assert_eq!(t.note(8, at(65)), thrashing(3, true));
        assert!(t.calm(at(126)));
    }
}
