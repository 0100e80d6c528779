//! Fuzzes request-target handling: the input as hyper's `Uri` would parse it, then
//! `check_absolute_form` and the upstream URI built from it
//! (`tokengate::proxy::hygiene::upstream_uri`), against three upstreams; the invariants of
//! `../checks.rs` (never a URI for anyone but the upstream).
#![no_main]

#[path = "../checks.rs"]
mod checks;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static UPSTREAMS: OnceLock<Vec<checks::Upstream>> = OnceLock::new();
    checks::request_target(data, UPSTREAMS.get_or_init(checks::upstreams));
});
