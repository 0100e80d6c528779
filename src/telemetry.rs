//! Logging setup and every Prometheus metric of the contract, defined in one place on a
//! [`Registry`] owned by `run` (not the global default, so several instances can live in one
//! test binary).
//!
//! Per-integration handles are resolved once at start ([`IntegrationMetrics`]); the request
//! path only touches atomics. Series whose labels are known in advance are created at start
//! so alerts never meet a missing series; `method`×`code` and the rate-limit gauge appear when
//! first seen. Labels are bounded: never a path, a client id or a token.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::config::LogFormat;
use crate::error::UpstreamErrorKind;
use crate::token::client::FETCH_ERROR_KINDS;

/// Installs the global tracing subscriber: level from `TOKENGATE_LOG` (env-filter syntax,
/// default `info`), text or JSON lines on stderr. A `TOKENGATE_LOG` that does not parse is
/// reported (once logging works) and `info` used instead.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let (filter, rejected) = match std::env::var("TOKENGATE_LOG") {
        Ok(directives) if !directives.trim().is_empty() => match EnvFilter::try_new(&directives) {
            Ok(filter) => (filter, None),
            Err(e) => (EnvFilter::new("info"), Some((directives, e))),
        },
        _ => (EnvFilter::new("info"), None),
    };
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only help a person at a terminal; in a file or journald they are noise.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // A second init (tests running several instances) is harmless; keep the first.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if let Some((directives, error)) = rejected {
        tracing::warn!(TOKENGATE_LOG = %directives, error = %error, "TOKENGATE_LOG is not a valid filter; logging at info");
    }
}

pub const TRIGGERS: [&str; 4] = [
    "startup",
    "scheduled",
    "unauthorized",
    "credentials_changed",
];
pub const RESULTS: [&str; 2] = ["success", "failure"];
pub const REPLAY_RESULTS: [&str; 3] = ["success", "failure", "not_replayable"];
pub const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "other",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Startup,
    Scheduled,
    Unauthorized,
    CredentialsChanged,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        TRIGGERS[self as usize]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replay {
    Success,
    Failure,
    NotReplayable,
}

/// All metric families.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    in_flight: IntGaugeVec,
    upstream_errors: IntCounterVec,
    refreshes: IntCounterVec,
    expiry: GaugeVec,
    valid: IntGaugeVec,
    replays: IntCounterVec,
    reloads: IntCounterVec,
    fetch_duration: HistogramVec,
    fetch_errors: IntCounterVec,
    ratelimit: IntGaugeVec,
    early_revocations: IntCounterVec,
    fleet_redis_up: IntGaugeVec,
    fleet_generation: IntGaugeVec,
    fleet_adoptions: IntCounterVec,
    fleet_claims: IntCounterVec,
    fleet_rejected: IntCounterVec,
    fleet_local_fetches: IntCounterVec,
}

pub const FLEET_VIAS: [&str; 2] = ["notification", "read"];
pub const CLAIM_RESULTS: [&str; 3] = ["won", "lost", "error"];
pub const REJECT_REASONS: [&str; 2] = ["unseal_failed", "malformed"];

/// One integration's fleet series, created (at 0) when it is a fleet member.
pub struct FleetMetrics {
    pub generation: IntGauge,
    adoptions: [IntCounter; 2],
    claims: [[IntCounter; 3]; 4],
    rejected: [IntCounter; 2],
    pub local_fetches: IntCounter,
}

impl FleetMetrics {
    pub fn adopted(&self, via: usize) {
        self.adoptions[via].inc();
    }

    pub fn claim(&self, trigger: Trigger, result: usize) {
        self.claims[trigger as usize][result].inc();
    }

