//! Operations: what an operator watching tokengate sees. `/metrics` is scraped and parsed
//! with a real Prometheus text-format parser (`prometheus-parse`) and checked against the
//! contract's table (names, types, labels, known series at zero) and as requests and
//! refreshes happen; `/readyz` before the first token, after it and while draining; `/status`
//! and the absence of secrets and tokens on every admin endpoint; graceful shutdown with
//! slow and streaming requests in flight; and, on the built binary, JSON log lines (the
//! access line's fields, one line per refresh failure with the endpoint's own words, how a
//! drain ended), the `TOKENGATE_LOG` filter, and a `shutdown_grace` changed by a reload.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use prometheus_parse::{LineInfo, Sample, SampleType, Scrape, Value as PromValue};
use serde_json::{json, Value};
use tokengate::standin::{Hub, HubOptions, TokenReply};
use tokio::time::Instant;

use support::process::{self, free_port};
use support::Tg;

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The contract's metric table: name, `# TYPE`, label names.
const CONTRACT: [(&str, SampleType, &[&str]); 14] = [
    (
        "tokengate_requests_total",
        SampleType::Counter,
        &["integration", "method", "code"],
    ),
    (
        "tokengate_request_duration_seconds",
        SampleType::Histogram,
        &["integration"],
    ),
    (
        "tokengate_in_flight_requests",
        SampleType::Gauge,
        &["integration"],
    ),
    (
        "tokengate_upstream_errors_total",
        SampleType::Counter,
        &["integration", "kind"],
    ),
    (
        "tokengate_token_refreshes_total",
        SampleType::Counter,
        &["integration", "trigger", "result"],
    ),
    (
        "tokengate_token_expiry_timestamp_seconds",
        SampleType::Gauge,
        &["integration"],
    ),
    ("tokengate_token_valid", SampleType::Gauge, &["integration"]),
    (
        "tokengate_unauthorized_replays_total",
        SampleType::Counter,
        &["integration", "result"],
    ),
    (
        "tokengate_config_reloads_total",
        SampleType::Counter,
        &["result"],
    ),
    (
        "tokengate_token_fetch_duration_seconds",
        SampleType::Histogram,
        &["integration"],
    ),
    (
        "tokengate_token_fetch_errors_total",
        SampleType::Counter,
        &["integration", "kind"],
    ),
    (
        "tokengate_upstream_ratelimit_remaining",
        SampleType::Gauge,
        &["integration"],
    ),
    (
        "tokengate_early_revocations_total",
        SampleType::Counter,
        &["integration"],
    ),
    ("tokengate_build_info", SampleType::Gauge, &["version"]),
];

/// Families whose series appear when first seen rather than at start.
const FIRST_SEEN: [&str; 2] = [
    "tokengate_requests_total",
    "tokengate_upstream_ratelimit_remaining",
];

const TRIGGERS: [&str; 4] = [
    "startup",
    "scheduled",
    "unauthorized",
    "credentials_changed",
];
const UPSTREAM_KINDS: [&str; 6] = ["connect", "tls", "timeout", "reset", "proxy", "other"];
const FETCH_KINDS: [&str; 8] = [
    "invalid_client",
    "rejected",
    "rate_limited",
    "server_error",
    "timeout",
    "connect",
    "tls",
    "bad_response",
];
const DURATION_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// One scrape of `/metrics`, parsed.
struct Metrics {
    text: String,
    samples: Vec<Sample>,
    /// `# TYPE` of each family, by family name (histograms under their base name).
    types: HashMap<String, SampleType>,
}

impl Metrics {
    fn parse(text: String) -> Metrics {
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
        let mut types = HashMap::new();
        for line in text.lines() {
            if let LineInfo::Type {
                metric_name,
                metric_alias,
                sample_type,
            } = LineInfo::parse(line)
            {
                types.insert(metric_alias.unwrap_or(metric_name), sample_type);
            }
        }
        Metrics {
            text,
            samples: scrape.samples,
            types,
        }
    }

    /// Every series of one family (histograms: one per label set, without `le`).
    fn series(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.metric == name).collect()
    }

    /// The one series of `name` with exactly these labels.
    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<&Sample> {
        let want: HashMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.series(name).into_iter().find(|s| *s.labels == want)
    }

    /// The value of a counter, gauge or untyped series (`None` when it does not exist).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        match &self.find(name, labels)?.value {
            PromValue::Counter(v) | PromValue::Gauge(v) | PromValue::Untyped(v) => Some(*v),
            other => panic!("{name} is not a single value: {other:?}"),
        }
    }

    /// `value`, which must exist.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no series {name}{labels:?} in\n{}", self.text))
    }

    /// A histogram's buckets (upper bound, cumulative count) and its `_count`.
    fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> (Vec<(f64, f64)>, f64) {
        let sample = self
            .find(name, labels)
            .unwrap_or_else(|| panic!("no histogram {name}{labels:?} in\n{}", self.text));
        let PromValue::Histogram(buckets) = &sample.value else {
            panic!("{name} is not a histogram: {:?}", sample.value)
        };
        let mut buckets: Vec<(f64, f64)> = buckets.iter().map(|b| (b.less_than, b.count)).collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        (buckets, self.get(&format!("{name}_count"), labels))
    }

    /// Checks the family's `# TYPE` and that every series has exactly the contract's labels.
    fn assert_family(&self, name: &str, ty: SampleType, labels: &[&str]) {
        assert_eq!(
            self.types.get(name),
            Some(&ty),
            "# TYPE of {name} in\n{}",
            self.text
        );
        let series = self.series(name);
        assert!(!series.is_empty(), "no series of {name} in\n{}", self.text);
        let want: BTreeSet<&str> = labels.iter().copied().collect();
        for s in series {
            let have: BTreeSet<&str> = s.labels.keys().map(String::as_str).collect();
            assert_eq!(have, want, "labels of {name}: {:?}", s.labels);
        }
    }
}

