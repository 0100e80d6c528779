//! Reload by name against the running system: random sequences of configuration files —
//! valid and invalid, integrations added, removed, renamed and reordered, secrets and live
//! keys changed — applied through `Running::reload_file` (the SIGHUP path). Whatever the
//! sequence, every integration tokengate started with keeps serving, and each one runs with
//! the live keys of the last valid file that named it. (The built binary's SIGHUP sequence
//! is in `tests/cli.rs`; the pure plan's table tests in `src/config/diff.rs`.)
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use proptest::prelude::*;
use tokengate::config::Config;
use tokengate::standin::Hub;
use tokengate::{Listeners, Running};

/// The names a file may use: the two started with, and two that never run.
const NAMES: [&str; 4] = ["oms", "wms", "billing", "edi"];

/// One integration as a file writes it: its live keys.
#[derive(Clone, Debug)]
struct Entry {
    name: usize,
    request_timeout: u64,
    get_only: bool,
    secret: u8,
}

/// One file of the sequence.
#[derive(Clone, Debug)]
enum File {
    Valid(Vec<Entry>),
    /// Fails validation; must be rejected whole.
    Invalid(&'static str),
}

fn entry(name: usize) -> impl Strategy<Value = Entry> {
    (
        prop_oneof![Just(5u64), Just(30), Just(60)],
        any::<bool>(),
        0u8..3,
    )
        .prop_map(move |(request_timeout, get_only, secret)| Entry {
            name,
            request_timeout,
            get_only,
            secret,
        })
}

fn file() -> impl Strategy<Value = File> {
    let valid = proptest::sample::subsequence(vec![0usize, 1, 2, 3], 1..=4)
        .prop_flat_map(|names| {
            let entries: Vec<_> = names.into_iter().map(entry).collect();
            (entries, any::<bool>())
        })
        .prop_map(|(mut entries, reverse)| {
            if reverse {
                entries.reverse();
            }
            File::Valid(entries)
        });
    prop_oneof![
        4 => valid,
        1 => prop_oneof![
            Just(File::Invalid("[[integration]]\nname = 3\n")),
            Just(File::Invalid("[server]\nbogus = 1\n")),
            Just(File::Invalid("not toml at all [[")),
        ],
    ]
}

/// The file text: `ports` are the started integrations' addresses; the others get ports that
/// nothing binds (adding them needs a restart).
fn render(entries: &[Entry], admin: SocketAddr, ports: &[SocketAddr; 2], hub: &Hub) -> String {
    let mut text = format!("[server]\nadmin_listen = \"{admin}\"\nshutdown_grace = \"2s\"\n");
    for e in entries {
        let name = NAMES[e.name];
        let listen = match e.name {
            0 | 1 => ports[e.name].to_string(),
            n => format!("127.0.0.1:{}", 1 + n),
        };
        text.push_str(&format!(
            "[[integration]]\nname = \"{name}\"\nlisten = \"{listen}\"\ntoken_url = \"{}\"\nupstream = \"{}\"\nclient_id = \"id-{name}\"\nclient_secret = \"secret-{name}-{}\"\nrequest_timeout = \"{}s\"\n",
            hub.token_url(),
            hub.base_url(),
            e.secret,
            e.request_timeout,
        ));
        if e.get_only {
            text.push_str("allow_methods = [\"GET\"]\n");
        }
    }
    text
}

/// Asserts that `oms` and `wms` answer and run with the live keys of `expected` (the last
/// valid file that named each).
async fn check_serving(running: &Running, ports: &[SocketAddr; 2], expected: &[Config; 2]) {
    let client = support::client();
    for (i, port) in ports.iter().enumerate() {
        let name = NAMES[i];
        let want = expected[i]
            .integrations
            .iter()
            .find(|x| x.name == name)
            .unwrap();
        let runs = running
            .config()
            .integrations
            .iter()
            .find(|x| x.name == name)
            .unwrap_or_else(|| panic!("{name} no longer runs"));
        assert_eq!(runs.proxy, want.proxy, "{name}: proxy keys");
        assert_eq!(runs.token, want.token, "{name}: token keys");
        let get = client
            .get(format!("http://{port}/v2/orders"))
            .send()
            .await
            .unwrap();
        assert_eq!(get.status(), 200, "{name} serves");
        let post = client
            .post(format!("http://{port}/v2/orders"))
            .body("x")
            .send()
            .await
            .unwrap();
        let get_only = want.proxy.allow_methods.is_some();
        assert_eq!(
            post.status(),
            if get_only { 405 } else { 200 },
            "{name}: allow_methods in force"
        );
    }
}

async fn sequence(files: Vec<File>) {
    let hub = support::hub().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokengate.toml");
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let admin = tokengate::listen(any).unwrap();
    let listeners = [
        tokengate::listen(any).unwrap(),
        tokengate::listen(any).unwrap(),
    ];
    let admin_addr = admin.local_addr().unwrap();
    let ports = [
        listeners[0].local_addr().unwrap(),
        listeners[1].local_addr().unwrap(),
    ];
    let start = |secret| Entry {
        name: 0,
        request_timeout: 60,
        get_only: false,
        secret,
    };
    let first = vec![
        start(0),
        Entry {
            name: 1,
            ..start(0)
        },
    ];
    std::fs::write(&path, render(&first, admin_addr, &ports, &hub)).unwrap();
    let config = Config::load(&path).unwrap();
    let mut expected = [config.clone(), config.clone()];
    let [l0, l1] = listeners;
    let mut running = tokengate::start(
        config,
        Listeners {
            admin,
            integrations: vec![l0, l1],
        },
    )
    .await
    .unwrap();

    for file in &files {
        match file {
            File::Valid(entries) => {
                std::fs::write(&path, render(entries, admin_addr, &ports, &hub)).unwrap();
                assert!(running.reload_file(), "{file:?}");
                let now = Config::load(&path).unwrap();
                for (i, slot) in expected.iter_mut().enumerate() {
                    if entries.iter().any(|e| e.name == i) {
                        *slot = now.clone();
                    }
                }
            }
            File::Invalid(text) => {
                std::fs::write(&path, text).unwrap();
                assert!(!running.reload_file(), "{text:?} must be rejected");
            }
        }
        check_serving(&running, &ports, &expected).await;
    }

    // The live path still reaches each refresher by name: a new secret is fetched with.
    let last = vec![
        Entry {
            name: 1,
            secret: 9,
            ..start(0)
        },
        Entry {
            name: 0,
            secret: 9,
            ..start(0)
        },
    ];
    std::fs::write(&path, render(&last, admin_addr, &ports, &hub)).unwrap();
    assert!(running.reload_file());
    for name in ["oms", "wms"] {
        let secret = format!("secret-{name}-9");
        support::eventually(
            &format!("{name} fetches with its new secret"),
            Duration::from_secs(10),
            || {
                let seen = hub.token_requests().iter().any(|r| {
                    r.params.get("client_secret") == Some(&secret)
                        && r.params.get("client_id").map(String::as_str)
                            == Some(&format!("id-{name}"))
                });
                async move { seen.then_some(()) }
            },
        )
        .await;
    }
    running.shutdown(Duration::from_secs(2)).await;
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 12,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_reload_sequence_keeps_every_started_integration_serving_with_the_last_valid_keys(
        files in proptest::collection::vec(file(), 1..7)
    ) {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(sequence(files));
    }
}

/// The sequence that crashed the process before reload went by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_then_restoring_an_integration_keeps_both_serving() {
    let e = |name, secret| Entry {
        name,
        request_timeout: 30,
        get_only: false,
        secret,
    };
    sequence(vec![
        File::Valid(vec![e(0, 1)]),
        File::Valid(vec![e(0, 1), e(1, 2)]),
        File::Valid(vec![e(1, 0), e(0, 0)]),
    ])
    .await;
}
