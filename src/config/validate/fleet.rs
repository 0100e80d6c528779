//! `[fleet]` and each integration's membership (`fleet`, `fleet_id`), as more `Loader`
//! methods: the Redis URL checked without ever quoting it (it may carry a password), and the
//! default fleet id, a hash of what makes two integrations the same app and token.

use std::time::Duration;

use toml::Spanned;

use super::{own, Field, Loader, Scope};
use crate::config::raw::RawFleet;
use crate::config::{
    ConfigError, Fleet, FleetSettings, OnUnavailable, TokenSettings, DEFAULT_KEY_PREFIX,
    DEFAULT_WAIT_FOR_PEER,
};

impl Loader<'_> {
    /// A name that goes into Redis keys: 1 to 64 letters, digits or one of `extra`.
    fn short_name(
        &self,
        field: &Field<'_, String>,
        extra: &[u8],
        allowed: &str,
    ) -> Result<String, ConfigError> {
        let ok = !field.value.is_empty()
            && field.value.len() <= 64
            && field
                .value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b));
        if !ok {
            return Err(self.error(
                Some(&field.span),
                &field.key,
                format!("must be 1 to 64 letters, digits, {allowed}"),
            ));
        }
        Ok(field.value.clone())
    }

    /// `[fleet]`: the shared Redis, and the per-member defaults (`id` left empty) that
    /// [`Loader::membership`] completes for each integration.
    pub(super) fn fleet(
        &mut self,
        raw: &Spanned<RawFleet>,
    ) -> Result<(Fleet, FleetSettings), ConfigError> {
        let key = |name: &str| format!("fleet.{name}");
        let table = raw.get_ref();
        let Some(url_field) = own(key("redis_url"), &table.redis_url) else {
            return Err(self.error(
                Some(&raw.span()),
                "fleet.redis_url",
                "is missing; [fleet] needs the Redis the replicas share, e.g. redis_url = { env = \"TOKENGATE_REDIS_URL\" } holding redis://host:6379",
            ));
        };
        let redis_url = self.secret(&url_field, false)?;
        // The value may hold a password: messages describe it, never quote it.
        let parsed = url::Url::parse(redis_url.value.expose()).map_err(|e| {
            self.error(
                Some(&url_field.span),
                &url_field.key,
                format!(
                    "the {} value is not a URL ({e}); write redis://[user:password@]host:port[/db], or rediss:// for TLS",
                    redis_url.source.describe()
                ),
            )
        })?;
        if !matches!(parsed.scheme(), "redis" | "rediss") || parsed.host_str().is_none() {
            return Err(self.error(
                Some(&url_field.span),
                &url_field.key,
                format!(
                    "the {} value must be redis://host:port or rediss://host:port (TLS), not a {}:// URL",
                    redis_url.source.describe(),
                    parsed.scheme()
                ),
            ));
        }
        if let Some(db) = parsed.path().strip_prefix('/').filter(|p| !p.is_empty()) {
            if db.parse::<u32>().is_err() {
                return Err(self.error(
                    Some(&url_field.span),
                    &url_field.key,
                    "the database after the host must be a number (redis://host:6379/0)",
                ));
            }
        }
        let ca_file = match own(key("ca_file"), &table.ca_file) {
            None => None,
            Some(field) => {
                if parsed.scheme() != "rediss" {
                    return Err(self.error(
                        Some(&field.span),
                        &field.key,
                        "applies to rediss:// (TLS) only; use a rediss:// redis_url or remove ca_file",
                    ));
                }
                Some(self.ca_file(&field)?)
            }
        };
        let key_prefix = match own(key("key_prefix"), &table.key_prefix) {
            None => DEFAULT_KEY_PREFIX.to_owned(),
            Some(field) => self.short_name(
                &field,
                b"_-:.",
                "`_`, `-`, `:` or `.`; e.g. key_prefix = \"tokengate\"",
            )?,
        };
        let wait_for_peer = self.duration(
            own(key("wait_for_peer"), &table.wait_for_peer),
            DEFAULT_WAIT_FOR_PEER,
            Duration::from_millis(100),
        )?;
        let on_unavailable = self.choice(
            own(key("on_unavailable"), &table.on_unavailable),
            OnUnavailable::FetchLocally,
            &[
                ("fetch_locally", OnUnavailable::FetchLocally),
                ("hold", OnUnavailable::Hold),
            ],
            "\"fetch_locally\" or \"hold\"",
        )?;
        Ok((
            Fleet {
                redis_url,
                ca_file,
                key_prefix,
            },
            FleetSettings {
                id: String::new(),
                wait_for_peer,
                on_unavailable,
            },
        ))
    }

    /// Whether and as what the integration is a fleet member: `fleet` (default true when
    /// `[fleet]` exists) and `fleet_id` (default: a hash of what makes two integrations the
    /// same app and token, never of the secret, so a rotated secret keeps the id).
    pub(super) fn membership(
        &self,
        scope: &Scope<'_>,
        token: &TokenSettings,
        fleet: Option<&FleetSettings>,
    ) -> Result<Option<FleetSettings>, ConfigError> {
        let wanted = pick!(scope, fleet);
        let id_field = pick!(scope, fleet_id);
        let Some(defaults) = fleet else {
            if let Some(field) = wanted.as_ref().filter(|f| *f.value) {
                return Err(self.error(
                    Some(&field.span),
                    &field.key,
                    "is true but there is no [fleet] table; add [fleet] with redis_url, or remove fleet",
                ));
            }
            if let Some(field) = &id_field {
                return Err(self.error(
                    Some(&field.span),
                    &field.key,
                    "is set but there is no [fleet] table; add [fleet] with redis_url, or remove fleet_id",
                ));
            }
            return Ok(None);
        };
        if wanted.as_ref().is_some_and(|f| !*f.value) {
            return Ok(None);
        }
        let id = match id_field {
            Some(field) => self.short_name(
                &field,
                b"_-.",
                "`_`, `-` or `.`; e.g. fleet_id = \"bringg-oms-prod\"",
            )?,
            None => default_fleet_id(token),
        };
        Ok(Some(FleetSettings {
            id,
            ..defaults.clone()
        }))
    }
}

/// The fleet id two integrations share when they ask one token endpoint for one app's token
/// the same way: SHA-256 over `token_url`, `client_id`, `scope`, `ttl` and `extra_params`,
/// 16 hex digits. Never over the secret: a rotated secret keeps the fleet together.
pub(super) fn default_fleet_id(token: &TokenSettings) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let ttl = token
        .ttl
        .map(|t| t.as_secs().to_string())
        .unwrap_or_default();
    let mut parts = vec![
        token.token_url.url.as_str(),
        token.client_id.value.expose(),
        token.scope.as_deref().unwrap_or(""),
        ttl.as_str(),
    ];
    for (k, v) in &token.extra_params {
        parts.push(k);
        parts.push(v);
    }
    for part in parts {
        // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part.as_bytes());
    }
    let digest = ctx.finish();
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
