//! The built binary: `--version`, exit codes for bad command lines and configurations, a real
//! run that serves and exits 0 on SIGTERM after draining, SIGHUP reload, `check`, `token` and
//! `demo`. Each test runs `target/.../tokengate` with its own config and free ports.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use support::process::{free_port, output, Proc};
use tokengate::standin::{Hub, HubOptions};

fn write_config(
    dir: &Path,
    hub: &Hub,
    secret_file: &Path,
    admin: u16,
    listen: u16,
) -> std::path::PathBuf {
    let path = dir.join("tokengate.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[server]
admin_listen = "127.0.0.1:{admin}"
shutdown_grace = "5s"

[[integration]]
name = "oms"
listen = "127.0.0.1:{listen}"
token_url = "{}"
upstream = "{}"
client_id = "cli-client"
client_secret = {{ file = "{}" }}
"#,
            hub.token_url(),
            hub.base_url(),
            secret_file.display()
        ),
    )
    .unwrap();
    path
}

#[tokio::test]
async fn version_prints_and_exits_zero() {
    let (code, out, _) = output(&["--version"]).await;
    assert_eq!(code, 0);
    assert_eq!(
        out.trim(),
        format!("tokengate {}", env!("CARGO_PKG_VERSION"))
    );
}

#[tokio::test]
async fn bad_command_line_exits_two() {
    let (code, _, err) = output(&["--no-such-flag"]).await;
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = output(&["token"]).await;
    assert_eq!(code, 2, "missing --integration: {err}");
}

