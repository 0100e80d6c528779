//! tokengate: a sidecar that lets systems which cannot do OAuth call an OAuth-protected API.
//! For each integration it obtains a token with the OAuth 2.0 client-credentials grant, keeps
//! it fresh in the background, adds `Authorization: Bearer …` to every plain-HTTP call the
//! legacy system sends to its loopback port, and forwards the call over TLS to the upstream
//! (Bringg Delivery Hub, `https://api.bringg.com`).
//!
//! ```text
//!  legacy client ─http─▶ listener ─▶ proxy::Gate ──https + Bearer──▶ upstream
//!                                     │ reads (lock-free)
//!                                     ▼
//!                            token::TokenHandle ◀── token::refresher ──▶ token endpoint
//!                                                          │ fleet mode
//!                                                          ▼
//!                                                   token::fleet ──▶ Redis (shared by replicas)
//!  Prometheus ─http─▶ admin (/metrics /healthz /readyz /status)
//! ```
//!
//! # Layout
//! - [`config`]: TOML schema, defaults, validation, secret sources, the egress route decision
//!   and the reload plan (old vs new); the only loading path.
//! - [`proxy`]: one integration's hyper service, as phases in `proxy/mod.rs` (filter →
//!   prepare → inject → send → replay on 401 | respond → record); beside it
//!   [`proxy::hygiene`] (pure header and target rules, fuzzed), `body` (the replay tee and the
//!   response body), `listener` (accept loop, first-request deadline), `upstream` (the
//!   upstream connections, held by client-connection affinity, and what their failures mean) and `tunnel` (the CONNECT connector to the egress
//!   proxy).
//! - [`token`]: the token cell ([`token::TokenHandle`]), one exchange ([`token::client`]), the
//!   background refresher (`token::refresher`, a driver with one handler per event; its fleet
//!   part in `refresher/fleet.rs`), when refreshes happen (`token::schedule`: jittered
//!   schedule, backoff, the fixed 5 s forced floor), revocation thrash (`token::thrash`), and
//!   fleet mode (`token::fleet`: sealing, the protocol over a backend, the Redis backend).
//! - `admin`: the admin listener and the state it reads.
//! - [`error`](mod@error): the errors tokengate answers itself and their status/JSON mapping.
//! - `telemetry`: logging setup and every metric, on a registry owned by [`start`].
//! - [`tls`]: the one rustls provider and root store both clients use, and what a refused
//!   certificate means (cause and fix) for the messages of both.
//! - [`shutdown`]: the stop signal and OS signals.
//! - [`report`]: the `check` and `token` reports of the command line.
//! - [`standin`]: a local stand-in for Delivery Hub (token endpoint + API) for `demo`, tests
//!   and the benchmark; a test double that ships for the demo.
//! - [`demo`]: the `tokengate demo` command.
//! - `main.rs` (the binary): command line → load → telemetry → bind → [`start`] → forward
//!   signals → exit code.
//!
//! # Request flow
//! A request on an integration port is checked (method, absolute-form host), stripped of
//! hop-by-hop headers, given the current token's prebuilt `Authorization` value and sent on
//! the client connection's own upstream connection, its body streaming through. A 401 asks the
//! refresher for one forced refresh and replays the request once if its body was kept.

pub(crate) mod admin;
pub mod config;
pub mod demo;
pub mod error;
pub mod proxy;
pub mod report;
pub mod shutdown;
pub mod standin;
pub(crate) mod telemetry;
pub use telemetry::init_logging;
pub mod tls;
pub mod token;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::admin::State;
use crate::config::{Config, TokenSettings};
use crate::proxy::{ConnectWarnings, Gate, Route};
use crate::telemetry::Metrics;
use crate::token::fleet::Hub;
use crate::token::refresher::{FleetContext, Refresher};
use crate::token::TokenHandle;

/// Sockets bound by the caller before `start`, so tests bind `127.0.0.1:0` and `main` can
/// report a port in use before anything else starts.
#[derive(Debug)]
pub struct Listeners {
    pub admin: TcpListener,
    /// In the order of `config.integrations`.
    pub integrations: Vec<TcpListener>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        key: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0} integration listeners for {1} integrations")]
    ListenerCount(usize, usize),
    #[error("integration {name}: {source}")]
    Route {
        name: String,
        source: proxy::RouteError,
    },
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("{0}")]
    Fleet(String),
}

/// The accept-queue length asked of the kernel, which clamps it to `net.core.somaxconn`
/// (4096 by default since Linux 5.4).
///
/// tokio's `TcpListener::bind` asks for 128, as std does. A legacy system that opens more
/// connections than that at once while tokengate is busy overflows the queue; Linux then
/// drops the handshake's last packet and the client's first request waits for TCP's
/// retransmissions, 1 s, then 3 s, then 7 s (`bench/NOTES.md`, session 3: p99 of 2.7 s and
/// requests over 5 s at 256 connections, with `ListenOverflows` counted by the kernel).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` for accepting with [`LISTEN_BACKLOG`]. `SO_REUSEADDR` is set, as tokio does,
/// so a restart does not wait for the previous process's connections in `TIME_WAIT`. Must
/// be called inside the tokio runtime.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

