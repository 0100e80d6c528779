//! A small load generator for `bench/soak.sh`: concurrent GET and POST calls through a
//! running tokengate to the stand-in hub, for a set time, checking every answer.
//!
//! ```text
//! cargo run --release --example load -- --url http://127.0.0.1:PORT --duration-secs 120 \
//!     [--concurrency 16] [--large-every 50] [--large-bytes 65536]
//! ```
//! Each worker keeps one pooled connection busy: mostly `GET /v2/orders?...` and small
//! `POST /echo-body` calls (whose bodies fit in tokengate's `max_replay_body`, so a 401 after
//! a revocation is replayed and must never reach the client), and every `--large-every`-th
//! call a `POST /echo-body` of `--large-bytes` (set `max_replay_body` below that: such a call
//! cannot be replayed, so a 401 may reach the client and is reported apart). A call passes
//! with 200 and, for `/echo-body`, the body sent.
//!
//! Prints `key value` lines on stdout (`requests`, `replayable_ok`, `replayable_failed`,
//! `non_replayable_ok`, `non_replayable_failed`, then `failure <class> <reason> <count>`)
//! for the script to read; exits 0 whatever the failures (the script judges them).
#![allow(clippy::print_stdout)] // the report on stdout is this program's interface

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

#[derive(Parser, Debug)]
struct Args {
    /// tokengate's integration listener, e.g. http://127.0.0.1:8081.
    #[arg(long)]
    url: String,
    #[arg(long, default_value_t = 120)]
    duration_secs: u64,
    /// Concurrent workers (one connection each, reused).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Every this many calls of a worker is a large (non-replayable) POST; 0: never.
    #[arg(long, default_value_t = 50)]
    large_every: u64,
    #[arg(long, default_value_t = 64 * 1024)]
    large_bytes: usize,
    /// A call that takes longer than this is a failure.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
}

#[derive(Default)]
struct Tally {
    replayable_ok: AtomicU64,
    replayable_failed: AtomicU64,
    non_replayable_ok: AtomicU64,
    non_replayable_failed: AtomicU64,
    /// (class, reason) → count.
    failures: Mutex<BTreeMap<(&'static str, String), u64>>,
}

impl Tally {
    fn record(&self, replayable: bool, outcome: Result<(), String>) {
        let (ok, failed, class) = if replayable {
            (&self.replayable_ok, &self.replayable_failed, "replayable")
        } else {
            (
                &self.non_replayable_ok,
                &self.non_replayable_failed,
                "non_replayable",
            )
        };
        match outcome {
            Ok(()) => {
                ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(reason) => {
                failed.fetch_add(1, Ordering::Relaxed);
                // A poisoned lock only means another worker panicked; keep counting.
                let mut failures = self
                    .failures
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                *failures.entry((class, reason)).or_default() += 1;
            }
        }
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// One call: 200 expected, and `echo` back when given.
async fn call(
    client: &HttpClient,
    request: http::Request<Full<Bytes>>,
    echo: Option<&Bytes>,
    timeout: Duration,
) -> Result<(), String> {
    let exchange = async {
        let res = client
            .request(request)
            .await
            .map_err(|e| format!("error:{e}"))?;
        let status = res.status();
        let tokengate_error = res
            .headers()
            .get("x-tokengate-error")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body-error:{e}"))?
            .to_bytes();
        if status != http::StatusCode::OK {
            return Err(match tokengate_error {
                Some(code) => format!("{}:{code}", status.as_u16()),
                None => status.as_u16().to_string(),
            });
        }
        match echo {
            Some(sent) if body != *sent => Err("echo-mismatch".to_owned()),
            _ => Ok(()),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err("timeout".to_owned()))
}

async fn worker(id: usize, args: Arc<Args>, client: HttpClient, tally: Arc<Tally>, until: Instant) {
    let timeout = Duration::from_secs(args.timeout_secs);
    let large = Bytes::from(
        (0..args.large_bytes)
            .map(|i| b'a' + (i % 26) as u8)
            .collect::<Vec<u8>>(),
    );
    let mut n: u64 = 0;
    while Instant::now() < until {
        n += 1;
        let base = args.url.trim_end_matches('/');
        let (request, echo, replayable) = if args.large_every > 0 && n % args.large_every == 0 {
            let request = http::Request::post(format!("{base}/echo-body"))
                .header("content-type", "application/octet-stream")
                .body(Full::new(large.clone()));
            (request, Some(large.clone()), false)
        } else if n % 3 == 0 {
            let body = Bytes::from(format!(
                "{{\"worker\":{id},\"n\":{n},\"padding\":\"{}\"}}",
                "x".repeat(200)
            ));
            let request = http::Request::post(format!("{base}/echo-body"))
                .header("content-type", "application/json")
                .body(Full::new(body.clone()));
            (request, Some(body), true)
        } else {
            let request = http::Request::get(format!("{base}/v2/orders?worker={id}&n={n}"))
                .body(Full::new(Bytes::new()));
            (request, None, true)
        };
        let outcome = match request {
            Ok(request) => call(&client, request, echo.as_ref(), timeout).await,
            Err(e) => Err(format!("bad-request:{e}")),
        };
        tally.record(replayable, outcome);
    }
}

#[tokio::main]
async fn main() {
    let args = Arc::new(Args::parse());
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let tally = Arc::new(Tally::default());
    let until = Instant::now() + Duration::from_secs(args.duration_secs);
    let workers: Vec<_> = (0..args.concurrency)
        .map(|id| {
            tokio::spawn(worker(
                id,
                args.clone(),
                client.clone(),
                tally.clone(),
                until,
            ))
        })
        .collect();
    for w in workers {
        if let Err(e) = w.await {
            println!("failure worker panic {}", e.to_string().replace(' ', "_"));
        }
    }
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let replayable = get(&tally.replayable_ok) + get(&tally.replayable_failed);
    let non_replayable = get(&tally.non_replayable_ok) + get(&tally.non_replayable_failed);
    println!("requests {}", replayable + non_replayable);
    println!("replayable_ok {}", get(&tally.replayable_ok));
    println!("replayable_failed {}", get(&tally.replayable_failed));
    println!("non_replayable_ok {}", get(&tally.non_replayable_ok));
    println!(
        "non_replayable_failed {}",
        get(&tally.non_replayable_failed)
    );
    let failures = tally
        .failures
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for ((class, reason), count) in failures.iter() {
        // One line per reason, spaces made safe for `read`.
        println!("failure {class} {} {count}", reason.replace(' ', "_"));
    }
}