async fn scrape(tg: &Tg) -> Metrics {
    let res = support::client()
        .get(tg.admin_url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let content_type = res.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    Metrics::parse(res.text().await.unwrap())
}

/// Scrapes until `check` accepts the metrics (bounded); returns that scrape.
async fn scrape_until(tg: &Tg, what: &str, check: impl Fn(&Metrics) -> bool) -> Metrics {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = scrape(tg).await;
        if check(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed {what}:\n{}",
            m.text
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn get_json(url: &str) -> (u16, Value) {
    let res = support::client().get(url).send().await.unwrap();
    let status = res.status().as_u16();
    assert_eq!(
        res.headers()["content-type"],
        "application/json",
        "{url} answers JSON"
    );
    (status, res.json().await.unwrap())
}

/// GETs `url` until `check` accepts (status, body) (bounded); returns them.
async fn get_json_until(url: &str, what: &str, check: impl Fn(u16, &Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = get_json(url).await;
        if check(status, &body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{url} never showed {what}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

const OMS: [(&str, &str); 1] = [("integration", "oms")];

fn refresh(trigger: &'static str, result: &'static str) -> [(&'static str, &'static str); 3] {
    [
        ("integration", "oms"),
        ("trigger", trigger),
        ("result", result),
    ]
}

#[tokio::test]
async fn metrics_follow_the_contract_and_move_with_requests() {
    let hub = support::hub().await;
    let before = unix_now();
    let tg = support::start(&hub, "").await;
    let m = scrape(&tg).await;
    let after = unix_now();

    // Every family of the contract, with its type and labels, and nothing else of ours.
    for (name, ty, labels) in CONTRACT {
        if FIRST_SEEN.contains(&name) {
            assert!(m.series(name).is_empty(), "{name} before any request");
        } else {
            m.assert_family(name, ty, labels);
        }
    }
    let ours: BTreeSet<&str> = m
        .types
        .keys()
        .map(String::as_str)
        .filter(|n| n.starts_with("tokengate_"))
        .collect();
    let contract: BTreeSet<&str> = CONTRACT.iter().map(|c| c.0).collect();
    assert!(
        ours.is_subset(&contract),
        "families outside the contract: {ours:?}"
    );

    // Known series exist from the start; after start only the first token is counted.
    for trigger in TRIGGERS {
        for result in ["success", "failure"] {
            let want = if (trigger, result) == ("startup", "success") {
                1.0
            } else {
                0.0
            };
            assert_eq!(
                m.get("tokengate_token_refreshes_total", &refresh(trigger, result)),
                want,
                "{trigger}/{result}"
            );
        }
    }
    for kind in UPSTREAM_KINDS {
        let l = [("integration", "oms"), ("kind", kind)];
        assert_eq!(m.get("tokengate_upstream_errors_total", &l), 0.0, "{kind}");
    }
    for kind in FETCH_KINDS {
        let l = [("integration", "oms"), ("kind", kind)];
        assert_eq!(
            m.get("tokengate_token_fetch_errors_total", &l),
            0.0,
            "{kind}"
        );
    }
    for result in ["success", "failure", "not_replayable"] {
        let l = [("integration", "oms"), ("result", result)];
        assert_eq!(m.get("tokengate_unauthorized_replays_total", &l), 0.0);
    }
    for result in ["success", "failure"] {
        assert_eq!(
            m.get("tokengate_config_reloads_total", &[("result", result)]),
            0.0
        );
    }
    assert_eq!(m.get("tokengate_early_revocations_total", &OMS), 0.0);
    assert_eq!(m.get("tokengate_in_flight_requests", &OMS), 0.0);
    assert_eq!(m.get("tokengate_token_valid", &OMS), 1.0);
    assert_eq!(m.get("tokengate_build_info", &[("version", VERSION)]), 1.0);
    // The stand-in's tokens live an hour, counted from when tokengate received one.
    let expiry = m.get("tokengate_token_expiry_timestamp_seconds", &OMS);
    assert!(
        (before + 3600.0 - 1.0..=after + 3600.0 + 1.0).contains(&expiry),
        "expiry {expiry} is not an hour after {before}..{after}"
    );
    let (_, fetches) = m.histogram("tokengate_token_fetch_duration_seconds", &OMS);
    assert_eq!(fetches, 1.0);
    let (buckets, requests) = m.histogram("tokengate_request_duration_seconds", &OMS);
    assert_eq!(requests, 0.0);
    let bounds: Vec<f64> = buckets.iter().map(|b| b.0).collect();
    let mut want = DURATION_BUCKETS.to_vec();
    want.push(f64::INFINITY);
    assert_eq!(bounds, want, "request duration buckets: 0.5 ms … 30 s");
    #[cfg(target_os = "linux")]
    {
        assert!(
            m.samples.iter().any(|s| s.metric.starts_with("process_")),
            "process_* metrics"
        );
        assert!(m.get("process_start_time_seconds", &[]) > 0.0);
        assert!(m.get("process_resident_memory_bytes", &[]) > 0.0);
    }

    // Traffic: three GETs, a POST answered 404 and a DELETE answered 503 by the upstream.
    let client = support::client();
    for _ in 0..3 {
        let res = client
            .get(tg.url("/v2/orders/canary-path-4711?page=2"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        res.text().await.unwrap();
    }
    let res = client.post(tg.url("/status/404")).send().await.unwrap();
    assert_eq!(res.status(), 404);
    let res = client.delete(tg.url("/status/503")).send().await.unwrap();
    assert_eq!(res.status(), 503);
    let remaining: f64 = res.headers()["ratelimit-remaining"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();

    let m = scrape_until(&tg, "in-flight back to 0", |m| {
        m.value("tokengate_in_flight_requests", &OMS) == Some(0.0)
    })
    .await;
    m.assert_family(
        "tokengate_requests_total",
        SampleType::Counter,
        &["integration", "method", "code"],
    );
    let req = |method, code| [("integration", "oms"), ("method", method), ("code", code)];
    assert_eq!(m.get("tokengate_requests_total", &req("GET", "200")), 3.0);
    assert_eq!(m.get("tokengate_requests_total", &req("POST", "404")), 1.0);
    assert_eq!(
        m.get("tokengate_requests_total", &req("DELETE", "503")),
        1.0
    );
    assert_eq!(m.series("tokengate_requests_total").len(), 3);
    let (buckets, count) = m.histogram("tokengate_request_duration_seconds", &OMS);
    assert_eq!(count, 5.0);
    assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, 5.0));
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "cumulative buckets: {buckets:?}"
    );
    // The last RateLimit-Remaining the upstream sent, as the client saw it too.
    m.assert_family(
        "tokengate_upstream_ratelimit_remaining",
        SampleType::Gauge,
        &["integration"],
    );
    assert_eq!(
        m.get("tokengate_upstream_ratelimit_remaining", &OMS),
        remaining
    );
    // Upstream 5xx are the upstream's answers, not tokengate's upstream errors.
    for kind in UPSTREAM_KINDS {
        let l = [("integration", "oms"), ("kind", kind)];
        assert_eq!(m.get("tokengate_upstream_errors_total", &l), 0.0);
    }
    // Bounded labels: no path, client id or token anywhere in the exposition.
    assert!(!m.text.contains("canary-path"), "a path became a label");
    assert!(!m.text.contains("test-client"));
    for token in hub.issued_tokens() {
        assert!(!m.text.contains(&token));
    }
    tg.stop().await;
}

#[tokio::test]
async fn refresh_metrics_move_with_scheduled_and_forced_refreshes() {
    let hub = support::hub_with(HubOptions {
        token_lifetime: Duration::from_secs(4),
        ..HubOptions::default()
    })
    .await;
    let tg = support::start(&hub, "refresh_at = 0.5").await;
    let first = scrape(&tg).await;
    let first_expiry = first.get("tokengate_token_expiry_timestamp_seconds", &OMS);

    // Half of a 4 s lifetime (±5 %) later, a scheduled refresh.
    let m = scrape_until(&tg, "a scheduled refresh", |m| {
        m.value(
            "tokengate_token_refreshes_total",
            &refresh("scheduled", "success"),
        )
        .is_some_and(|v| v >= 1.0)
    })
    .await;
    assert!(m.get("tokengate_token_expiry_timestamp_seconds", &OMS) > first_expiry);
    assert_eq!(m.get("tokengate_token_valid", &OMS), 1.0);
    let (_, fetches) = m.histogram("tokengate_token_fetch_duration_seconds", &OMS);
    assert!(fetches >= 2.0, "{fetches}");
    assert_eq!(
        m.get(
            "tokengate_token_refreshes_total",
            &refresh("scheduled", "failure")
        ),
        0.0
    );

    // From now on tokens live an hour, so no scheduled refresh races what follows and the
    // token in use is young when it is revoked.
    hub.set_token_lifetime(Duration::from_secs(3600));
    scrape_until(&tg, "an hour-long token in use", |m| {
        m.value("tokengate_token_expiry_timestamp_seconds", &OMS)
            .is_some_and(|e| e > unix_now() + 1800.0)
    })
    .await;

    // The token is revoked early: the 401 forces a refresh and the request is replayed.
    hub.revoke_all();
    let res = support::client()
        .get(tg.url("/v2/orders"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let m = scrape(&tg).await;
    assert_eq!(
        m.get(
            "tokengate_token_refreshes_total",
            &refresh("unauthorized", "success")
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "tokengate_unauthorized_replays_total",
            &[("integration", "oms"), ("result", "success")]
        ),
        1.0
    );
    assert_eq!(m.get("tokengate_early_revocations_total", &OMS), 1.0);
    tg.stop().await;
}

#[tokio::test]
async fn an_unreachable_upstream_counts_as_an_upstream_error() {
    let hub = support::hub().await;
    let upstream = format!("http://{}", support::closed_port().await);
    let tg = support::start_with(&hub.token_url(), &upstream, "").await;
    let res = support::client()
        .get(tg.url("/v2/orders"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502);
    assert_eq!(res.headers()["x-tokengate-error"], "upstream_unreachable");
    let m = scrape_until(&tg, "in-flight back to 0", |m| {
        m.value("tokengate_in_flight_requests", &OMS) == Some(0.0)
    })
    .await;
    for kind in UPSTREAM_KINDS {
        let l = [("integration", "oms"), ("kind", kind)];
        let want = if kind == "connect" { 1.0 } else { 0.0 };
        assert_eq!(m.get("tokengate_upstream_errors_total", &l), want, "{kind}");
    }
    assert_eq!(
        m.get(
            "tokengate_requests_total",
            &[("integration", "oms"), ("method", "GET"), ("code", "502")]
        ),
        1.0
    );
    assert!(m
        .series("tokengate_upstream_ratelimit_remaining")
        .is_empty());
    tg.stop().await;
}

#[tokio::test]
async fn readiness_waits_for_the_first_token_and_reports_why() {
    // The endpoint refuses tokengate's secret until the test "fixes the credentials".
    let hub = support::hub_with(HubOptions {
        client_secret: Some("the-right-secret".into()),
        ..HubOptions::default()
    })
    .await;
    let tg = support::start_toml(&support::toml_for(&hub, "")).await;

    let (status, body) = get_json(&tg.admin_url("/readyz")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ready"], false);
    assert_eq!(body["draining"], false);
    assert_eq!(body["not_ready"][0]["integration"], "oms", "{body}");
    assert!(body["not_ready"][0]["reason"].is_string(), "{body}");
    // Known series are there before any token, valid at 0.
    let m = scrape(&tg).await;
    assert_eq!(m.get("tokengate_token_valid", &OMS), 0.0);
    assert_eq!(
        m.get(
            "tokengate_token_refreshes_total",
            &refresh("startup", "success")
        ),
        0.0
    );
    for trigger in TRIGGERS {
        assert!(m
            .value(
                "tokengate_token_refreshes_total",
                &refresh(trigger, "failure")
            )
            .is_some());
    }

    // Once the first request failed, the reason is the endpoint's own error.
    let body = get_json_until(&tg.admin_url("/readyz"), "the failure", |status, b| {
        status == 503
            && b["not_ready"][0]["reason"]
                .as_str()
                .unwrap_or("")
                .contains("invalid_client")
    })
    .await;
    let reason = body["not_ready"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("Client authentication failed"),
        "error_description is reported: {reason}"
    );
    let (status, status_body) = get_json(&tg.admin_url("/status")).await;
    assert_eq!(status, 200);
    let oms = &status_body["integrations"][0];
    assert!(
        oms["last_error"]
            .as_str()
            .unwrap()
            .contains("invalid_client"),
        "{oms}"
    );
    assert!(oms["last_error_at"].is_string(), "{oms}");
    assert!(oms["consecutive_failures"].as_u64().unwrap() >= 1, "{oms}");
    assert!(oms["token"].is_null(), "{oms}");
    assert!(oms["seconds_since_refresh"].is_null(), "{oms}");
    let m = scrape(&tg).await;
    assert!(
        m.get(
            "tokengate_token_refreshes_total",
            &refresh("startup", "failure")
        ) >= 1.0
    );
    assert!(
        m.get(
            "tokengate_token_fetch_errors_total",
            &[("integration", "oms"), ("kind", "invalid_client")]
        ) >= 1.0
    );
    assert_eq!(m.get("tokengate_token_valid", &OMS), 0.0);
    let res = support::client()
        .get(tg.url("/v2/orders"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["x-tokengate-error"], "token_unavailable");
    assert!(res.headers().contains_key("retry-after"));

    // The credentials are fixed at the endpoint; the next retry (backoff ≤ a few seconds)
    // gets the first token and tokengate becomes ready.
    hub.set_credentials(None, Some("test-secret".into()));
    let body = get_json_until(&tg.admin_url("/readyz"), "ready", |status, _| status == 200).await;
    assert_eq!(body, json!({"ready": true}));
    let m = scrape(&tg).await;
    assert_eq!(m.get("tokengate_token_valid", &OMS), 1.0);
    // A retry keeps the trigger of what it retries.
    assert_eq!(
        m.get(
            "tokengate_token_refreshes_total",
            &refresh("startup", "success")
        ),
        1.0
    );
    let (_, status_body) = get_json(&tg.admin_url("/status")).await;
    assert!(status_body["integrations"][0]["last_error"].is_null());
    tg.stop().await;
}

#[tokio::test]
async fn status_reports_each_integration_and_no_admin_endpoint_shows_a_secret() {
    let hub = support::hub().await;
    let toml = format!(
        r#"
[server]
admin_listen = "{{admin}}"

[[integration]]
name = "oms"
listen = "{{listen0}}"
token_url = "{token_url}"
upstream = "{upstream}"
client_id = "canary-client-id-7f3a"
client_secret = "canary-client-secret-91bc"

[[integration]]
name = "wms"
listen = "{{listen1}}"
token_url = "{token_url}"
upstream = "{upstream}"
client_id = "canary-wms-id-2c4d"
client_secret = "canary-wms-secret-8e1f"
"#,
        token_url = hub.token_url(),
        upstream = hub.base_url(),
    );
    let before = Instant::now();
    let tg = support::start_toml(&toml).await;
    tg.ready().await;
    let res = support::client()
        .get(tg.url("/v2/orders?canary-query=1"))
        .header("authorization", "Bearer canary-client-bearer")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let (status, body) = get_json(&tg.admin_url("/status")).await;
    let elapsed = before.elapsed().as_secs() + 1;
    assert_eq!(status, 200);
    assert_eq!(body["version"], VERSION);
    assert_eq!(body["draining"], false);
    let list = body["integrations"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    let wms_addr = tg.running().integration_addr("wms").unwrap();
    for (entry, (name, listen, served)) in list
        .iter()
        .zip([("oms", tg.proxy, 1), ("wms", wms_addr, 0)])
    {
        assert_eq!(entry["integration"], name);
        assert_eq!(entry["listen"], listen.to_string());
        assert!(
            entry["upstream"]
                .as_str()
                .unwrap()
                .starts_with(&hub.base_url()),
            "{entry}"
        );
        let token = &entry["token"];
        assert_eq!(token["valid"], true, "{entry}");
        assert_eq!(token["lifetime_s"], 3600);
        let expires_in = token["expires_in_s"].as_u64().unwrap();
        assert!((3600 - elapsed..=3600).contains(&expires_in), "{entry}");
        let expires_at = humantime::parse_rfc3339(token["expires_at"].as_str().unwrap()).unwrap();
        assert!(expires_at > SystemTime::now());
        assert!(entry["seconds_since_refresh"].as_u64().unwrap() <= elapsed);
        assert!(entry["last_refresh"].is_string());
        assert!(entry["last_error"].is_null(), "{entry}");
        assert_eq!(entry["consecutive_failures"], 0);
        assert_eq!(entry["requests_served"], served, "{entry}");
    }

    // Secrets and tokens appear on no admin endpoint.
    let client = support::client();
    let mut shown = String::new();
    for path in ["/status", "/readyz", "/healthz", "/metrics", "/nope"] {
        let res = client.get(tg.admin_url(path)).send().await.unwrap();
        shown.push_str(&format!("{:?}", res.headers()));
        shown.push_str(&res.text().await.unwrap());
    }
    for canary in [
        "canary-client-id-7f3a",
        "canary-client-secret-91bc",
        "canary-wms-id-2c4d",
        "canary-wms-secret-8e1f",
        "canary-client-bearer",
        "canary-query",
        "Bearer",
    ] {
        assert!(!shown.contains(canary), "{canary} on an admin endpoint");
    }
    let tokens = hub.issued_tokens();
    assert_eq!(tokens.len(), 2);
    for token in tokens {
        assert!(!shown.contains(&token), "a token on an admin endpoint");
    }
    tg.stop().await;
}

#[tokio::test]
async fn admin_answers_only_its_endpoints() {
    let hub = support::hub().await;
    let tg = support::start(&hub, "").await;
    let client = support::client();
    let (status, body) = get_json(&tg.admin_url("/healthz")).await;
    assert_eq!((status, body), (200, json!({"status": "ok"})));
    let (status, body) = get_json(&tg.admin_url("/readyz")).await;
    assert_eq!((status, body), (200, json!({"ready": true})));
    for path in ["/", "/nope", "/metrics/", "/status/oms", "/v2/orders"] {
        let (status, body) = get_json(&tg.admin_url(path)).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(body["error"], "not_found", "{path}");
    }
    let res = client.post(tg.admin_url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), 405);
    assert_eq!(res.headers()["allow"], "GET, HEAD");
    let res = client.head(tg.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    // The admin port never forwards: the hub saw no API request.
    assert_eq!(hub.api_request_count(), 0);
    tg.stop().await;
}

/// Whether a new TCP connection to `addr` is refused.
async fn refused(addr: SocketAddr) -> bool {
    match tokio::net::TcpStream::connect(addr).await {
        Ok(_) => false,
        Err(e) => {
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
            true
        }
    }
}

async fn wait_refused(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !refused(addr).await {
        assert!(
            Instant::now() < deadline,
            "{what} still accepts connections"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Streamed from the stand-in much larger than every socket buffer on the way, so it cannot
/// finish until the test reads it: a response in flight for as long as the test wants.
const STREAM_BYTES: u64 = 64 * 1024 * 1024;

#[tokio::test]
async fn shutdown_drains_slow_and_streaming_requests_within_the_grace() {
    let hub = support::hub().await;
    let mut tg = support::start(&hub, "").await;
    let client = support::client();

    let slow = tokio::spawn({
        let req = client.get(tg.url("/slow/2000"));
        async move {
            let res = req.send().await.unwrap();
            (res.status().as_u16(), res.text().await.unwrap())
        }
    });
    let mut stream = client
        .get(tg.url(&format!("/bytes/{STREAM_BYTES}")))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut received = stream.chunk().await.unwrap().unwrap().len() as u64;
    // Both requests reached the upstream: they are in flight.
    tokio::time::timeout(Duration::from_secs(10), hub.wait_api_requests(2))
        .await
        .unwrap();

    let running = tg.running.take().unwrap();
    let shutdown = tokio::spawn(running.shutdown(Duration::from_secs(60)));

    // Not ready at once: the admin port (which closes only after the drain) says draining.
    let body = get_json_until(&tg.admin_url("/readyz"), "draining", |status, _| {
        status == 503
    })
    .await;
    assert_eq!(body["draining"], true, "{body}");
    assert_eq!(body["ready"], false);
    // No new connections on the integration port.
    wait_refused(tg.proxy, "the integration port").await;

    // The slow request completes while the drain waits for the stream.
    let (status, text) = tokio::time::timeout(Duration::from_secs(30), slow)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 200, "{text}");
    assert!(
        !shutdown.is_finished(),
        "the drain ended with a body in flight"
    );
    let (status, body) = get_json(&tg.admin_url("/status")).await;
    assert_eq!(status, 200);
    assert_eq!(body["draining"], true);

    // The streaming body completes too, whole.
    while let Some(chunk) = stream.chunk().await.unwrap() {
        received += chunk.len() as u64;
    }
    assert_eq!(received, STREAM_BYTES);
    let drained = tokio::time::timeout(Duration::from_secs(30), shutdown)
        .await
        .expect("shutdown returns once the last request finished")
        .unwrap();
    assert!(drained, "drained within the grace");
    // Everything stopped, the admin listener included.
    wait_refused(tg.admin, "the admin port").await;
}

#[tokio::test]
async fn shutdown_closes_what_is_left_when_the_grace_expires() {
    let hub = support::hub().await;
    let mut tg = support::start(&hub, "").await;
    let client = support::client();
    let slow = tokio::spawn(client.get(tg.url("/slow/600000")).send());
    let mut stream = client
        .get(tg.url(&format!("/bytes/{STREAM_BYTES}")))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    tokio::time::timeout(Duration::from_secs(10), hub.wait_api_requests(2))
        .await
        .unwrap();

    let running = tg.running.take().unwrap();
    let drained = tokio::time::timeout(
        Duration::from_secs(30),
        running.shutdown(Duration::from_millis(300)),
    )
    .await
    .expect("shutdown returns once the grace expired");
    assert!(!drained, "the drain cannot have finished");

    // What was still in flight is closed, not left running.
    let slow = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("the slow request ends")
        .unwrap();
    assert!(slow.is_err(), "{slow:?}");
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.chunk().await {
                Ok(Some(_)) => continue,
                other => return other.map(|_| ()),
            }
        }
    })
    .await
    .expect("the stream ends");
    assert!(rest.is_err(), "the stream was cut short, not completed");
    wait_refused(tg.proxy, "the integration port").await;
    wait_refused(tg.admin, "the admin port").await;
}

// ---- the built binary: log lines ----

/// The binary with JSON logs, one integration `oms` on a hub, and its scratch directory.
struct Proc {
    p: process::Proc,
    admin: u16,
    listen: u16,
    config: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Proc {
    /// Runs tokengate with JSON logs, one integration `oms` on `hub`, and `TOKENGATE_LOG`.
    fn spawn(hub: &Hub, log_filter: &str) -> Proc {
        let dir = tempfile::tempdir().unwrap();
        let (admin, listen) = (free_port(), free_port());
        let config = dir.path().join("tokengate.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[server]
admin_listen = "127.0.0.1:{admin}"
log_format = "json"
shutdown_grace = "5s"

[[integration]]
name = "oms"
listen = "127.0.0.1:{listen}"
token_url = "{}"
upstream = "{}"
client_id = "log-client"
client_secret = {{ file = "{}" }}
"#,
                hub.token_url(),
                hub.base_url(),
                dir.path().join("secret").display()
            ),
        )
        .unwrap();
        std::fs::write(dir.path().join("secret"), "canary-log-secret\n").unwrap();
        let mut command = tokio::process::Command::new(process::BIN);
        command
            .arg("--config")
            .arg(&config)
            .env("TOKENGATE_LOG", log_filter);
        Proc {
            p: process::Proc::start(command),
            admin,
            listen,
            config,
            _dir: dir,
        }
    }

    fn signal(&self, signal: Signal) {
        self.p.signal(signal);
    }

    /// Waits (bounded) for a log event that `pred` accepts; every line must be JSON.
    async fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let line = self
            .p
            .next_matching(what, |line| {
                let event: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
                pred(&event)
            })
            .await;
        serde_json::from_str(&line).unwrap()
    }

    /// SIGTERM, then every remaining line until exit; returns the exit code.
    async fn terminate(&mut self) -> i32 {
        self.signal(Signal::SIGTERM);
        self.p.exit_code().await
    }

    fn events(&self) -> Vec<Value> {
        self.p
            .seen
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

fn message(event: &Value) -> &str {
    event["message"].as_str().unwrap_or("")
}

fn is_access(event: &Value) -> bool {
    event["target"] == "tokengate::access"
}

#[tokio::test]
async fn json_logs_carry_access_fields_and_each_refresh_failure_once() {
    let hub = support::hub().await;
    // The first token request is refused, with the endpoint's own words; the retry succeeds.
    hub.push_token_reply(TokenReply::json(
        401,
        &json!({"error": "invalid_client", "error_description": "the key was regenerated (ops test)"}),
    ));
    let mut p = Proc::spawn(&hub, "info");
    let failure = p
        .wait_for("the refresh failure", |e| {
            message(e).contains("token request failed")
        })
        .await;
    assert_eq!(failure["level"], "WARN");
    assert_eq!(failure["integration"], "oms");
    assert_eq!(failure["kind"], "invalid_client");
    assert_eq!(failure["trigger"], "startup");
    let error = failure["error"].as_str().unwrap();
    assert!(
        error.contains("invalid_client") && error.contains("the key was regenerated (ops test)"),
        "the endpoint's error and error_description: {error}"
    );
    let obtained = p
        .wait_for("the first token", |e| message(e) == "token obtained")
        .await;
    assert_eq!(obtained["integration"], "oms");
    assert_eq!(obtained["trigger"], "startup");

    let client = support::client();
    let res = client
        .get(format!(
            "http://127.0.0.1:{}/v2/orders?canary-query=secret",
            p.listen
        ))
        .header("x-request-id", "ops-req-1")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let access = p
        .wait_for("the access line", |e| {
            is_access(e) && e["request_id"] == "ops-req-1"
        })
        .await;
    let fields: BTreeSet<&str> = access
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        fields,
        BTreeSet::from([
            "timestamp",
            "level",
            "target",
            "integration",
            "method",
            "path",
            "status",
            "duration_ms",
            "request_id",
        ]),
        "{access}"
    );
    assert_eq!(access["level"], "INFO");
    assert_eq!(access["integration"], "oms");
    assert_eq!(access["method"], "GET");
    assert_eq!(access["path"], "/v2/orders", "without the query string");
    assert_eq!(access["status"], 200);
    assert!(access["duration_ms"].as_f64().unwrap() >= 0.0, "{access}");

    // A response tokengate made itself carries its error code.
    let res = support::raw(
        format!("127.0.0.1:{}", p.listen).parse().unwrap(),
        b"CONNECT api.bringg.com:443 HTTP/1.1\r\nHost: api.bringg.com:443\r\n\r\n",
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 405"), "{res}");
    let refused = p
        .wait_for("the CONNECT access line", |e| {
            is_access(e) && e["method"] == "CONNECT"
        })
        .await;
    assert_eq!(refused["status"], 405);
    assert_eq!(refused["error"], "connect_not_supported");
    assert!(
        refused["request_id"].as_str().unwrap().len() == 32,
        "{refused}"
    );

    assert_eq!(p.terminate().await, 0, "exit 0 after SIGTERM");
    let events = p.events();
    let count = |m: &str| events.iter().filter(|e| message(e) == m).count();
    assert_eq!(count("token obtained"), 1, "one refresh, one line");
    assert_eq!(
        events
            .iter()
            .filter(|e| message(e).contains("token request failed"))
            .count(),
        1,
        "one failure, one line"
    );
    let shutting_down: Vec<&Value> = events
        .iter()
        .filter(|e| message(e).starts_with("shutting down"))
        .collect();
    assert_eq!(shutting_down.len(), 1);
    assert_eq!(shutting_down[0]["signal"], "SIGTERM");
    assert_eq!(count("drained: every in-flight request finished"), 1);
    assert_eq!(count("stopped"), 1);
    assert_eq!(events.iter().filter(|e| is_access(e)).count(), 2);
    let all = p.p.seen.join("\n");
    assert!(
        !all.contains("canary-log-secret"),
        "a secret reached the log"
    );
    assert!(
        !all.contains("canary-query"),
        "a query string reached the log"
    );
    for token in hub.issued_tokens() {
        assert!(!all.contains(&token), "a token reached the log");
    }
}

/// Issue 18: a client set up with `HTTPS_PROXY` tunnels with CONNECT, and many client
/// libraries hide the 405; the log names the cause once a minute per client address, with the
/// base URL to use instead, and no secret.
#[tokio::test]
async fn a_connect_is_explained_in_the_log_once_a_minute_per_client() {
    let hub = support::hub().await;
    let mut p = Proc::spawn(&hub, "info");
    p.wait_for("the first token", |e| message(e) == "token obtained")
        .await;
    let addr: SocketAddr = format!("127.0.0.1:{}", p.listen).parse().unwrap();
    let connect = b"CONNECT api.bringg.com:443 HTTP/1.1\r\nHost: api.bringg.com:443\r\n\r\n";
    for _ in 0..3 {
        let res = support::raw(addr, connect).await;
        assert!(res.starts_with("HTTP/1.1 405"), "{res}");
        assert!(res.contains("connect_not_supported"), "{res}");
    }
    let warning = p
        .wait_for("the CONNECT warning", |e| {
            message(e).contains("a client sent CONNECT")
        })
        .await;
    assert_eq!(warning["level"], "WARN");
    assert_eq!(warning["integration"], "oms");
    assert_eq!(warning["client"], "127.0.0.1");
    let text = message(&warning);
    assert!(text.contains("HTTPS_PROXY"), "{text}");
    assert!(
        text.contains(&format!("http://127.0.0.1:{}", p.listen)),
        "{text}"
    );
    // The access lines come after the warning for each request; waiting for the third means
    // every CONNECT was recorded.
    let mut access = 0;
    while access < 3 {
        p.wait_for("a CONNECT access line", |e| {
            is_access(e) && e["method"] == "CONNECT"
        })
        .await;
        access += 1;
    }
    assert_eq!(p.terminate().await, 0);
    let warnings = p
        .events()
        .iter()
        .filter(|e| message(e).contains("a client sent CONNECT"))
        .count();
    assert_eq!(warnings, 1, "three CONNECTs within a minute, one warning");
    let all = p.p.seen.join("\n");
    assert!(
        !all.contains("canary-log-secret"),
        "a secret reached the log"
    );
}

#[tokio::test]
async fn tokengate_log_selects_levels_and_targets() {
    let hub = support::hub().await;
    // Warnings, plus the access lines only.
    let mut p = Proc::spawn(&hub, "warn,tokengate::access=info");
    let client = support::client();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = client
            .get(format!("http://127.0.0.1:{}/readyz", p.admin))
            .send()
            .await;
        if ready.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let res = client
        .get(format!("http://127.0.0.1:{}/v2/orders", p.listen))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    p.wait_for("the access line", is_access).await;
    assert_eq!(p.terminate().await, 0);
    for event in p.events() {
        assert!(
            is_access(&event) || event["level"] == "WARN" || event["level"] == "ERROR",
            "filtered out by TOKENGATE_LOG: {event}"
        );
    }
}

#[tokio::test]
async fn a_reloaded_shutdown_grace_applies_and_an_expired_grace_still_exits_zero() {
    let hub = support::hub().await;
    let mut p = Proc::spawn(&hub, "info");
    p.wait_for("the first token", |e| message(e) == "token obtained")
        .await;
    let text = std::fs::read_to_string(&p.config).unwrap();
    std::fs::write(
        &p.config,
        text.replace(r#"shutdown_grace = "5s""#, r#"shutdown_grace = "0s""#),
    )
    .unwrap();
    p.signal(Signal::SIGHUP);
    p.wait_for("the reload", |e| {
        message(e) == "SIGHUP: configuration reloaded"
    })
    .await;

    let slow = tokio::spawn(
        support::client()
            .get(format!("http://127.0.0.1:{}/slow/600000", p.listen))
            .send(),
    );
    tokio::time::timeout(Duration::from_secs(10), hub.wait_api_requests(1))
        .await
        .unwrap();
    assert_eq!(p.terminate().await, 0, "exit 0 even when the grace expired");
    let events = p.events();
    let expired: Vec<&Value> = events
        .iter()
        .filter(|e| message(e).starts_with("shutdown_grace expired"))
        .collect();
    assert_eq!(expired.len(), 1, "{events:?}");
    assert_eq!(expired[0]["level"], "WARN");
    assert_eq!(expired[0]["grace"], "0s", "the reloaded grace");
    let slow = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .unwrap()
        .unwrap();
    assert!(slow.is_err(), "the slow request was cut off: {slow:?}");
}
