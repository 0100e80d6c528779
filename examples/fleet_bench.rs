//! Fleet mode's benchmark (`bench/fleet.sh`, written up in `bench/FLEET.md`): how fleet mode
//! behaves as the fleet grows, and what it costs on the request path.
//!
//! ```text
//! cargo run --release --example fleet_bench -- [--redis redis://127.0.0.1:6379] \
//!     [--sizes 1:1,10:2,100:4,1000:4] [--periods 4] [--lifetime-secs 6] \
//!     [--start-spread-ms 5000] [--ab-rounds 3] [--ab-secs 5] [--ab-conns 64] \
//!     [--resp3] [--skip-ab] [--skip-fleet]
//! ```
//!
//! The parent starts `redis-server` itself (a free loopback port, nothing persisted) unless
//! `--redis` names one (which it then `FLUSHALL`s), and hosts the stand-in Delivery Hub
//! in-process, revoking the previous token on each issue, with tokens of `--lifetime-secs`
//! (refresh at 80 %: every ~4.8 s for 6 s tokens). For each `members:processes` of `--sizes`
//! it spawns that many child processes of itself (`--role members --count K`), each hosting
//! K full tokengate instances in-process (own listeners, own Redis connections, `[fleet]`
//! on; their starts spread over `--start-spread-ms`), and measures over `--periods` refresh
//! periods, starting at a publication:
//!
//! - **token fetches per refresh period**: the stand-in's token request count over the
//!   window (`periods` × nominal period + half a period), divided by `periods`. Target: 1.
//! - **Redis commands per second**: `INFO stats` `total_commands_processed` over the window
//!   (everything: claims, publishes, reads by adopters, the listeners' pings).
//! - **notification-to-adoption latency**: each child subscribes to `tokengate:published`
//!   itself; on each message it polls (every 1 ms, only the members still behind) until each
//!   member it hosts holds the announced generation, and prints the times. The parent takes
//!   p50/p99 over every member and every publication inside the window. Target: p99 < 100 ms
//!   at 1,000 members. Per publication, stderr also shows how many connections were
//!   subscribed to the channel just after it (`PUBSUB NUMSUB`: members + children + 1).
//!
//! `--resp3` gives the members `?protocol=resp3` on their `redis_url` (see `bench/FLEET.md`
//! for why that matters to the notification listener).
//!
//! Then the request path, fleet on vs off: two child processes with one instance each (one
//! with `[fleet]`, one without, both on the same stand-in, which stops revoking for this part
//! since both share the client), 64 keep-alive connections from the parent for `--ab-secs`
//! each, interleaved, `--ab-rounds` rounds; reported as requests/s and the on/off ratio.
//!
//! Progress goes to stderr; the results, as Markdown tables, to stdout. `FLEET_BENCH_LOG=warn`
//! (a tracing filter) shows the instances' own log on stderr.
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokengate::config::{Config, ProxyEnv};
use tokengate::standin::{Hub, HubOptions};
use tokengate::{Listeners, Running};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

const CHANNEL: &str = "tokengate:published";
/// Refresh at this fraction of the lifetime (tokengate's default `refresh_at`).
const REFRESH_AT: f64 = 0.8;

#[derive(Parser, Debug)]
struct Args {
    /// `parent` (the benchmark) or `members` (a child hosting `--count` instances).
    #[arg(long, default_value = "parent")]
    role: String,
    /// Redis to use; by default the parent starts its own `redis-server`.
    #[arg(long)]
    redis: Option<String>,
    /// `members:processes` per fleet size, comma-separated.
    #[arg(long, default_value = "1:1,10:2,100:4,1000:4")]
    sizes: String,
    /// Refresh periods measured per size.
    #[arg(long, default_value_t = 4)]
    periods: u32,
    #[arg(long, default_value_t = 6)]
    lifetime_secs: u64,
    #[arg(long, default_value_t = 3)]
    ab_rounds: u32,
    #[arg(long, default_value_t = 5)]
    ab_secs: u64,
    #[arg(long, default_value_t = 64)]
    ab_conns: usize,
    #[arg(long)]
    skip_ab: bool,
    #[arg(long)]
    skip_fleet: bool,
    // Child options.
    #[arg(long, default_value_t = 1)]
    count: usize,
    #[arg(long)]
    token_url: Option<String>,
    #[arg(long)]
    upstream: Option<String>,
    /// Child: run the instances without `[fleet]`.
    #[arg(long)]
    no_fleet: bool,
    /// Starts of a child's instances are spread evenly over this many milliseconds, so the
    /// members' timers (refresh jitter, the listeners' 5-s pings) do not all share one phase
    /// as they would if a thousand sidecars had started in the same 300 ms.
    #[arg(long, default_value_t = 5000)]
    start_spread_ms: u64,
    /// The members speak RESP3 to Redis (`?protocol=resp3` on their `redis_url`).
    #[arg(long)]
    resp3: bool,
}