impl Listeners {
    /// Binds every address of `config`; the error names the key.
    pub async fn bind(config: &Config) -> Result<Listeners, StartError> {
        let bind = |key: String, addr: SocketAddr| {
            listen(addr).map_err(|source| StartError::Bind { key, addr, source })
        };
        let admin = bind(
            "server.admin_listen".to_string(),
            config.server.admin_listen,
        )?;
        let mut integrations = Vec::new();
        for (i, integration) in config.integrations.iter().enumerate() {
            integrations.push(bind(
                format!("integration[{i}].listen"),
                integration.listen,
            )?);
        }
        Ok(Listeners {
            admin,
            integrations,
        })
    }
}

/// A started tokengate: its addresses, readiness, reload and shutdown.
pub struct Running {
    state: Arc<State>,
    /// What runs: the configuration started with, its live keys updated by each reload
    /// ([`config::diff::applied`]).
    config: Config,
    /// In start order; a reload finds them by name, never by position.
    integrations: Vec<Serving>,
    admin_addr: SocketAddr,
    stop_accepting: shutdown::Trigger,
    stop_tasks: shutdown::Trigger,
    listeners: Vec<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
    connections: Arc<proxy::Connections>,
}

/// One running integration: its proxy state, the address it listens on and the channel that
/// hands its refresher new token settings.
struct Serving {
    gate: Arc<Gate>,
    addr: SocketAddr,
    token_settings: watch::Sender<Arc<TokenSettings>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("admin", &self.admin_addr)
            .field("listen", &self.state.listen)
            .finish_non_exhaustive()
    }
}

/// Starts every task: one refresher and one listener per integration (all fetching their
/// first token concurrently), and the admin listener.
pub async fn start(config: Config, listeners: Listeners) -> Result<Running, StartError> {
    if listeners.integrations.len() != config.integrations.len() {
        return Err(StartError::ListenerCount(
            listeners.integrations.len(),
            config.integrations.len(),
        ));
    }
    let metrics = Arc::new(Metrics::new()?);
    let (stop_accepting, accept_signal) = shutdown::channel();
    let (stop_tasks, task_signal) = shutdown::channel();
    let connections = Arc::new(proxy::Connections::default());
    let admin_addr = listeners
        .admin
        .local_addr()
        .map_err(|source| StartError::Bind {
            key: "server.admin_listen".into(),
            addr: config.server.admin_listen,
            source,
        })?;

    let mut integrations = Vec::new();
    let mut tasks = Vec::new();
    let mut serving = Vec::new();
    let fleet = match &config.fleet {
        None => None,
        Some(settings) => {
            let hub = Hub::new(settings).map_err(StartError::Fleet)?;
            let gauge = metrics.fleet_redis_up();
            let mut up = hub.up();
            let mut stop = task_signal.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    gauge.set(i64::from(*up.borrow_and_update()));
                    tokio::select! {
                        changed = up.changed() => if changed.is_err() { break },
                        _ = stop.wait() => break,
                    }
                }
            }));
            tasks.push(tokio::spawn(hub.clone().listen(task_signal.clone())));
            Some(FleetContext {
                hub,
                metrics: metrics.clone(),
            })
        }
    };
    for (integration, listener) in config.integrations.iter().zip(listeners.integrations) {
        let name: Arc<str> = Arc::from(integration.name.as_str());
        let route = Route::new(integration.proxy.clone()).map_err(|source| StartError::Route {
            name: integration.name.clone(),
            source,
        })?;
        let (handle, force_rx) = TokenHandle::new();
        let m = metrics.integration(&integration.name);
        let (settings_tx, settings_rx) = watch::channel(Arc::new(integration.token.clone()));
        let refresher = Refresher::new(
            name.clone(),
            handle.clone(),
            settings_rx,
            force_rx,
            m.clone(),
            fleet.clone(),
        );
        tasks.push(tokio::spawn(refresher.run(task_signal.clone())));
        let addr = listener.local_addr().unwrap_or(integration.listen);
        let gate = Arc::new(Gate {
            name,
            listen: addr,
            route: ArcSwap::from_pointee(route),
            token: handle,
            metrics: m,
            connect_warned: ConnectWarnings::default(),
        });
        info!(
            integration = %integration.name,
            listen = %addr,
            upstream = %integration.proxy.upstream.url,
            upstream_route = %integration.proxy.egress.describe(),
            token_route = %integration.token.egress.describe(),
            "listening"
        );
        serving.push(tokio::spawn(proxy::serve(
            listener,
            gate.clone(),
            config.server.header_read_timeout,
            connections.clone(),
            accept_signal.clone(),
        )));
        integrations.push(Serving {
            gate,
            addr,
            token_settings: settings_tx,
        });
    }
    let state = Arc::new(State {
        gates: integrations.iter().map(|i| i.gate.clone()).collect(),
        listen: integrations.iter().map(|i| i.addr).collect(),
        metrics,
        draining: AtomicBool::new(false),
    });
    info!(admin = %admin_addr, "admin endpoints at /healthz /readyz /metrics /status");
    tasks.push(tokio::spawn(admin::serve(
        listeners.admin,
        state.clone(),
        task_signal,
    )));
    Ok(Running {
        state,
        config,
        integrations,
        admin_addr,
        stop_accepting,
        stop_tasks,
        listeners: serving,
        tasks,
        connections,
    })
}

