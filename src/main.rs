//! The `tokengate` binary, a thin shell: parse the command line, load and validate the
//! configuration before binding anything, start logging, bind, run the library, map the
//! outcome to an exit code (0 success, 1 runtime failure, 2 bad command line or config).
#![allow(clippy::print_stdout)] // the CLI's output path: `check`, `token`

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing::{error, info, warn};

use tokengate::config::Config;
use tokengate::token::client::TokenClient;
use tokengate::{shutdown, telemetry, Listeners};

#[derive(Parser, Debug)]
#[command(
    name = "tokengate",
    version,
    about = "Adds a fresh OAuth 2.0 client-credentials Bearer token to plain-HTTP calls and forwards them to Bringg Delivery Hub over TLS"
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
    /// Validate the configuration, resolve secrets and print a summary (no secrets).
    Check {
        /// Also fetch one token per integration and report each result.
        #[arg(long)]
        fetch: bool,
    },
    /// Fetch one token now and print its type, lifetime and expiry.
    Token {
        #[arg(long, value_name = "NAME")]
        integration: String,
        /// Print the token itself, alone on stdout.
        #[arg(long)]
        show_token: bool,
    },
    /// Run a local stand-in for Delivery Hub and a proxy wired to it (no credentials, no network).
    Demo,
}

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokengate: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match cli.command {
        Some(Command::Demo) => {
            telemetry::init_logging(tokengate::config::LogFormat::Text);
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
            runtime.block_on(check(&config, fetch))
        }
        Some(Command::Token {
            integration,
            show_token,
        }) => {
            let config = match load(&cli.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            runtime.block_on(token(&config, &integration, show_token))
        }
        None => {
            let config = match load(&cli.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            telemetry::init_logging(config.server.log_format);
            runtime.block_on(serve(config, cli.config))
        }
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
    let grace = config.server.shutdown_grace;
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
                info!(config = %path.display(), "SIGHUP: reloading the configuration and every secret");
                match Config::load(&path) {
                    Ok(new) => {
                        for w in &new.warnings {
                            warn!("{w}");
                        }
                        running.reload(new);
                        running.state().metrics.reload(true);
                        info!("configuration reloaded");
                    }
                    Err(e) => {
                        running.state().metrics.reload(false);
                        error!(error = %e, "configuration rejected; the running configuration stays");
                    }
                }
            }
        }
    }
    running.shutdown(grace).await;
    info!("stopped");
    ExitCode::SUCCESS
}

async fn check(config: &Config, fetch: bool) -> ExitCode {
    println!("configuration {} is valid", config.path.display());
    println!("admin: {}", config.server.admin_listen);
    for i in &config.integrations {
        println!(
            "\n[{}]\n  listen        {}\n  token_url     {}\n  upstream      {}\n  client_id     from {}\n  client_secret from {}",
            i.name,
            i.listen,
            i.token.token_url.url,
            i.proxy.upstream.url,
            i.token.client_id.source.describe(),
            i.token.client_secret.source.describe(),
        );
    }
    for w in &config.warnings {
        println!("warning: {w}");
    }
    if !fetch {
        return ExitCode::SUCCESS;
    }
    let mut failed = false;
    for i in &config.integrations {
        match fetch_one(&i.token).await {
            Ok(issued) => println!(
                "{}: token obtained (lifetime {})",
                i.name,
                issued
                    .expires_in
                    .map(|d| humantime::format_duration(d).to_string())
                    .unwrap_or_else(|| "not stated".into())
            ),
            Err(e) => {
                failed = true;
                println!("{}: token request failed: {e}", i.name);
            }
        }
    }
    if failed {
        ExitCode::from(EXIT_RUNTIME)
    } else {
        ExitCode::SUCCESS
    }
}

async fn fetch_one(
    settings: &tokengate::config::TokenSettings,
) -> Result<tokengate::token::client::Issued, String> {
    let client = TokenClient::new(settings).map_err(|e| e.to_string())?;
    client.fetch(settings).await.map_err(|e| e.to_string())
}

async fn token(config: &Config, name: &str, show: bool) -> ExitCode {
    let Some(i) = config.integrations.iter().find(|i| i.name == name) else {
        let names: Vec<&str> = config
            .integrations
            .iter()
            .map(|i| i.name.as_str())
            .collect();
        eprintln!(
            "tokengate: no integration named {name:?} in {}; it has: {}",
            config.path.display(),
            names.join(", ")
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    eprintln!("POST {}", i.token.token_url.url);
    match fetch_one(&i.token).await {
        Ok(issued) => {
            let lifetime = issued.expires_in.unwrap_or(i.token.assume_lifetime);
            let expiry = std::time::SystemTime::now() + lifetime;
            eprintln!("HTTP {}", issued.status);
            eprintln!("token_type    Bearer");
            eprintln!(
                "lifetime      {}{}",
                humantime::format_duration(lifetime),
                if issued.expires_in.is_none() {
                    " (no expires_in; assume_lifetime)"
                } else {
                    ""
                }
            );
            eprintln!(
                "expires at    {} UTC",
                humantime::format_rfc3339_seconds(expiry)
            );
            if let Some(skew) = issued.clock_skew {
                eprintln!("clock skew    {skew} s (created_at minus this host's clock)");
            }
            if show {
                println!("{}", issued.access_token.expose());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("token request failed: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}
