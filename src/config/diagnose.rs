//! From a byte span to what an error message needs: `line:column`, the key path with array
//! indices (`integration[1].ttl`), and a suggestion (the key that was probably meant, the table
//! a key belongs in, how to write a value of the right type); also who tokengate runs as, for
//! files it cannot read.
//!
//! How errors find their place: the text is parsed once into toml's spanned tree
//! ([`toml::de::DeTable`]), and the raw structs are deserialized from it with
//! [`toml::Spanned`] leaves. A serde error carries a byte span; looking that span up in the
//! spanned tree gives the key path with array indices, which serde's own error does not have.
//! Validation errors use the spans kept in the raw structs.
//!
//! Deliberately no rules about what is valid (that is `validate`), and never a secret in a
//! message: at a secret key, the value serde quotes is dropped.

use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::{INTEGRATION_KEYS, SERVER_KEYS};

/// `uid 1000 (alice)` for messages about unreadable files: "permission denied" is only
/// actionable when you know which user was denied. Read from `/proc` because the crate
/// forbids `unsafe` (so no `geteuid`) and adds no dependency for this.
pub(super) fn process_user() -> String {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                // Real, effective, saved, filesystem: the effective uid decides access.
                .and_then(|ids| ids.split_whitespace().nth(1))
                .map(str::to_owned)
        });
    let name_from_passwd = uid.as_deref().and_then(|uid| {
        let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
        passwd.lines().find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let entry_uid = fields.nth(1)?;
            (entry_uid == uid).then(|| name.to_owned())
        })
    });
    let name = name_from_passwd.or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()));
    match (uid, name) {
        (Some(uid), Some(name)) => format!("uid {uid} ({name})"),
        (Some(uid), None) => format!("uid {uid}"),
        (None, Some(name)) => format!("user {name}"),
        (None, None) => "an unknown user".to_owned(),
    }
}

/// A TOML syntax error in our words: `(span, what is wrong; what to write)`.
pub(super) fn syntax_error(text: &str, e: &toml::de::Error) -> (Option<Range<usize>>, String) {
    let span = e.span();
    let spanned_text = span
        .as_ref()
        .and_then(|span| text.get(span.clone()))
        .filter(|t| !t.is_empty() && t.len() <= 100 && !t.contains('\n'));
    let line = span
        .as_ref()
        .and_then(|span| {
            let start = text.get(..span.start)?.rfind('\n').map_or(0, |i| i + 1);
            text.get(start..)?.lines().next()
        })
        .unwrap_or_default();
    let what = match e.message() {
        "duplicate key" => match spanned_text {
            Some(table) if line.trim_start().starts_with('[') => {
                format!("table `{table}` is already defined above; merge the two into one")
            }
            Some(key) => format!("`{key}` is already defined in this table; keep one"),
            None => "this key is already defined in this table; keep one".to_owned(),
        },
        message => {
            let mut what = format!("invalid TOML: {message}");
            if let Some(example) = quoted_example(line) {
                what.push_str(&format!("; strings need quotes: {example}"));
            }
            what
        }
    };
    (span, what)
}

/// A serde error on the raw structs, with the key path serde's own error lacks:
/// `(span, key path, what is wrong; what to write)`.
pub(super) fn serde_error(
    e: &toml::de::Error,
    root: &DeTable<'_>,
) -> (Option<Range<usize>>, String, String) {
    let span = e.span();
    let path = span
        .as_ref()
        .map(|span| locate(root, span.start))
        .unwrap_or_default();
    let key = render_path(&path);
    let mut message = plain_type_names(e.message());
    if let (_, Some(key)) = section_and_key(&path) {
        if SECRET_KEYS.contains(&key) {
            message = without_unexpected_value(&message);
        }
    }
    let what = match message.strip_prefix("unknown field ") {
        Some(rest) => unknown_key(rest, &path),
        None => match type_hint(&path) {
            Some(hint) => format!("{message}; {hint}"),
            None => message,
        },
    };
    (span, key, what)
}

/// For `log_format = text`, the most common TOML mistake: `log_format = "text"`.
fn quoted_example(line: &str) -> Option<String> {
    let (key, value) = line.split_once('=')?;
    let key = key.trim();
    let value = value.split('#').next().unwrap_or_default().trim();
    let bare_word = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.:/".contains(&b))
    };
    let is_literal = value.parse::<f64>().is_ok() || value == "true" || value == "false";
    if !bare_word(key) || !bare_word(value) || is_literal {
        return None;
    }
    let shown = if SECRET_KEYS.contains(&key) {
        "..."
    } else {
        value
    };
    Some(format!("{key} = \"{shown}\""))
}
/// 1-based line and column (in characters) of a byte offset.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let bytes = text.as_bytes();
    let offset = offset.min(bytes.len());
    let before = &bytes[..offset];
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    let column = String::from_utf8_lossy(&bytes[line_start..offset])
        .chars()
        .count()
        + 1;
    (line, column)
}

