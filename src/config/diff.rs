//! What a reload changes: the pure comparison of the configuration that runs with a newly
//! loaded one. No I/O and no state: [`plan`] says which live keys each running integration
//! takes, matched by name, and which differences wait for a restart; `Running::reload`
//! applies the plan.
//!
//! "What runs" is the configuration tokengate started with, its live keys updated by every
//! reload since. Comparing with it rather than with the previous file means a file that drops
//! an integration and a later one that restores it end where they began: nothing to restart,
//! and the restored integration takes that file's live keys.

use std::collections::HashSet;
use std::time::Duration;

use crate::config::{Config, ProxySettings, TokenSettings};

/// The outcome of comparing what runs with a new configuration.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// One line per difference that takes effect only after a restart.
    pub restart: Vec<String>,
    /// Running integrations whose live keys change, in start order.
    pub integrations: Vec<IntegrationChange>,
    /// The new `server.shutdown_grace`, when it changed (read at shutdown).
    pub shutdown_grace: Option<Duration>,
}

/// The live keys one running integration takes from the new file.
#[derive(Debug, PartialEq)]
pub struct IntegrationChange {
    pub name: String,
    /// Upstream, timeouts, `allow_methods`, `max_replay_body`, `ca_file`, egress.
    pub proxy: Option<ProxySettings>,
    /// Credentials, `token_url`, `ttl`, `scope`, ... (a new token is fetched when needed).
    pub token: Option<TokenSettings>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.restart.is_empty() && self.integrations.is_empty() && self.shutdown_grace.is_none()
    }
}

/// Compares `running` (what runs) with `new` (a validated file).
pub fn plan(running: &Config, new: &Config) -> Plan {
    let mut plan = Plan::default();
    let (old_s, new_s) = (&running.server, &new.server);
    let mut restart = |changed: bool, key: &str| {
        if changed {
            plan.restart
                .push(format!("{key} changed; restart tokengate to apply it"));
        }
    };
    restart(
        old_s.admin_listen != new_s.admin_listen,
        "server.admin_listen",
    );
    restart(old_s.log_format != new_s.log_format, "server.log_format");
    // The listeners' HTTP/1 builders are made once at start.
    restart(
        old_s.header_read_timeout != new_s.header_read_timeout,
        "server.header_read_timeout",
    );
    restart(
        old_s.allow_remote_clients != new_s.allow_remote_clients,
        "server.allow_remote_clients",
    );
    // The Redis connection is made once at start; each integration's membership (fleet,
    // fleet_id, wait_for_peer, on_unavailable) is a token setting and applies live.
    match (&running.fleet, &new.fleet) {
        (None, Some(_)) => restart(true, "[fleet]"),
        (Some(_), None) => plan.restart.push(
            "[fleet] was removed: the integrations fetch their own tokens from now on; restart tokengate to close the Redis connection".into(),
        ),
        (Some(old), Some(new)) => {
            restart(old.redis_url.value != new.redis_url.value, "fleet.redis_url");
            restart(old.key_prefix != new.key_prefix, "fleet.key_prefix");
            restart(old.ca_file != new.ca_file, "fleet.ca_file");
        }
        (None, None) => {}
    }
    if old_s.shutdown_grace != new_s.shutdown_grace {
        plan.shutdown_grace = Some(new_s.shutdown_grace);
    }

    let running_names: HashSet<&str> = running
        .integrations
        .iter()
        .map(|i| i.name.as_str())
        .collect();
    let new_names: HashSet<&str> = new.integrations.iter().map(|i| i.name.as_str()).collect();
    for added in new
        .integrations
        .iter()
        .filter(|i| !running_names.contains(i.name.as_str()))
    {
        plan.restart.push(format!(
            "integration {} was added; restart tokengate to start it",
            added.name
        ));
    }
    for removed in running
        .integrations
        .iter()
        .filter(|i| !new_names.contains(i.name.as_str()))
    {
        plan.restart.push(format!(
            "integration {} is no longer in the file; it keeps serving until tokengate restarts",
            removed.name
        ));
    }
    let kept_order = |names: &HashSet<&str>, c: &Config| -> Vec<String> {
        c.integrations
            .iter()
            .filter(|i| names.contains(i.name.as_str()))
            .map(|i| i.name.clone())
            .collect()
    };
    let (before, after) = (
        kept_order(&new_names, running),
        kept_order(&running_names, new),
    );
    if before != after {
        plan.restart.push(format!(
            "integrations were reordered ({} → {}); the order takes effect (metrics, /status) after a restart",
            before.join(", "),
            after.join(", ")
        ));
    }

    for old in &running.integrations {
        let Some(new) = new.integrations.iter().find(|n| n.name == old.name) else {
            continue;
        };
        if old.listen != new.listen {
            plan.restart.push(format!(
                "integration {}: listen changed ({} → {}); restart tokengate to apply it",
                old.name, old.listen, new.listen
            ));
        }
        let proxy = (old.proxy != new.proxy).then(|| new.proxy.clone());
        let token = (old.token != new.token).then(|| new.token.clone());
        if proxy.is_some() || token.is_some() {
            plan.integrations.push(IntegrationChange {
                name: old.name.clone(),
                proxy,
                token,
            });
        }
    }
    plan
}