/// `url` with `?protocol=resp3` (or `&protocol=resp3`) added.
fn with_resp3(url: &str) -> String {
    if url.contains('?') {
        format!("{url}&protocol=resp3")
    } else if url
        .split_once("://")
        .is_some_and(|(_, rest)| rest.contains('/'))
    {
        format!("{url}?protocol=resp3")
    } else {
        format!("{url}/?protocol=resp3")
    }
}

fn main() {
    let args = Args::parse();
    // tokengate's own log, to stderr: FLEET_BENCH_LOG=warn (or any tracing filter); off by
    // default, since a thousand instances would drown the results.
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLEET_BENCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    match args.role.as_str() {
        "members" => rt.block_on(members(args)),
        "parent" => rt.block_on(parent(args)),
        other => panic!("unknown --role {other}"),
    }
}

// ---------------------------------------------------------------------------------------
// Child: K tokengate instances and the adoption probe.

fn instance_toml(args: &Args, admin: SocketAddr, listen: SocketAddr) -> String {
    let mut toml = format!(
        r#"
[server]
admin_listen = "{admin}"
shutdown_grace = "1s"

[[integration]]
name = "oms"
listen = "{listen}"
token_url = "{}"
upstream = "{}"
client_id = "bench-client"
client_secret = "bench-secret"
"#,
        args.token_url.as_deref().unwrap(),
        args.upstream.as_deref().unwrap(),
    );
    if !args.no_fleet {
        toml.push_str(&format!(
            "\n[fleet]\nredis_url = \"{}\"\n",
            args.redis.as_deref().unwrap()
        ));
    }
    toml
}

async fn start_instance(args: &Args) -> (Running, SocketAddr) {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let admin = tokengate::listen(any).unwrap();
    let listen = tokengate::listen(any).unwrap();
    let addr = listen.local_addr().unwrap();
    let toml = instance_toml(args, admin.local_addr().unwrap(), addr);
    // An empty proxy environment: the stand-in is on loopback, whatever HTTPS_PROXY says.
    let config =
        Config::from_str_with_env(&toml, Path::new("fleet_bench.toml"), &ProxyEnv::default())
            .unwrap();
    let running = tokengate::start(
        config,
        Listeners {
            admin,
            integrations: vec![listen],
        },
    )
    .await
    .unwrap();
    (running, addr)
}

fn held_generation(running: &Running) -> u64 {
    running.held_token("oms").map_or(0, |t| t.generation)
}

