//! Fuzzes the token-response parser (`tokengate::token::client::parse_response`): a status,
//! a Content-Type and a body from the input, the invariants of `../checks.rs`.
#![no_main]

#[path = "../checks.rs"]
mod checks;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (status, content_type, body) = checks::split_token_input(data);
    checks::token_response(status, &content_type, body);
});