/// What runs after `plan` was applied to `running`: its live keys from the new file, the
/// rest as it was started.
pub fn applied(running: &Config, plan: &Plan) -> Config {
    let mut next = running.clone();
    if let Some(grace) = plan.shutdown_grace {
        next.server.shutdown_grace = grace;
    }
    for change in &plan.integrations {
        if let Some(i) = next.integrations.iter_mut().find(|i| i.name == change.name) {
            if let Some(proxy) = &change.proxy {
                i.proxy = proxy.clone();
            }
            if let Some(token) = &change.token {
                i.token = token.clone();
            }
        }
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A configuration with the named integrations in the order given, each on its own fixed
    /// port; lines of `extra` prefixed `name:` go to that integration, `server:` to `[server]`.
    fn config(names: &[&str], extra: &str) -> Config {
        let mut text = String::from("[server]\nadmin_listen = \"127.0.0.1:9464\"\n");
        for line in extra.lines() {
            if let Some(server) = line.strip_prefix("server:") {
                text.push_str(server.trim());
                text.push('\n');
            }
        }
        let fleet: Vec<&str> = extra
            .lines()
            .filter_map(|l| l.strip_prefix("fleet:"))
            .collect();
        if !fleet.is_empty() {
            text.push_str("[fleet]\n");
            for line in fleet {
                text.push_str(line.trim());
                text.push('\n');
            }
        }
        for (i, name) in names.iter().enumerate() {
            let port = 8081
                + ["oms", "wms", "billing"]
                    .iter()
                    .position(|n| n == name)
                    .unwrap_or(i);
            text.push_str(&format!(
                "[[integration]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\ntoken_url = \"http://127.0.0.1:1/oauth/token\"\nupstream = \"http://127.0.0.1:2\"\nclient_id = \"id-{name}\"\n"
            ));
            if !extra.contains(&format!("{name}: client_secret")) {
                text.push_str(&format!("client_secret = \"secret-{name}\"\n"));
            }
            for line in extra.lines() {
                if let Some(rest) = line.strip_prefix(&format!("{name}:")) {
                    text.push_str(rest.trim());
                    text.push('\n');
                }
            }
        }
        Config::from_str(&text, Path::new("test.toml")).unwrap()
    }

    fn names(plan: &Plan) -> Vec<&str> {
        plan.integrations.iter().map(|c| c.name.as_str()).collect()
    }

    #[test]
    fn the_same_file_changes_nothing() {
        let c = config(&["oms", "wms"], "");
        assert!(plan(&c, &c).is_empty());
    }

    #[test]
    fn table() {
        struct Case {
            what: &'static str,
            running: Config,
            new: Config,
            restart: &'static [&'static str],
            live: &'static [&'static str],
        }
        let cases = [
            Case {
                what: "an integration removed: it keeps serving, nothing applies",
                running: config(&["oms", "wms"], ""),
                new: config(&["oms"], ""),
                restart: &["integration wms is no longer in the file"],
                live: &[],
            },
            Case {
                what: "removed and restored in one step: nothing at all",
                running: config(&["oms", "wms"], ""),
                new: config(&["oms", "wms"], ""),
                restart: &[],
                live: &[],
            },
            Case {
                what: "an integration added",
                running: config(&["oms"], ""),
                new: config(&["oms", "wms"], ""),
                restart: &["integration wms was added"],
                live: &[],
            },
            Case {
                what: "renamed: one removed, one added",
                running: config(&["oms"], ""),
                new: config(&["billing"], ""),
                restart: &[
                    "integration billing was added",
                    "integration oms is no longer in the file",
                ],
                live: &[],
            },
            Case {
                what: "reordered, with a live change that applies by name",
                running: config(&["oms", "wms"], ""),
                new: config(&["wms", "oms"], "oms: ttl = \"10m\""),
                restart: &["integrations were reordered (oms, wms → wms, oms)"],
                live: &["oms"],
            },
            Case {
                what: "removed one, changed the other's secret",
                running: config(&["oms", "wms"], ""),
                new: config(&["wms"], "wms: allow_methods = [\"GET\"]"),
                restart: &["integration oms is no longer in the file"],
                live: &["wms"],
            },
            Case {
                what: "listen and server keys need a restart",
                running: config(&["oms"], ""),
                new: config(&["oms"], "server:log_format = \"json\""),
                restart: &["server.log_format changed"],
                live: &[],
            },
            Case {
                what: "[fleet] added: needs a restart; the members' settings change live",
                running: config(&["oms"], ""),
                new: config(&["oms"], "fleet:redis_url = \"redis://127.0.0.1:6379\""),
                restart: &["[fleet] changed"],
                live: &["oms"],
            },
            Case {
                what: "redis_url and key_prefix need a restart, wait_for_peer applies live",
                running: config(&["oms"], "fleet:redis_url = \"redis://127.0.0.1:6379\""),
                new: config(
                    &["oms"],
                    "fleet:redis_url = \"redis://10.0.0.9:6379\"\nfleet:key_prefix = \"tg\"\nfleet:wait_for_peer = \"1s\"",
                ),
                restart: &["fleet.redis_url changed", "fleet.key_prefix changed"],
                live: &["oms"],
            },
            Case {
                what: "[fleet] removed: members leave live, the connection stays until restart",
                running: config(&["oms"], "fleet:redis_url = \"redis://127.0.0.1:6379\""),
                new: config(&["oms"], ""),
                restart: &["[fleet] was removed"],
                live: &["oms"],
            },
            Case {
                what: "one integration opts out live",
                running: config(&["oms", "wms"], "fleet:redis_url = \"redis://127.0.0.1:6379\""),
                new: config(
                    &["oms", "wms"],
                    "fleet:redis_url = \"redis://127.0.0.1:6379\"\nwms: fleet = false",
                ),
                restart: &[],
                live: &["wms"],
            },
        ];
        for case in &cases {
            let p = plan(&case.running, &case.new);
            assert_eq!(
                p.restart.len(),
                case.restart.len(),
                "{}: {:?}",
                case.what,
                p.restart
            );
            for (line, want) in p.restart.iter().zip(case.restart) {
                assert!(line.starts_with(want), "{}: {line:?}", case.what);
            }
            assert_eq!(names(&p), case.live, "{}", case.what);
        }
    }

    #[test]
    fn a_changed_listen_needs_a_restart_and_its_live_keys_still_apply() {
        let running = config(&["oms"], "");
        let mut new = config(&["oms"], "oms: ttl = \"10m\"");
        new.integrations[0].listen = "127.0.0.1:9999".parse().unwrap();
        let p = plan(&running, &new);
        assert_eq!(p.restart.len(), 1);
        assert!(p.restart[0].contains("listen changed"), "{:?}", p.restart);
        assert_eq!(names(&p), ["oms"]);
        assert!(p.integrations[0].token.is_some());
        assert!(p.integrations[0].proxy.is_none());
    }

    /// Applying a plan and planning again against the same file finds only what needs a
    /// restart: the live keys are in force.
    #[test]
    fn applied_then_planned_again_leaves_only_restart_lines() {
        let running = config(&["oms", "wms"], "");
        let new = config(
            &["wms", "billing"],
            "wms: request_timeout = \"5s\"\nwms: client_secret = \"rotated\"\nserver:shutdown_grace = \"3s\"",
        );
        let p = plan(&running, &new);
        assert_eq!(p.shutdown_grace, Some(Duration::from_secs(3)));
        let now = applied(&running, &p);
        assert_eq!(now.integrations.len(), 2, "what runs keeps both");
        assert_eq!(now.integrations[1].token, new.integrations[0].token);
        assert_eq!(now.integrations[1].proxy, new.integrations[0].proxy);
        assert_eq!(now.integrations[0], running.integrations[0]);
        let again = plan(&now, &new);
        assert!(again.integrations.is_empty() && again.shutdown_grace.is_none());
        assert_eq!(again.restart, p.restart);
    }
}