impl Running {
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The bound address of the named integration's listener.
    pub fn integration_addr(&self, name: &str) -> Option<SocketAddr> {
        self.serving(name).map(|i| i.addr)
    }

    /// The token the named integration holds, valid or not (its generation, lifetime and
    /// expiry; `Debug` and `Display` never show the token itself): for the fleet benchmark
    /// and tests that follow a fleet converging.
    pub fn held_token(&self, name: &str) -> Option<Arc<token::Token>> {
        self.serving(name).and_then(|i| i.gate.token.held())
    }

    fn serving(&self, name: &str) -> Option<&Serving> {
        self.integrations.iter().find(|i| &*i.gate.name == name)
    }

    pub fn is_ready(&self) -> bool {
        !self.state.draining.load(Ordering::Relaxed) && admin::not_ready(&self.state).is_empty()
    }

    /// SIGHUP: re-reads the configuration file and every secret and applies it with
    /// [`Running::reload`]; a file that fails validation is rejected whole and what runs
    /// stays. Logs and counts the outcome; returns whether the file was taken.
    pub fn reload_file(&mut self) -> bool {
        let path = self.config.path.clone();
        debug!(config = %path.display(), "SIGHUP: reloading the configuration and every secret");
        match Config::load(&path) {
            Ok(new) => {
                for w in &new.warnings {
                    warn!("{w}");
                }
                self.reload(new);
                self.state.metrics.reload(true);
                info!(config = %path.display(), "SIGHUP: configuration reloaded");
                true
            }
            Err(e) => {
                self.state.metrics.reload(false);
                error!(error = %e, "SIGHUP: configuration rejected; the running configuration stays");
                false
            }
        }
    }

    /// Applies a new, already validated configuration: the live keys of every running
    /// integration, matched by name, now; the rest logged as needing a restart. Nothing that
    /// runs stops or moves, whatever the file adds, removes, renames or reorders.
    pub fn reload(&mut self, new: Config) {
        let plan = config::diff::plan(&self.config, &new);
        for line in &plan.restart {
            warn!("{line}");
        }
        for change in &plan.integrations {
            let Some(serving) = self.serving(&change.name) else {
                continue;
            };
            let gate = &serving.gate;
            if let Some(proxy) = &change.proxy {
                match Route::new(proxy.clone()) {
                    Ok(route) => {
                        gate.route.store(Arc::new(route));
                        info!(integration = %gate.name, "proxy settings applied");
                    }
                    Err(e) => {
                        warn!(integration = %gate.name, error = %e, "cannot apply the new proxy settings; keeping the previous ones")
                    }
                }
            }
            if let Some(token) = &change.token {
                serving.token_settings.send_replace(Arc::new(token.clone()));
            }
        }
        let mut next = config::diff::applied(&self.config, &plan);
        // A route that could not be built keeps the previous settings: what runs says so, and
        // the next reload tries again.
        for (i, serving) in next.integrations.iter_mut().zip(&self.integrations) {
            i.proxy = serving.gate.route.load().settings.clone();
        }
        next.warnings = new.warnings;
        self.config = next;
    }

    /// Reports not ready, stops accepting, lets in-flight requests (and the bodies they
    /// stream) finish for up to `grace`, then closes what is left and stops every task.
    /// Returns whether the drain finished within the grace period.
    pub async fn shutdown(self, grace: Duration) -> bool {
        self.state.draining.store(true, Ordering::Relaxed);
        self.stop_accepting.fire();
        for l in self.listeners {
            let _ = l.await;
        }
        let drained = tokio::time::timeout(grace, self.connections.drain())
            .await
            .is_ok();
        if drained {
            info!("drained: every in-flight request finished");
        } else {
            warn!(grace = %humantime::format_duration(grace), "shutdown_grace expired with requests still in flight; closing them");
            self.connections.close_all();
        }
        self.stop_tasks.fire();
        for t in self.tasks {
            let _ = t.await;
        }
        drained
    }

    pub fn config(&self) -> &Config {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv6 listen address needs an IPv6 socket (an IPv4 one cannot bind it), and port 0
    /// still asks for any free port.
    #[tokio::test]
    async fn listen_binds_ipv4_and_ipv6_loopback() {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let addr: SocketAddr = addr.parse().unwrap();
            // Some containers have no IPv6 loopback: then std cannot bind it either.
            if let Err(e) = std::net::TcpListener::bind(addr) {
                eprintln!("skipped {addr}: {e}");
                continue;
            }
            let listener = listen(addr).unwrap();
            let bound = listener.local_addr().unwrap();
            assert_eq!(bound.ip(), addr.ip());
            assert_ne!(bound.port(), 0);
            let (accepted, connected) =
                tokio::join!(listener.accept(), tokio::net::TcpStream::connect(bound));
            accepted.unwrap();
            connected.unwrap();
        }
    }
}