#[derive(Clone, Debug, PartialEq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// The key path of the innermost key or value whose span holds `offset`. Container spans
/// are not trusted (an `[[integration]]` element's span covers only its header), so every
/// key and value is visited and the narrowest match wins.
fn locate(root: &DeTable<'_>, offset: usize) -> Vec<Segment> {
    let mut best: Option<(usize, Vec<Segment>)> = None;
    let mut path = Vec::new();
    locate_in_table(root, offset, &mut path, &mut best);
    best.map(|(_, path)| path).unwrap_or_default()
}

fn consider(
    span: Range<usize>,
    offset: usize,
    path: &[Segment],
    best: &mut Option<(usize, Vec<Segment>)>,
) {
    let hit = span.start == offset || (span.start <= offset && offset < span.end);
    if !hit {
        return;
    }
    let width = span.end.saturating_sub(span.start);
    let better = match best {
        None => true,
        Some((best_width, best_path)) => {
            width < *best_width || (width == *best_width && path.len() > best_path.len())
        }
    };
    if better {
        *best = Some((width, path.to_vec()));
    }
}

fn locate_in_table(
    table: &DeTable<'_>,
    offset: usize,
    path: &mut Vec<Segment>,
    best: &mut Option<(usize, Vec<Segment>)>,
) {
    for (key, value) in table.iter() {
        path.push(Segment::Key(key.get_ref().to_string()));
        consider(key.span(), offset, path, best);
        locate_in_value(value, offset, path, best);
        path.pop();
    }
}

fn locate_in_value(
    value: &Spanned<DeValue<'_>>,
    offset: usize,
    path: &mut Vec<Segment>,
    best: &mut Option<(usize, Vec<Segment>)>,
) {
    consider(value.span(), offset, path, best);
    match value.get_ref() {
        DeValue::Table(table) => locate_in_table(table, offset, path, best),
        DeValue::Array(array) => {
            for (i, item) in array.iter().enumerate() {
                path.push(Segment::Index(i));
                locate_in_value(item, offset, path, best);
                path.pop();
            }
        }
        _ => {}
    }
}

fn render_path(path: &[Segment]) -> String {
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                let bare = !key.is_empty()
                    && key
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if bare {
                    out.push_str(key);
                } else {
                    out.push_str(&format!("{key:?}"));
                }
            }
            Segment::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Which table a path is in, and the key within it: `("integration", "ttl")`.
fn section_and_key(path: &[Segment]) -> (Option<&str>, Option<&str>) {
    let key_at = |i: usize| match path.get(i) {
        Some(Segment::Key(k)) => Some(k.as_str()),
        _ => None,
    };
    match key_at(0) {
        Some("integration") => match path.get(1) {
            Some(Segment::Index(_)) => (Some("integration"), key_at(2)),
            _ => (None, Some("integration")),
        },
        Some(section @ ("server" | "defaults")) if path.len() > 1 => (Some(section), key_at(1)),
        top => (None, top),
    }
}

fn section_label(section: Option<&str>) -> &'static str {
    match section {
        Some("server") => "[server]",
        Some("defaults") => "[defaults]",
        Some("integration") => "[[integration]]",
        _ => "the top level",
    }
}

/// Keys whose values are secrets: an error must not quote what was written there, even
/// when it was written wrongly (`client_secret = 12345678` is still the secret).
const SECRET_KEYS: &[&str] = &["client_id", "client_secret", "egress_proxy_auth"];

/// `invalid type: integer `12345678`, expected ...` → `invalid type: integer, expected ...`.
fn without_unexpected_value(message: &str) -> String {
    let is_value_error =
        message.starts_with("invalid type: ") || message.starts_with("invalid value: ");
    let Some(open) = message.find(" `").filter(|_| is_value_error) else {
        return message.to_owned();
    };
    match message[open + 2..].find('`') {
        Some(close) => format!("{}{}", &message[..open], &message[open + 2 + close + 1..]),
        None => message.to_owned(),
    }
}

/// serde names the Rust type it wanted (`struct RawServer`, `a sequence`); say it in TOML.
fn plain_type_names(message: &str) -> String {
    let mut out = message.replace("a sequence", "an array");
    for raw in ["RawFile", "RawServer", "RawSettings"] {
        out = out.replace(&format!("struct {raw}"), "a table");
    }
    out
}

/// Turns serde's "unknown field `x`, expected one of `a`, `b`" (the part after "unknown
/// field ") into a message with a suggestion.
fn unknown_key(rest: &str, path: &[Segment]) -> String {
    let mut quoted = rest.split('`').skip(1).step_by(2);
    let unknown = quoted.next().unwrap_or_default();
    let expected: Vec<&str> = quoted.collect();
    let (section, _) = section_and_key(path);
    let place = section_label(section);
    if let Some(best) = closest(unknown, &expected) {
        return format!("unknown key `{unknown}` in {place}; did you mean `{best}`?");
    }
    let elsewhere = match section {
        Some("server") if INTEGRATION_KEYS.contains(&unknown) => {
            Some("it belongs in [[integration]] or [defaults]".to_owned())
        }
        Some("integration" | "defaults") if SERVER_KEYS.contains(&unknown) => {
            Some("it belongs in [server]".to_owned())
        }
        None if SERVER_KEYS.contains(&unknown) => Some(
            "it belongs in [server]; keys above the first [table] header are top-level".to_owned(),
        ),
        None if INTEGRATION_KEYS.contains(&unknown) => Some(
            "it belongs inside an [[integration]] table or [defaults]; keys above the first \
             [table] header are top-level"
                .to_owned(),
        ),
        _ => None,
    };
    match elsewhere {
        Some(hint) => format!("unknown key `{unknown}` in {place}; {hint}"),
        None if expected.is_empty() => format!("unknown key `{unknown}` in {place}; remove it"),
        None => format!(
            "unknown key `{unknown}` in {place}; valid keys here: {}",
            expected.join(", ")
        ),
    }
}