/// Prints `ready` when every instance holds a token, `addr <listen>` per instance, then
/// `lat <generation> <µs>,<µs>,…` (and `miss <generation> <n>` for members that did not
/// adopt within 4 s) per notification, until stdin closes; then stops the instances.
async fn members(args: Args) {
    // Subscribed before any instance starts, so no publication is missed.
    let mut probe = None;
    if !args.no_fleet {
        let client = redis::Client::open(args.redis.as_deref().unwrap()).unwrap();
        let mut pubsub = client.get_async_pubsub().await.unwrap();
        pubsub.subscribe(CHANNEL).await.unwrap();
        probe = Some(pubsub);
    }
    let spread = Duration::from_millis(args.start_spread_ms);
    let started = futures_util::future::join_all((0..args.count).map(|i| {
        let args = &args;
        async move {
            tokio::time::sleep(spread.mul_f64(i as f64 / args.count as f64)).await;
            start_instance(args).await
        }
    }))
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !started.iter().all(|(r, _)| r.is_ready()) {
        assert!(Instant::now() < deadline, "instances not ready within 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (_, addr) in &started {
        println!("addr {addr}");
    }
    println!("ready");
    let instances: Arc<Vec<Running>> = Arc::new(started.into_iter().map(|(r, _)| r).collect());

    // Stdin closing is the signal to stop (tokio's stdin is not among this crate's features).
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        let _ = stop_tx.send(());
    });

    let probing = {
        let instances = instances.clone();
        async move {
            let Some(mut pubsub) = probe else {
                return std::future::pending().await;
            };
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                let at = Instant::now();
                let payload: String = msg.get_payload().unwrap_or_default();
                let Some(generation) = payload
                    .rsplit_once(' ')
                    .and_then(|(_, g)| g.parse::<u64>().ok())
                else {
                    continue;
                };
                let mut pending: Vec<usize> = (0..instances.len()).collect();
                let mut micros = Vec::with_capacity(pending.len());
                loop {
                    pending.retain(|&i| {
                        if held_generation(&instances[i]) >= generation {
                            micros.push(at.elapsed().as_micros().to_string());
                            false
                        } else {
                            true
                        }
                    });
                    if pending.is_empty() || at.elapsed() > Duration::from_secs(4) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                println!("lat {generation} {}", micros.join(","));
                if !pending.is_empty() {
                    println!("miss {generation} {}", pending.len());
                }
            }
        }
    };
    tokio::select! {
        _ = probing => {}
        _ = stop_rx => {}
    }
    let instances = Arc::try_unwrap(instances).unwrap_or_else(|_| panic!("probe still running"));
    futures_util::future::join_all(
        instances
            .into_iter()
            .map(|r| r.shutdown(Duration::from_secs(1))),
    )
    .await;
    println!("done");
}

// ---------------------------------------------------------------------------------------
// Parent.