    pub fn rejected(&self, why: &str) {
        if let Some(i) = REJECT_REASONS.iter().position(|r| *r == why) {
            self.rejected[i].inc();
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn counter(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let m = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

fn int_gauge(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    let m = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
) -> prometheus::Result<HistogramVec> {
    let m = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets),
        &["integration"],
    )?;
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

impl Metrics {
    pub fn new() -> prometheus::Result<Metrics> {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let build = int_gauge(
            &r,
            "tokengate_build_info",
            "Always 1; the version label says which build runs.",
            &["version"],
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let expiry = GaugeVec::new(
            Opts::new(
                "tokengate_token_expiry_timestamp_seconds",
                "Unix time at which the token held expires.",
            ),
            &["integration"],
        )?;
        r.register(Box::new(expiry.clone()))?;
        Ok(Metrics {
            requests: counter(
                &r,
                "tokengate_requests_total",
                "Client requests answered, by method and status code.",
                &["integration", "method", "code"],
            )?,
            duration: histogram(
                &r,
                "tokengate_request_duration_seconds",
                "Time from request received to response headers sent.",
                vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0,
                ],
            )?,
            in_flight: int_gauge(
                &r,
                "tokengate_in_flight_requests",
                "Requests being served, including streaming response bodies.",
                &["integration"],
            )?,
            upstream_errors: counter(
                &r,
                "tokengate_upstream_errors_total",
                "Failed exchanges with the upstream, by kind.",
                &["integration", "kind"],
            )?,
            refreshes: counter(
                &r,
                "tokengate_token_refreshes_total",
                "Token fetches, by what triggered them and how they ended.",
                &["integration", "trigger", "result"],
            )?,
            expiry,
            valid: int_gauge(
                &r,
                "tokengate_token_valid",
                "1 while the integration holds an unexpired token.",
                &["integration"],
            )?,
            replays: counter(
                &r,
                "tokengate_unauthorized_replays_total",
                "Requests answered 401 by the upstream, by what the replay did.",
                &["integration", "result"],
            )?,
            reloads: counter(
                &r,
                "tokengate_config_reloads_total",
                "Configuration reloads, by result.",
                &["result"],
            )?,
            fetch_duration: histogram(
                &r,
                "tokengate_token_fetch_duration_seconds",
                "Duration of one token request.",
                vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            )?,
            fetch_errors: counter(
                &r,
                "tokengate_token_fetch_errors_total",
                "Failed token requests, by kind.",
                &["integration", "kind"],
            )?,
            ratelimit: int_gauge(
                &r,
                "tokengate_upstream_ratelimit_remaining",
                "Last RateLimit-Remaining the upstream sent.",
                &["integration"],
            )?,
            early_revocations: counter(
                &r,
                "tokengate_early_revocations_total",
                "401s for a token younger than half its lifetime: revocation thrash.",
                &["integration"],
            )?,
            fleet_redis_up: int_gauge(
                &r,
                "tokengate_fleet_redis_up",
                "1 while the fleet's Redis is reachable (fleet mode).",
                &[],
            )?,
            fleet_generation: int_gauge(
                &r,
                "tokengate_fleet_generation",
                "The fleet generation of the token held; equal across a converged fleet.",
                &["integration"],
            )?,
            fleet_adoptions: counter(
                &r,
                "tokengate_fleet_adoptions_total",
                "Peers' tokens taken instead of fetching, by how they were learnt of.",
                &["integration", "via"],
            )?,
            fleet_claims: counter(
                &r,
                "tokengate_fleet_claims_total",
                "Attempts to claim the right to fetch for the fleet, by trigger and result.",
                &["integration", "trigger", "result"],
            )?,
            fleet_rejected: counter(
                &r,
                "tokengate_fleet_entries_rejected_total",
                "Fleet entries that did not open (forged, or sealed under another secret) or were malformed.",
                &["integration", "why"],
            )?,
            fleet_local_fetches: counter(
                &r,
                "tokengate_fleet_local_fetches_total",
                "Tokens fetched alone because the fleet's Redis was unreachable.",
                &["integration"],
            )?,
            registry: r,
        })
        .inspect(|m| {
            for result in ["success", "failure"] {
                m.reloads.with_label_values(&[result]);
            }
        })
    }

    /// Resolves every handle of one integration and creates its known-label series at zero.
    pub fn integration(&self, name: &str) -> Arc<IntegrationMetrics> {
        let l = [name];
        let refreshes =
            TRIGGERS.map(|t| RESULTS.map(|r| self.refreshes.with_label_values(&[name, t, r])));
        let m = IntegrationMetrics {
            name: name.to_string(),
            served: AtomicU64::new(0),
            requests: self.requests.clone(),
            request_series: (0..METHODS.len() * CODES)
                .map(|_| OnceLock::new())
                .collect(),
            duration: self.duration.with_label_values(&l),
            in_flight: self.in_flight.with_label_values(&l),
            upstream_errors: UpstreamErrorKind::ALL
                .map(|k| self.upstream_errors.with_label_values(&[name, k.as_str()])),
            refreshes,
            expiry: self.expiry.with_label_values(&l),
            valid: self.valid.with_label_values(&l),
            replays: REPLAY_RESULTS.map(|r| self.replays.with_label_values(&[name, r])),
            fetch_duration: self.fetch_duration.with_label_values(&l),
            fetch_errors: FETCH_ERROR_KINDS
                .map(|k| self.fetch_errors.with_label_values(&[name, k])),
            ratelimit_family: self.ratelimit.clone(),
            ratelimit: OnceLock::new(),
            early_revocations: self.early_revocations.with_label_values(&l),
        };
        m.valid.set(0);
        Arc::new(m)
    }

    /// `tokengate_fleet_redis_up`, created at 0 when the configuration has `[fleet]`.
    pub fn fleet_redis_up(&self) -> IntGauge {
        self.fleet_redis_up.with_label_values(&[] as &[&str])
    }

    /// The fleet series of integration `name`, every known label combination at 0.
    pub fn fleet(&self, name: &str) -> Arc<FleetMetrics> {
        Arc::new(FleetMetrics {
            generation: self.fleet_generation.with_label_values(&[name]),
            adoptions: FLEET_VIAS.map(|v| self.fleet_adoptions.with_label_values(&[name, v])),
            claims: TRIGGERS
                .map(|t| CLAIM_RESULTS.map(|r| self.fleet_claims.with_label_values(&[name, t, r]))),
            rejected: REJECT_REASONS.map(|w| self.fleet_rejected.with_label_values(&[name, w])),
            local_fetches: self.fleet_local_fetches.with_label_values(&[name]),
        })
    }

    pub fn reload(&self, ok: bool) {
        self.reloads
            .with_label_values(&[if ok { "success" } else { "failure" }])
            .inc();
    }

    /// The Prometheus text exposition format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec only fails on a metric that violates the format, which the
        // definitions above rule out; an empty scrape would then show the problem.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// Status codes 100..=599 each get a slot.
const CODES: usize = 500;

/// One integration's metric handles.
pub struct IntegrationMetrics {
    pub(crate) name: String,
    /// Requests answered, for `/status` (the labelled counter is for Prometheus).
    pub served: AtomicU64,
    requests: IntCounterVec,
    /// `method` × `code`, created on first use and then read without a lock.
    request_series: Vec<OnceLock<IntCounter>>,
    pub duration: Histogram,
    pub in_flight: IntGauge,
    upstream_errors: [IntCounter; 6],
    refreshes: [[IntCounter; 2]; 4],
    pub expiry: Gauge,
    pub valid: IntGauge,
    replays: [IntCounter; 3],
    pub fetch_duration: Histogram,
    fetch_errors: [IntCounter; 8],
    ratelimit_family: IntGaugeVec,
    ratelimit: OnceLock<IntGauge>,
    pub early_revocations: IntCounter,
}

impl std::fmt::Debug for IntegrationMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IntegrationMetrics({})", self.name)
    }
}

fn method_index(method: &http::Method) -> usize {
    let m = method.as_str();
    METHODS[..9].iter().position(|s| *s == m).unwrap_or(9)
}

impl IntegrationMetrics {
    pub fn request(&self, method: &http::Method, code: u16) {
        self.served
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let code = code.clamp(100, 599);
        let mi = method_index(method);
        let slot = mi * CODES + usize::from(code - 100);
        match self.request_series.get(slot) {
            Some(cell) => cell
                .get_or_init(|| {
                    self.requests
                        .with_label_values(&[&self.name, METHODS[mi], &code.to_string()])
                })
                .inc(),
            None => self
                .requests
                .with_label_values(&[&self.name, METHODS[mi], &code.to_string()])
                .inc(),
        }
    }

    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.upstream_errors[kind as usize].inc();
    }

    pub fn refresh(&self, trigger: Trigger, ok: bool) {
        self.refreshes[trigger as usize][usize::from(!ok)].inc();
    }

    pub fn replay(&self, result: Replay) {
        self.replays[result as usize].inc();
    }

    pub fn fetch_error(&self, kind: &str) {
        if let Some(i) = FETCH_ERROR_KINDS.iter().position(|k| *k == kind) {
            self.fetch_errors[i].inc();
        }
    }

    pub fn ratelimit_remaining(&self, remaining: i64) {
        self.ratelimit
            .get_or_init(|| self.ratelimit_family.with_label_values(&[&self.name]))
            .set(remaining);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_series_exist_from_the_start() {
        let m = Metrics::new().unwrap();
        let _oms = m.integration("oms");
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(text.contains(
            r#"tokengate_token_refreshes_total{integration="oms",result="failure",trigger="credentials_changed"} 0"#
        ));
        assert!(text.contains(r#"tokengate_token_valid{integration="oms"} 0"#));
        assert!(text.contains(r#"tokengate_upstream_errors_total{integration="oms",kind="tls"} 0"#));
        assert!(text.contains(
            r#"tokengate_token_fetch_errors_total{integration="oms",kind="bad_response"} 0"#
        ));
        assert!(!text.contains("tokengate_upstream_ratelimit_remaining{"));
        assert!(!text.contains("tokengate_requests_total{"));
    }

    #[test]
    fn request_series_appear_when_seen() {
        let m = Metrics::new().unwrap();
        let oms = m.integration("oms");
        oms.request(&http::Method::GET, 200);
        oms.request(&http::Method::GET, 200);
        oms.request(&http::Method::from_bytes(b"PURGE").unwrap(), 404);
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(text
            .contains(r#"tokengate_requests_total{code="200",integration="oms",method="GET"} 2"#));
        assert!(text.contains(
            r#"tokengate_requests_total{code="404",integration="oms",method="other"} 1"#
        ));
    }
}