/// The candidate nearest to `word`, if it is near enough to be a typo: up to 1 edit for
/// short words, 2 for medium, 3 for long ones (`client_secrte` is 1 edit from `client_secret`
/// counting a transposition as one).
fn closest<'c>(word: &str, candidates: &[&'c str]) -> Option<&'c str> {
    let normalized = word.to_ascii_lowercase().replace('-', "_");
    candidates
        .iter()
        .map(|c| (edit_distance(&normalized, c), *c))
        .filter(|(d, c)| {
            let limit = match c.len().min(word.len()) {
                0..=3 => 1,
                4..=7 => 2,
                _ => 3,
            };
            *d <= limit
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Optimal string alignment distance: insertions, deletions, substitutions and adjacent
/// transpositions each cost 1.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let width = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * width];
    for i in 0..=a.len() {
        d[i * width] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(width) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[(i - 1) * width + j] + 1)
                .min(d[i * width + j - 1] + 1)
                .min(d[(i - 1) * width + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[(i - 2) * width + j - 2] + 1);
            }
            d[i * width + j] = best;
        }
    }
    d[a.len() * width + b.len()]
}

/// What to write instead, for a value of the wrong type at `path`.
fn type_hint(path: &[Segment]) -> Option<String> {
    let (section, key) = section_and_key(path);
    let key = key?;
    let nested = match section {
        Some("integration") => path.len() > 3,
        Some(_) => path.len() > 2,
        None => path.len() > 1,
    };
    let hint = match (section, key) {
        (None, "server") => "write it as a table: [server]".to_owned(),
        (None, "defaults") => "write it as a table: [defaults]".to_owned(),
        (None, "integration") => {
            "write one [[integration]] table (double brackets) per integration".to_owned()
        }
        (_, "extra_params") if nested => {
            "extra_params values are strings; quote the value".to_owned()
        }
        (_, "extra_params") => {
            "write a table of strings, e.g. extra_params = { audience = \"api\" }".to_owned()
        }
        (_, "allow_methods") => {
            "write a list of method names, e.g. allow_methods = [\"GET\", \"POST\"]".to_owned()
        }
        (
            _,
            "shutdown_grace"
            | "header_read_timeout"
            | "ttl"
            | "assume_lifetime"
            | "token_timeout"
            | "connect_timeout"
            | "request_timeout",
        ) => format!("write a duration string, e.g. {key} = \"30s\""),
        (_, "admin_listen" | "listen") => {
            format!("write an address string, e.g. {key} = \"127.0.0.1:8081\"")
        }
        (_, "allow_remote_clients") => format!("write {key} = true or {key} = false"),
        (_, "refresh_at") => format!("write a number between 0 and 1, e.g. {key} = 0.8"),
        // serde's message already ends in "expected <the forms>" from our own visitors.
        (_, "max_replay_body" | "client_id" | "client_secret" | "egress_proxy_auth") => {
            return None
        }
        (Some(_), other) => format!("write a string, e.g. {other} = \"...\""),
        (None, _) => return None,
    };
    Some(hint)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_transpositions_once() {
        assert_eq!(edit_distance("client_secrte", "client_secret"), 1);
        assert_eq!(edit_distance("ttl", "ttl"), 0);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("upstrem", "upstream"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn closest_suggests_only_near_keys() {
        assert_eq!(
            closest("client_secrte", INTEGRATION_KEYS),
            Some("client_secret")
        );
        assert_eq!(
            closest("Client-Secret", INTEGRATION_KEYS),
            Some("client_secret")
        );
        assert_eq!(closest("refresh", INTEGRATION_KEYS), None);
        assert_eq!(closest("tll", INTEGRATION_KEYS), Some("ttl"));
        assert_eq!(closest("banana", INTEGRATION_KEYS), None);
    }

    #[test]
    fn line_and_column_are_one_based_in_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        // "bé = " is 6 bytes but 5 characters.
        assert_eq!(line_col(text, 12), (2, 6));
        assert_eq!(line_col(text, 999), (3, 1));
    }

    #[test]
    fn locate_finds_array_indices() {
        let text = "[[integration]]\nname = \"a\"\n[[integration]]\nname = \"b\"\nttl = 5\n";
        let root = DeTable::parse(text).unwrap();
        let offset = text.find("5").unwrap();
        let path = locate(root.get_ref(), offset);
        assert_eq!(render_path(&path), "integration[1].ttl");
    }
}
