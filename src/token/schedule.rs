//! When refreshes happen: the scheduled refresh within its jitter, the backoff after failures,
//! and the fixed floor between forced (401-triggered) fetches. Pure functions of the clock
//! readings they are given; the refresher and the fleet protocol both plan with them.

use std::time::Duration;

use tokio::time::Instant;

/// Scheduled refreshes (and retries) are never closer together than this.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Cap of the exponential backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// At most one forced (401-triggered) refresh per this interval, fixed: a revoked key would
/// otherwise turn every request into a token request, and nothing lengthens it, because a
/// longer floor only makes revoked calls wait or fail.
pub const FORCE_INTERVAL: Duration = Duration::from_secs(5);

/// When to refresh a token of `lifetime`: at `refresh_at` of it, moved by `jitter` ∈ [-1, 1]
/// times 5 % of the lifetime so that many sidecars started together spread out.
pub fn refresh_delay(lifetime: Duration, refresh_at: f64, jitter: f64) -> Duration {
    let fraction = (refresh_at + 0.05 * jitter.clamp(-1.0, 1.0)).clamp(0.01, 0.99);
    lifetime.mul_f64(fraction).max(MIN_INTERVAL)
}

/// Full-jitter exponential backoff after `failures` consecutive failures (≥ 1), given a
/// uniform `sample` ∈ [0, 1).
pub fn backoff(failures: u32, sample: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(6);
    let cap = Duration::from_secs(1u64 << exp).min(MAX_BACKOFF);
    cap.mul_f64(sample.clamp(0.0, 1.0)).max(MIN_INTERVAL)
}

/// When the forced fetch owed for a refused token may start: not before the floor after the
/// last one, and not before a retry that backoff has put off (`retry_at`, while fetches fail).
pub fn forced_fetch_at(
    now: Instant,
    last_forced: Option<Instant>,
    retry_at: Option<Instant>,
) -> Instant {
    let floor = last_forced.map_or(now, |t| t + FORCE_INTERVAL);
    floor.max(retry_at.unwrap_or(now)).max(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_happens_at_the_fraction_within_jitter() {
        let hour = Duration::from_secs(3600);
        assert_eq!(refresh_delay(hour, 0.8, 0.0), Duration::from_secs(2880));
        assert_eq!(refresh_delay(hour, 0.8, 1.0), Duration::from_secs(3060));
        assert_eq!(refresh_delay(hour, 0.8, -1.0), Duration::from_secs(2700));
        // Never closer than 1 s, even for absurdly short tokens.
        assert_eq!(
            refresh_delay(Duration::from_millis(500), 0.8, 0.0),
            MIN_INTERVAL
        );
    }

    #[test]
    fn the_forced_fetch_floor_is_fixed_at_5_s() {
        let now = Instant::now();
        let s = Duration::from_secs;
        // None before, or the last long ago: at once.
        assert_eq!(forced_fetch_at(now, None, None), now);
        assert_eq!(forced_fetch_at(now + s(60), Some(now), None), now + s(60));
        // Within the floor: when it ends, however many forced fetches came before.
        assert_eq!(forced_fetch_at(now + s(1), Some(now), None), now + s(5));
        assert_eq!(forced_fetch_at(now + s(5), Some(now), None), now + s(5));
        // A backoff that puts the retry later wins over the floor.
        assert_eq!(
            forced_fetch_at(now + s(1), Some(now), Some(now + s(9))),
            now + s(9)
        );
        assert_eq!(forced_fetch_at(now, None, Some(now - s(1))), now);
    }

    #[test]
    fn backoff_doubles_to_a_minute_with_full_jitter() {
        assert_eq!(backoff(1, 0.99), MIN_INTERVAL);
        assert_eq!(backoff(3, 0.5), Duration::from_secs(2));
        assert_eq!(backoff(4, 1.0), Duration::from_secs(8));
        assert_eq!(backoff(7, 1.0), MAX_BACKOFF);
        assert_eq!(backoff(100, 1.0), MAX_BACKOFF);
        assert_eq!(backoff(100, 0.0), MIN_INTERVAL);
    }
}
