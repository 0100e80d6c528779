//! The `tokengate` binary, a thin shell: parse the command line, load and validate the
//! configuration before binding anything, start logging, bind, start the library, forward
//! SIGHUP (reload) and SIGTERM/SIGINT (drain) to it, map the outcome to an exit code (0
//! success, 1 runtime failure, 2 bad command line or config). The `check` and `token`
//! reports are the library's ([`tokengate::report`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing::{error, info, warn};

use tokengate::config::Config;
use tokengate::report::{self, ReportError};
use tokengate::{init_logging, shutdown, Listeners};

#[derive(Parser, Debug)]
#[command(
    name = "tokengate",
    version,
    about = "Adds a fresh OAuth 2.0 client-credentials Bearer token to plain-HTTP calls and forwards them to Bringg Delivery Hub over TLS",
    long_about = "Adds a fresh OAuth 2.0 client-credentials Bearer token to plain-HTTP calls and forwards them to Bringg Delivery Hub over TLS.\n\nWithout a command, runs the proxy with the configuration file. SIGHUP reloads it and every secret; SIGTERM or SIGINT drain in-flight requests for shutdown_grace and exit 0.",
    after_help = "Exit codes: 0 success, 1 runtime failure (including a failed `token` fetch or a port in use), 2 bad command line or configuration.\nFirst time? Run `tokengate demo`. Logs: TOKENGATE_LOG (env-filter syntax, default info)."
)]
struct Cli {
    /// Configuration file.
    #[arg(
        long,
        global = true,
        env = "TOKENGATE_CONFIG",
        default_value = "tokengate.toml",
        value_name = "PATH"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate the configuration, resolve every secret and print a summary and warnings (never a secret); exit 0 valid, 2 not.
    Check {
        /// Also fetch one token per integration and report each result (exit 1 if any fails).
        #[arg(long)]
        fetch: bool,
    },
    /// Fetch one token now, exactly as the proxy would, and print the endpoint, status, type, lifetime and expiry; exit 1 if it fails.
    Token {
        /// The integration's `name` in the configuration.
        #[arg(long, value_name = "NAME")]
        integration: String,
        /// Also print the token itself, alone on stdout: curl -H "Authorization: Bearer $(tokengate token --integration oms --show-token)" ...
        #[arg(long)]
        show_token: bool,
    },
    /// Run a local stand-in for Delivery Hub and a proxy wired to it, send a sample call and keep serving (no config, no credentials, no network).
    Demo,
}

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The runtime and everything it runs live on a thread of their own rather than on the
    // main thread, for glibc's sake: the main thread allocates from the main arena, which
    // gives memory back to the kernel (`brk`) as soon as 128 KiB lie free at the top of the
    // heap, as they do after every request that streams a 64 KiB body — one `brk` and a
    // round of page faults per request (about a quarter more CPU per 64 KiB POST at one
    // connection, see bench/NOTES.md). A thread's own arena does not churn like that.
    let runtime_thread = std::thread::Builder::new()
        .name("tokengate-rt".into())
        .spawn(move || run_command(cli));
    match runtime_thread.map(std::thread::JoinHandle::join) {
        Ok(Ok(code)) => code,
        // A panic has already printed its message.
        Ok(Err(_)) => ExitCode::from(EXIT_RUNTIME),
        Err(e) => {
            eprintln!("tokengate: cannot start the runtime thread: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn run_command(cli: Cli) -> ExitCode {
    let runtime = match runtime_builder().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokengate: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match cli.command {
        Some(Command::Demo) => {
            init_logging(tokengate::config::LogFormat::Text);
            runtime.block_on(async {
                match tokengate::demo::run(shutdown::terminate_signal()).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("tokengate demo: {e}");
                        ExitCode::from(EXIT_RUNTIME)
                    }
                }
            })
        }
        Some(Command::Check { fetch }) => {
            let config = match load(&cli.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            exit_code(runtime.block_on(report::check(&config, fetch)))
        }
        Some(Command::Token {
            integration,
            show_token,
        }) => {
            let config = match load(&cli.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            exit_code(runtime.block_on(report::token(&config, &integration, show_token)))
        }
        None => {
            let config = match load(&cli.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(config.server.log_format);
            runtime.block_on(serve(config, cli.config))
        }
    }
}

/// The async runtime, sized to the CPUs this process may run on. `available_parallelism`
/// honours the affinity mask (`taskset`, `cpuset` cgroups) and CPU quotas; tokio's default
/// multi-thread runtime already sizes itself from it, but with a single CPU its work-stealing
/// machinery (a worker thread beside the thread that waits in `block_on`, queues and wake-ups
/// built for several workers) only costs: the current-thread runtime then does the same work
/// on one thread.
fn runtime_builder() -> tokio::runtime::Builder {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
}

fn exit_code(report: Result<(), ReportError>) -> ExitCode {
    match report {
        Ok(()) => ExitCode::SUCCESS,
        Err(ReportError::Fetch) => ExitCode::from(EXIT_RUNTIME),
        Err(ReportError::UnknownIntegration) => ExitCode::from(EXIT_CONFIG),
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("tokengate: configuration error: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

async fn serve(config: Config, path: PathBuf) -> ExitCode {
    let terminate = shutdown::terminate_signal();
    let mut hangup = shutdown::Hangup::install();
    for w in &config.warnings {
        warn!("{w}");
    }
    let listeners = match Listeners::bind(&config).await {
        Ok(l) => l,
        Err(e) => {
            error!(error = %e, "cannot start");
            eprintln!("tokengate: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    info!(version = env!("CARGO_PKG_VERSION"), config = %path.display(), "tokengate starting");
    let mut running = match tokengate::start(config, listeners).await {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "cannot start");
            eprintln!("tokengate: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let mut terminate = std::pin::pin!(terminate);
    loop {
        tokio::select! {
            signal = &mut terminate => {
                info!(signal, "shutting down: not ready, no new connections, draining in-flight requests");
                break;
            }
            _ = hangup.recv() => {
                running.reload_file();
            }
        }
    }
    // The grace of the configuration in force now: a reload may have changed it.
    let grace = running.config().server.shutdown_grace;
    running.shutdown(grace).await;
    info!("stopped");
    ExitCode::SUCCESS
}
