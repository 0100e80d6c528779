//! Secrets: [`Secret`], a value that cannot be printed, and [`SecretSource`], where one comes
//! from (a literal, `{ env = "NAME" }` or `{ file = "PATH" }`) and how it is read now.
//!
//! [`SecretSource::resolve`] runs at load time and again in the refresher when a mounted file
//! changes, so its errors name the key but no position in the config file (the loader adds
//! one). Deliberately no file watching, no caching and no `Serialize`: [`Secret::expose`] is
//! the only way to the value, so a grep for it audits every use.

use std::fmt;
use std::path::{Path, PathBuf};

use super::diagnose::process_user;
use super::ConfigError;

/// A secret value (client id, client secret, proxy credentials, a token). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The only way to read the value; grep for `expose` to audit every use.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where a secret comes from. `Debug` of `Literal` is redacted (via [`Secret`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    Literal(Secret),
    Env(String),
    /// Already joined with the config file's directory when written as a relative path.
    File(PathBuf),
}

/// Secrets are short; a cap keeps a path pointing at `/dev/zero` or a huge file (read again
/// every 2 s by the refresher) from exhausting memory.
const MAX_SECRET_FILE: u64 = 64 * 1024;

fn read_secret_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_SECRET_FILE + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_SECRET_FILE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "larger than {} KiB; this is not a secret",
                MAX_SECRET_FILE / 1024
            ),
        ));
    }
    Ok(text)
}

impl SecretSource {
    /// Reads the secret now (env var or file; trailing `\n`/`\r\n` is trimmed).
    /// `key` is the key path used in the error (`integration[0].client_secret`).
    ///
    /// The error message starts with `key`; the caller puts the file name in front
    /// ([`Config::load`] does), because a re-read on file change has no config position.
    ///
    /// [`Config::load`]: super::Config::load
    pub fn resolve(&self, key: &str) -> Result<Secret, ConfigError> {
        let value = match self {
            SecretSource::Literal(secret) => {
                if secret.expose().is_empty() {
                    return Err(ConfigError::new(format!(
                        "{key}: the secret is an empty string; write the value, or better \
                         {{ file = \"PATH\" }} or {{ env = \"NAME\" }}"
                    )));
                }
                return Ok(secret.clone());
            }
            SecretSource::Env(name) => match std::env::var(name) {
                // A Kubernetes Secret made from a file often ends in a newline, and
                // `secretKeyRef` hands it over verbatim; nobody means that newline.
                Ok(value) => trim_line_end(value),
                Err(std::env::VarError::NotPresent) => {
                    return Err(ConfigError::new(format!(
                        "{key}: environment variable {name} is not set; set {name} in \
                         tokengate's environment, or point {key} at a file with \
                         {{ file = \"PATH\" }}"
                    )));
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(ConfigError::new(format!(
                        "{key}: environment variable {name} is not valid UTF-8; \
                         set it to the secret as text"
                    )));
                }
            },
            SecretSource::File(path) => match read_secret_file(path) {
                // Editors and `echo` add a final newline; the secret never contains one.
                Ok(value) => trim_line_end(value),
                Err(e) => {
                    return Err(ConfigError::new(format!(
                        "{key}: cannot read secret file {}: {e} (tokengate runs as {}); \
                         create the file, correct the path, or make it readable by that user",
                        path.display(),
                        process_user()
                    )));
                }
            },
        };
        if value.is_empty() {
            let what = match self {
                SecretSource::Env(name) => format!("environment variable {name} is empty"),
                SecretSource::File(path) => format!("secret file {} is empty", path.display()),
                SecretSource::Literal(_) => "the secret is empty".to_owned(),
            };
            return Err(ConfigError::new(format!(
                "{key}: {what}; put the secret in it"
            )));
        }
        Ok(Secret(value))
    }
    /// Human description for `check` and logs: `literal`, `env TOKENGATE_OMS_SECRET`,
    /// `file /var/run/...`. Never the value.
    pub fn describe(&self) -> String {
        match self {
            SecretSource::Literal(_) => "literal".to_owned(),
            SecretSource::Env(name) => format!("env {name}"),
            SecretSource::File(path) => format!("file {}", path.display()),
        }
    }
}

fn trim_line_end(mut value: String) -> String {
    let kept = value.trim_end_matches(['\r', '\n']).len();
    value.truncate(kept);
    value
}

/// A secret together with where it came from (so it can be re-read on reload / file change).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedSecret {
    pub source: SecretSource,
    pub value: Secret,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn trims_only_line_ends() {
        assert_eq!(trim_line_end("s3cret\r\n".to_owned()), "s3cret");
        assert_eq!(trim_line_end("s3cret\n\n".to_owned()), "s3cret");
        assert_eq!(trim_line_end(" s3cret ".to_owned()), " s3cret ");
    }
}