#[tokio::test]
async fn bad_configuration_exits_two_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[integration]]\nname = \"oms\"\nlisten = \"127.0.0.1:8081\"\nregion = \"us2\"\nclient_id = \"a\"\nclient_secrte = \"b\"\n",
    )
    .unwrap();
    let (code, _, err) = output(&["--config", path.to_str().unwrap()]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("bad.toml"), "{err}");
    assert!(err.contains("integration[0]"), "{err}");
    assert!(
        err.contains("client_secret"),
        "suggests the right key: {err}"
    );

    let (code, _, err) = output(&["--config", "/nonexistent/tokengate.toml"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/nonexistent/tokengate.toml"), "{err}");

    // `check` validates the same way.
    let (code, _, err) = output(&["check", "--config", path.to_str().unwrap()]).await;
    assert_eq!(code, 2, "{err}");
}

#[tokio::test]
async fn runs_serves_reloads_and_drains_on_sigterm() {
    let hub = support::hub_with(HubOptions {
        client_id: Some("cli-client".into()),
        client_secret: Some("first-secret".into()),
        ..HubOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client_secret");
    std::fs::write(&secret, "first-secret\n").unwrap();
    let (admin, listen) = (free_port(), free_port());
    let config = write_config(dir.path(), &hub, &secret, admin, listen);
    let mut p = Proc::spawn(&["--config", config.to_str().unwrap()]);
    p.wait_for("token obtained").await;

    let client = support::client();
    let res = client
        .get(format!("http://127.0.0.1:{listen}/v2/orders"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let ready = client
        .get(format!("http://127.0.0.1:{admin}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    // The key is regenerated: the old token dies with it. SIGHUP re-reads the secret file and
    // fetches a token with the new secret at once.
    hub.set_credentials(Some("cli-client".into()), Some("second-secret".into()));
    std::fs::write(&secret, "second-secret\n").unwrap();
    p.signal(Signal::SIGHUP);
    p.wait_for("configuration reloaded").await;
    // Either the reload or the secret-file watch (whichever reads the file first) fetches a
    // token with the new secret; after that, calls succeed again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let res = client
            .get(format!("http://127.0.0.1:{listen}/v2/orders"))
            .send()
            .await
            .unwrap();
        if res.status() == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "calls never recovered: {}",
            res.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(hub
        .token_requests()
        .iter()
        .any(|r| r.params.get("client_secret").map(String::as_str) == Some("second-secret")));

    // A configuration that fails validation is rejected whole; the process keeps serving.
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{good}\nbogus_key = 1\n")).unwrap();
    p.signal(Signal::SIGHUP);
    p.wait_for("configuration rejected").await;
    let metrics = client
        .get(format!("http://127.0.0.1:{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        support::sample(
            &metrics,
            "tokengate_config_reloads_total",
            &[("result", "success")]
        ),
        Some(1.0)
    );
    assert_eq!(
        support::sample(
            &metrics,
            "tokengate_config_reloads_total",
            &[("result", "failure")]
        ),
        Some(1.0)
    );
    let res = client
        .get(format!("http://127.0.0.1:{listen}/v2/orders"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    p.signal(Signal::SIGTERM);
    p.wait_for("drained").await;
    assert_eq!(p.exit_code().await, 0);
    let logs = p.seen.join("\n");
    for secret in ["first-secret", "second-secret"] {
        assert!(!logs.contains(secret), "a secret reached the log");
    }
    for token in hub.issued_tokens() {
        assert!(!logs.contains(&token), "a token reached the log");
    }
}

/// `[oms, wms]` → `[oms]` → `[oms, wms]`, each followed by SIGHUP, then a reordered file and
/// an invalid one: the process keeps running, both ports keep answering, the removal and the
/// reorder are logged as needing a restart, and SIGTERM still drains and exits 0.
#[tokio::test]
async fn reloads_that_remove_restore_and_reorder_integrations_keep_every_port_serving() {
    let hub = support::hub().await;
    let dir = tempfile::tempdir().unwrap();
    let (admin, oms, wms) = (free_port(), free_port(), free_port());
    let integration = |name: &str, port: u16| {
        format!(
            "[[integration]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\ntoken_url = \"{}\"\nupstream = \"{}\"\nclient_id = {{ env = \"CLI_ID\" }}\nclient_secret = {{ env = \"CLI_SECRET\" }}\n",
            hub.token_url(),
            hub.base_url()
        )
    };
    let write = |parts: &[String]| {
        let text = format!(
            "[server]\nadmin_listen = \"127.0.0.1:{admin}\"\nshutdown_grace = \"5s\"\n{}",
            parts.join("\n")
        );
        std::fs::write(dir.path().join("tokengate.toml"), text).unwrap();
    };
    let (o, w) = (integration("oms", oms), integration("wms", wms));
    write(&[o.clone(), w.clone()]);
    let config = dir.path().join("tokengate.toml");
    let mut command = tokio::process::Command::new(support::process::BIN);
    command
        .args(["--config", config.to_str().unwrap()])
        .env("TOKENGATE_LOG", "info")
        .env("CLI_ID", "id")
        .env("CLI_SECRET", "secret");
    let mut p = Proc::start(command);
    p.wait_for("admin endpoints").await;
    let client = support::client();
    let both_answer = || async {
        for port in [oms, wms] {
            let res = client
                .get(format!("http://127.0.0.1:{port}/v2/orders"))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200, "port {port}");
        }
    };
    both_answer().await;

    write(std::slice::from_ref(&o));
    p.signal(Signal::SIGHUP);
    p.wait_for("integration wms is no longer in the file").await;
    p.wait_for("configuration reloaded").await;
    both_answer().await;

    write(&[o.clone(), w.clone()]);
    p.signal(Signal::SIGHUP);
    p.wait_for("configuration reloaded").await;
    both_answer().await;

    write(&[w.clone(), o.clone()]);
    p.signal(Signal::SIGHUP);
    p.wait_for("integrations were reordered").await;
    p.wait_for("configuration reloaded").await;
    both_answer().await;

    write(&["[[integration]]\nname = 3\n".to_string()]);
    p.signal(Signal::SIGHUP);
    p.wait_for("configuration rejected").await;
    both_answer().await;

    p.signal(Signal::SIGTERM);
    p.wait_for("drained").await;
    assert_eq!(p.exit_code().await, 0);
    let logs = p.seen.join("\n");
    assert!(!logs.contains("panicked"), "{logs}");
}

#[tokio::test]
async fn sigint_also_drains_and_exits_zero() {
    let hub = support::hub().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client_secret");
    std::fs::write(&secret, "s\n").unwrap();
    let config = write_config(dir.path(), &hub, &secret, free_port(), free_port());
    let mut p = Proc::spawn(&["--config", config.to_str().unwrap()]);
    p.wait_for("token obtained").await;
    p.signal(Signal::SIGINT);
    assert_eq!(p.exit_code().await, 0);
}

#[tokio::test]
async fn port_in_use_is_a_runtime_failure_naming_the_key() {
    let hub = support::hub().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client_secret");
    std::fs::write(&secret, "s\n").unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = write_config(dir.path(), &hub, &secret, free_port(), port);
    let (code, _, err) = output(&["--config", config.to_str().unwrap()]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("integration[0].listen"), "{err}");
}

#[tokio::test]
async fn token_command_prints_lifetime_and_the_token_only_when_asked() {
    let hub = support::hub_with(HubOptions {
        client_id: Some("cli-client".into()),
        client_secret: Some("s".into()),
        ..HubOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client_secret");
    std::fs::write(&secret, "s\n").unwrap();
    let config = write_config(dir.path(), &hub, &secret, free_port(), free_port());
    let c = config.to_str().unwrap();

    let (code, out, err) = output(&["token", "--config", c, "--integration", "oms"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.is_empty(),
        "nothing on stdout without --show-token: {out}"
    );
    assert!(err.contains("lifetime"), "{err}");
    for token in hub.issued_tokens() {
        assert!(!err.contains(&token));
    }

    let (code, out, _) = output(&[
        "token",
        "--config",
        c,
        "--integration",
        "oms",
        "--show-token",
    ])
    .await;
    assert_eq!(code, 0);
    let printed = out.trim().to_string();
    assert!(
        hub.issued_tokens().contains(&printed),
        "stdout is the token alone: {out:?}"
    );

    std::fs::write(&secret, "wrong\n").unwrap();
    let (code, _, err) = output(&["token", "--config", c, "--integration", "oms"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("invalid_client"), "{err}");

    let (code, _, err) = output(&["token", "--config", c, "--integration", "nope"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("oms"),
        "names the integrations there are: {err}"
    );
}

#[tokio::test]
async fn check_prints_sources_never_values() {
    let hub = support::hub().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client_secret");
    std::fs::write(&secret, "canary-check-secret\n").unwrap();
    let config = write_config(dir.path(), &hub, &secret, free_port(), free_port());
    let (code, out, err) =
        output(&["check", "--config", config.to_str().unwrap(), "--fetch"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&secret.display().to_string()),
        "names the secret file: {out}"
    );
    assert!(out.contains("token obtained"), "{out}");
    assert!(!out.contains("canary-check-secret") && !err.contains("canary-check-secret"));
}

#[tokio::test]
async fn demo_sends_a_call_and_stops_on_sigint() {
    let mut p = Proc::spawn(&["demo"]);
    let line = p.wait_for("→ HTTP").await;
    assert!(line.contains("HTTP 200"), "{line}");
    p.wait_for("token_ok").await;
    p.wait_for("Ctrl-C").await;
    p.signal(Signal::SIGINT);
    assert_eq!(p.exit_code().await, 0);
    assert!(
        p.seen.iter().any(|l| l.contains("SIGINT: stopping")),
        "{}",
        p.seen.join("\n")
    );
    // The pointer beside the curl lines names a README section that exists.
    assert!(
        p.seen
            .iter()
            .any(|l| l.contains("\"Client recipes\" in README.md")),
        "{}",
        p.seen.join("\n")
    );
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    assert!(
        readme.contains("\n## Client recipes\n"),
        "README lacks the section"
    );
}

#[tokio::test]
async fn help_covers_every_command_and_the_readme_lists_them() {
    let (code, out, _) = output(&["--help"]).await;
    assert_eq!(code, 0);
    for command in [
        "check",
        "token",
        "demo",
        "--config",
        "--version",
        "Exit codes",
    ] {
        assert!(out.contains(command), "--help lacks {command}: {out}");
    }
    let (_, out, _) = output(&["token", "--help"]).await;
    for flag in ["--integration", "--show-token", "--config"] {
        assert!(out.contains(flag), "token --help lacks {flag}: {out}");
    }
    let (_, out, _) = output(&["check", "--help"]).await;
    assert!(out.contains("--fetch"), "{out}");
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    for line in [
        "tokengate check [--config PATH] [--fetch]",
        "tokengate token [--config PATH] --integration NAME [--show-token]",
        "tokengate demo",
        "tokengate --version",
    ] {
        assert!(readme.contains(line), "README lacks `{line}`");
    }
}

#[tokio::test]
async fn check_warns_about_literal_secrets_and_a_late_refresh() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.toml");
    std::fs::write(
        &path,
        "[[integration]]\nname = \"oms\"\nlisten = \"127.0.0.1:8081\"\nregion = \"eu2\"\nclient_id = \"id\"\nclient_secret = \"canary-literal\"\nttl = \"1m\"\nrefresh_at = 0.9\n",
    )
    .unwrap();
    let (code, out, err) = output(&["check", "--config", path.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("https://eu2-admin-api.bringg.com/oauth/token"),
        "{out}"
    );
    assert!(
        out.contains("warning: integration[0].client_secret"),
        "{out}"
    );
    assert!(out.contains("refresh_at = 0.9 leaves 6s"), "{out}");
    assert!(!out.contains("canary-literal") && !err.contains("canary-literal"));
}

#[tokio::test]
async fn token_failures_say_what_they_most_likely_mean() {
    let hub = support::hub().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client_secret");
    std::fs::write(&secret, "s\n").unwrap();
    let config = write_config(dir.path(), &hub, &secret, free_port(), free_port());
    let c = config.to_str().unwrap();

    hub.push_token_reply(tokengate::standin::TokenReply::Raw {
        status: 404,
        content_type: Some("text/html".into()),
        headers: vec![],
        body: "<html><title>Not Found</title></html>".into(),
    });
    let (code, _, err) = output(&["token", "--config", c, "--integration", "oms"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("404") && err.contains("region"), "{err}");

    hub.push_token_reply(tokengate::standin::TokenReply::Raw {
        status: 503,
        content_type: Some("application/json".into()),
        headers: vec![("retry-after".into(), "30".into())],
        body: r#"{"error":"temporarily_unavailable"}"#.into(),
    });
    let (code, _, err) = output(&["token", "--config", c, "--integration", "oms"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("503") && err.contains("temporarily_unavailable"),
        "{err}"
    );

    // A TLS endpoint whose CA tokengate does not know: the hint is ca_file.
    let ca = support::TestCa::new();
    let tls = support::tls_hub(&ca, &["localhost"]).await;
    let path = dir.path().join("tls.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nadmin_listen = \"127.0.0.1:{}\"\n[[integration]]\nname = \"oms\"\nlisten = \"127.0.0.1:{}\"\ntoken_url = \"{}\"\nclient_id = \"a\"\nclient_secret = {{ file = \"{}\" }}\n",
            free_port(),
            free_port(),
            tls.token_url(),
            secret.display()
        ),
    )
    .unwrap();
    let (code, _, err) = output(&[
        "token",
        "--config",
        path.to_str().unwrap(),
        "--integration",
        "oms",
    ])
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("TLS") && err.contains("ca_file"), "{err}");
}
