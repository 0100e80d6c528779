//! The stand-in Delivery Hub (token endpoint + API) as a process, for scripts: the benchmark
//! and the end-to-end checks run it beside the real tokengate binary.
//!
//! ```text
//! cargo run --release --example standin -- --port 0 --lifetime-secs 3600 [--tls-cert C --tls-key K]
//!     [--revoke-every-secs N] [--revoke-previous]
//! ```
//! Prints its base URL (`http://127.0.0.1:PORT` or `https://localhost:PORT`) as the first line
//! on stdout, then serves until SIGTERM/SIGINT. With `--revoke-every-secs N`, every token
//! issued so far is revoked (the soak's stand-in for a regenerated Client Secret Key) on
//! average every N seconds, at every token age a server and an operator produce: at random
//! moments, right after a forced refresh, right after a scheduled one, and in pairs 1 s, 3 s
//! and 6 s apart; each time with a `standin: revoked every token` line on stderr. With
//! `--revoke-previous`, each token issued revokes every earlier one, as Doorkeeper's
//! `revoke_previous_client_credentials_token` does (what fleet mode is for).
#![allow(clippy::print_stdout)] // the base URL on stdout is this program's interface

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokengate::standin::{tls_server_config, Hub, HubOptions};

#[derive(Parser, Debug)]
struct Args {
    /// Port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Lifetime of issued tokens unless a request asks for a `ttl`.
    #[arg(long, default_value_t = 3600)]
    lifetime_secs: u64,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Accept only this client id (default: any).
    #[arg(long)]
    client_id: Option<String>,
    /// Accept only this client secret (default: any).
    #[arg(long)]
    client_secret: Option<String>,
    /// Revoke every token issued so far every this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    revoke_every_secs: u64,
    /// Each token issued revokes every earlier one (one live token per client).
    #[arg(long)]
    revoke_previous: bool,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_file(key)?;
            Some(tls_server_config(chain, key)?)
        }
        _ => None,
    };
    // Installed before the URL is printed: a script may signal as soon as it has read it.
    let stop = tokengate::shutdown::terminate_signal();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
    let hub = Hub::start(
        listener,
        HubOptions {
            token_lifetime: Duration::from_secs(args.lifetime_secs),
            tls,
            client_id: args.client_id,
            client_secret: args.client_secret,
        },
    )
    .await?;
    hub.set_revoke_on_issue(args.revoke_previous);
    println!("{}", hub.base_url());
    if args.revoke_every_secs > 0 {
        // Ends with the runtime when main returns.
        tokio::spawn(revocations(
            hub.clone(),
            Duration::from_secs(args.revoke_every_secs),
        ));
    }
    stop.await;
    hub.shutdown();
    Ok(())
}

/// Revokes every token, round after round, at every token age: after a random pause around
/// `mean`; right after the forced refresh that revocation causes; right after the scheduled
/// refresh that follows; then in pairs 1 s, 3 s and 6 s apart. Never tied to how old the
/// token in use is: a proxy that copes only with some ages fails here.
async fn revocations(hub: Hub, mean: Duration) {
    let mut n = 0u64;
    let mut revoke = |why: &str| {
        n += 1;
        hub.revoke_all();
        eprintln!("standin: revoked every token ({n}, {why})");
    };
    let pause = |d: Duration| tokio::time::sleep(d);
    // The next token issued after this call, seen within 10 ms.
    let next_issue = |hub: &Hub| {
        let hub = hub.clone();
        let seen = hub.issued_tokens().len();
        async move {
            while hub.issued_tokens().len() == seen {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    loop {
        pause(mean.mul_f64(0.5 + fastrand::f64())).await;
        let forced = next_issue(&hub);
        revoke("random moment");
        forced.await;
        let forced_again = next_issue(&hub);
        revoke("right after a forced refresh");
        // That revocation's own forced refresh, then the scheduled one after it.
        forced_again.await;
        next_issue(&hub).await;
        revoke("right after the next refresh");
        for gap in [1, 3, 6] {
            pause(mean.mul_f64(0.25 + 0.5 * fastrand::f64())).await;
            revoke("first of a pair");
            pause(Duration::from_secs(gap)).await;
            revoke(&format!("{gap} s after the previous"));
        }
    }
}