/// A `redis-server` this program started, killed on drop.
struct OwnRedis {
    child: std::process::Child,
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_redis() -> (OwnRedis, String) {
    let port = free_port();
    // Owned (killed and waited for on drop) before anything can fail.
    let own = OwnRedis {
        child: std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--maxclients", "10000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found (bench/fleet.sh installs Debian's)"),
    };
    let url = format!("redis://127.0.0.1:{port}");
    let client = redis::Client::open(url.as_str()).unwrap();
    for _ in 0..200 {
        if let Ok(mut c) = client.get_multiplexed_async_connection().await {
            if redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .is_ok()
            {
                return (own, url);
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("redis-server did not answer on {url}");
}

/// `total_commands_processed`, and the calls per command (`INFO commandstats`).
async fn commands_processed(
    conn: &mut redis::aio::MultiplexedConnection,
) -> (u64, BTreeMap<String, u64>) {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(conn)
        .await
        .unwrap();
    let total = info
        .lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    // cmdstat_hmget:calls=12,usec=…
    let per_command = stats
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect();
    (total, per_command)
}

/// Calls per command between two `INFO commandstats`, most called first.
fn command_mix(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> String {
    let mut mix: Vec<(u64, &str)> = after
        .iter()
        .map(|(name, n)| (n - before.get(name).copied().unwrap_or(0), name.as_str()))
        .filter(|&(n, name)| n > 0 && name != "info")
        .collect();
    mix.sort_unstable_by(|a, b| b.cmp(a));
    mix.iter()
        .map(|(n, name)| format!("{name} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A child process and every line it printed.
struct Members {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: tokio::task::JoinHandle<()>,
}

fn spawn_members(redis: &str, hub: &Hub, count: usize, fleet: bool, spread_ms: u64) -> Members {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args(["--role", "members", "--count", &count.to_string()])
        .args(["--redis", redis])
        .args(["--token-url", &hub.token_url()])
        .args(["--upstream", &hub.base_url()])
        .args(["--start-spread-ms", &spread_ms.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if !fleet {
        cmd.arg("--no-fleet");
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    let reader = tokio::spawn(async move {
        let mut out = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = out.next_line().await {
            sink.lock().unwrap().push(line);
        }
    });
    Members {
        child,
        lines,
        reader,
    }
}

impl Members {
    fn has(&self, line: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l == line)
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.strip_prefix("addr ")?.parse().ok())
            .collect()
    }

    /// Closes stdin (the stop signal) and waits for the child to exit and its output to end.
    async fn stop(mut self) -> Vec<String> {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.shutdown().await;
        }
        drop(self.child.stdin.take());
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            eprintln!("a child did not stop within 30 s; killing it");
            let _ = self.child.kill().await;
        }
        let _ = self.reader.await;
        let lines = self.lines.lock().unwrap();
        lines.clone()
    }
}

async fn wait_ready(children: &[Members], limit: Duration) {
    let deadline = Instant::now() + limit;
    while !children.iter().all(|c| c.has("ready")) {
        assert!(
            Instant::now() < deadline,
            "members not ready within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn ms(micros: Option<u64>) -> String {
    micros.map_or("–".into(), |us| format!("{:.1} ms", us as f64 / 1000.0))
}

struct SizeResult {
    members: usize,
    processes: usize,
    periods: u32,
    fetches: usize,
    publications: usize,
    mean_interval: Option<f64>,
    commands_per_sec: f64,
    /// Calls per command over the window (INFO itself left out).
    command_mix: String,
    samples: usize,
    p50: Option<u64>,
    p90: Option<u64>,
    p99: Option<u64>,
    over_100ms: usize,
    max: Option<u64>,
    missed: u64,
    startup_fetches: usize,
    startup_secs: f64,
}

/// Publications seen on the channel: (when, generation, connections subscribed to the
/// channel right after, by `PUBSUB NUMSUB`).
type Published = Arc<Mutex<Vec<(Instant, u64, u64)>>>;

async fn watch_publications(redis: &str) -> Published {
    let client = redis::Client::open(redis).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(CHANNEL).await.unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let seen: Published = Arc::default();
    let sink = seen.clone();
    tokio::spawn(async move {
        let mut messages = pubsub.into_on_message();
        while let Some(msg) = messages.next().await {
            let payload: String = msg.get_payload().unwrap_or_default();
            if let Some(g) = payload
                .rsplit_once(' ')
                .and_then(|(_, g)| g.parse::<u64>().ok())
            {
                let at = Instant::now();
                let (_, subscribed): (String, u64) = redis::cmd("PUBSUB")
                    .arg("NUMSUB")
                    .arg(CHANNEL)
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                sink.lock().unwrap().push((at, g, subscribed));
            }
        }
    });
    seen
}

async fn run_size(
    args: &Args,
    redis: &str,
    conn: &mut redis::aio::MultiplexedConnection,
    hub: &Hub,
    published: &Published,
    members: usize,
    processes: usize,
) -> SizeResult {
    let period = Duration::from_secs(args.lifetime_secs).mul_f64(REFRESH_AT);
    let _: () = redis::cmd("FLUSHALL").query_async(conn).await.unwrap();
    published.lock().unwrap().clear();
    let fetches_before = hub.token_request_count();
    let spawn_at = Instant::now();
    let children: Vec<Members> = (0..processes)
        .map(|p| {
            let count = members / processes + usize::from(p < members % processes);
            spawn_members(redis, hub, count, true, args.start_spread_ms)
        })
        .collect();
    wait_ready(&children, Duration::from_secs(120)).await;
    let startup_secs = spawn_at.elapsed().as_secs_f64();
    let startup_fetches = hub.token_request_count() - fetches_before;
    eprintln!(
        "  {members} members ready in {startup_secs:.1} s ({startup_fetches} fetches); waiting for a publication"
    );

    // The window starts at a publication (the fetch behind it already counted) and lasts
    // `periods` nominal periods and half a period more, so it holds `periods` scheduled ones.
    let seen_at_ready = published.lock().unwrap().len();
    let deadline = Instant::now() + period * 3;
    let (t0, g0, _) = loop {
        if let Some(&first) = published.lock().unwrap().get(seen_at_ready) {
            break first;
        }
        assert!(Instant::now() < deadline, "no publication within 3 periods");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let f0 = hub.token_request_count();
    let (c0, mix0) = commands_processed(conn).await;
    let c0_at = Instant::now();
    let end = t0 + period * args.periods + period / 2;
    tokio::time::sleep_until(end).await;
    let f1 = hub.token_request_count();
    let (c1, mix1) = commands_processed(conn).await;
    let c_secs = c0_at.elapsed().as_secs_f64();
    let in_window: Vec<(Instant, u64, u64)> = published
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|&(t, g, _)| t > t0 && t <= end && g > g0)
        .collect();
    // Every member's listener, each child's probe and this process's watcher.
    let expected = members + processes + 1;
    let subscribed: BTreeMap<u64, u64> = in_window.iter().map(|&(_, g, n)| (g, n)).collect();
    let generations: BTreeSet<u64> = subscribed.keys().copied().collect();
    let mean_interval = in_window
        .last()
        .map(|&(t, _, _)| (t - t0).as_secs_f64() / in_window.len() as f64);

    let mut per_generation: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut missed = 0;
    for child in children {
        for line in child.stop().await {
            let mut parts = line.splitn(3, ' ');
            let (kind, g, rest) = (parts.next(), parts.next(), parts.next());
            let Some(g) = g.and_then(|g| g.parse::<u64>().ok()) else {
                continue;
            };
            if !generations.contains(&g) {
                continue;
            }
            match (kind, rest) {
                (Some("lat"), Some(rest)) => {
                    let these = rest.split(',').filter_map(|v| v.parse::<u64>().ok());
                    per_generation.entry(g).or_default().extend(these);
                }
                (Some("miss"), Some(n)) => missed += n.parse::<u64>().unwrap_or(0),
                _ => {}
            }
        }
    }
    let mut latencies = Vec::new();
    for (g, mut these) in per_generation {
        these.sort_unstable();
        eprintln!(
            "    generation {g}: {} adopted, p50 {} p99 {} max {}, {} over 100 ms; {} of {expected} connections subscribed just after",
            these.len(),
            ms(percentile(&these, 50.0)),
            ms(percentile(&these, 99.0)),
            ms(these.last().copied()),
            these.iter().filter(|&&us| us > 100_000).count(),
            subscribed.get(&g).copied().unwrap_or(0),
        );
        latencies.extend(these);
    }
    latencies.sort_unstable();
    SizeResult {
        p90: percentile(&latencies, 90.0),
        over_100ms: latencies.iter().filter(|&&us| us > 100_000).count(),
        members,
        processes,
        periods: args.periods,
        fetches: f1 - f0,
        publications: in_window.len(),
        mean_interval,
        commands_per_sec: (c1 - c0) as f64 / c_secs,
        command_mix: command_mix(&mix0, &mix1),
        samples: latencies.len(),
        p50: percentile(&latencies, 50.0),
        p99: percentile(&latencies, 99.0),
        max: latencies.last().copied(),
        missed,
        startup_fetches,
        startup_secs,
    }
}

/// `conns` keep-alive connections sending `GET /v2/orders` for `secs`; completed 200s per
/// second, and the number of other answers or errors.
async fn load(addr: SocketAddr, conns: usize, duration: Duration) -> (f64, u64) {
    let ok = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..conns {
        let (ok, bad, stop) = (ok.clone(), bad.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            while !stop.load(Ordering::Relaxed) {
                let req = http::Request::get("/v2/orders?bench=1")
                    .header("host", addr.to_string())
                    .body(Empty::<bytes::Bytes>::new())
                    .unwrap();
                match send.send_request(req).await {
                    Ok(res) => {
                        let good = res.status() == 200;
                        let body = res.into_body().collect().await;
                        if good && body.is_ok() {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            bad.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {
                        bad.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    let before = ok.load(Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    (before as f64 / secs, bad.load(Ordering::Relaxed))
}

/// Fleet on vs off: per round, (on req/s, off req/s, errors).
async fn request_path(args: &Args, redis: &str, hub: &Hub) -> Vec<(f64, f64, u64)> {
    // Both instances share the client; a revoking server would make them revoke each other.
    hub.set_revoke_on_issue(false);
    let on = spawn_members(redis, hub, 1, true, 0);
    let off = spawn_members(redis, hub, 1, false, 0);
    let both = [on, off];
    wait_ready(&both, Duration::from_secs(30)).await;
    let addrs = [both[0].addrs()[0], both[1].addrs()[0]];
    let duration = Duration::from_secs(args.ab_secs);
    let mut rounds = Vec::new();
    for round in 0..args.ab_rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut rps = [0.0; 2];
        let mut errors = 0;
        for which in order {
            // Warm-up: connections open, pools filled, nothing counted.
            load(addrs[which], args.ab_conns, Duration::from_secs(1)).await;
            let (r, e) = load(addrs[which], args.ab_conns, duration).await;
            eprintln!(
                "  round {} fleet {}: {r:.0} req/s, {e} errors",
                round + 1,
                if which == 0 { "on" } else { "off" }
            );
            rps[which] = r;
            errors += e;
        }
        rounds.push((rps[0], rps[1], errors));
    }
    for child in both {
        child.stop().await;
    }
    hub.set_revoke_on_issue(true);
    rounds
}

async fn parent(args: Args) {
    let (own, redis) = match &args.redis {
        Some(url) => (None, url.clone()),
        None => {
            let (own, url) = start_redis().await;
            (Some(own), url)
        }
    };
    eprintln!("fleet_bench: Redis at {redis}");
    let client = redis::Client::open(redis.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let hub = Hub::start(
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        HubOptions::default(),
    )
    .await
    .unwrap();
    hub.set_revoke_on_issue(true);
    hub.set_token_lifetime(Duration::from_secs(args.lifetime_secs));
    let period = args.lifetime_secs as f64 * REFRESH_AT;
    let published = watch_publications(&redis).await;
    // What the members are given; the parent's own connections stay as they are.
    let member_url = if args.resp3 {
        with_resp3(&redis)
    } else {
        redis.clone()
    };

    let mut results = Vec::new();
    if !args.skip_fleet {
        for size in args.sizes.split(',') {
            let (m, p) = size.split_once(':').unwrap_or((size, "1"));
            let (members, processes): (usize, usize) =
                (m.trim().parse().unwrap(), p.trim().parse().unwrap());
            eprintln!("fleet_bench: {members} members in {processes} processes");
            let r = run_size(
                &args,
                &member_url,
                &mut conn,
                &hub,
                &published,
                members,
                processes,
            )
            .await;
            eprintln!(
                "  {} fetches in {} periods, {} publications, {:.0} commands/s, adoption p50 {} p90 {} p99 {} ({} samples, {} over 100 ms, {} missed)",
                r.fetches, r.periods, r.publications, r.commands_per_sec, ms(r.p50), ms(r.p90), ms(r.p99), r.samples, r.over_100ms, r.missed
            );
            results.push(r);
        }
    }
    let ab = if args.skip_ab {
        Vec::new()
    } else {
        eprintln!("fleet_bench: request path, fleet on vs off");
        request_path(&args, &member_url, &hub).await
    };
    drop(own);

    if !results.is_empty() {
        println!(
            "\nFleet: {}-s tokens on a revoking stand-in, nominal refresh period {period:.1} s, {} periods per size, members on {}\n",
            args.lifetime_secs,
            args.periods,
            if args.resp3 { "RESP3" } else { "RESP2 (the default)" }
        );
        println!("| members | processes | fetches per period | Redis commands/s | adoption p50 | p99 | max | samples (missed) | publications, mean interval | start-up: fetches, time |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in &results {
            println!(
                "| {} | {} | {:.2} ({} in {}) | {:.0} | {} | {} | {} | {} ({}) | {}, {} | {}, {:.1} s |",
                r.members,
                r.processes,
                r.fetches as f64 / f64::from(r.periods),
                r.fetches,
                r.periods,
                r.commands_per_sec,
                ms(r.p50),
                ms(r.p99),
                ms(r.max),
                r.samples,
                r.missed,
                r.publications,
                r.mean_interval
                    .map_or("–".into(), |s| format!("{s:.2} s")),
                r.startup_fetches,
                r.startup_secs,
            );
        }
    }
    if !results.is_empty() {
        println!("\nRedis calls per command over each window (each publication window is `periods` periods and half a period long; MULTI/EXEC wrap each entry read, EVALSHA is the claim and publish scripts):\n");
        for r in &results {
            println!("- {} members: {}", r.members, r.command_mix);
        }
    }
    if !ab.is_empty() {
        println!(
            "\nRequest path: {} keep-alive connections, {} s per measurement, interleaved\n",
            args.ab_conns, args.ab_secs
        );
        println!("| round | fleet on req/s | fleet off req/s | on/off | errors |");
        println!("|---:|---:|---:|---:|---:|");
        let mut ratios = Vec::new();
        for (i, (on, off, errors)) in ab.iter().enumerate() {
            let ratio = on / off;
            ratios.push(ratio);
            println!("| {} | {on:.0} | {off:.0} | {ratio:.3} | {errors} |", i + 1);
        }
        ratios.sort_by(f64::total_cmp);
        println!(
            "\nMedian on/off ratio: {:.3} (range {:.3}–{:.3})",
            ratios[ratios.len() / 2],
            ratios[0],
            ratios[ratios.len() - 1]
        );
    }
}
