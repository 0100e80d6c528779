//! Sealing fleet entries: the token is encrypted with AES-256-GCM under a key derived with
//! HKDF-SHA256 from the client secret and the fleet id, with the fleet id, generation and
//! lifetime as associated data. A reader of Redis without the client secret cannot use the
//! token; an entry forged, altered, replayed under another generation or sealed with another
//! secret does not open.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf::{Salt, HKDF_SHA256};
use ring::rand::{SecureRandom, SystemRandom};

/// Domain separation: a key derived here is used for nothing else.
const SALT: &[u8] = b"tokengate fleet entry v1";

/// The key of one fleet under one client secret.
pub struct Sealer {
    key: LessSafeKey,
    fleet_id: String,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("fleet_id", &self.fleet_id)
            .finish_non_exhaustive()
    }
}

/// What an entry authenticates besides the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sealed {
    pub generation: u64,
    /// The token's lifetime when it was published, in milliseconds: a Redis TTL longer than
    /// this (someone extended the key) cannot make a token live longer.
    pub lifetime_ms: u64,
}

impl Sealer {
    pub fn new(client_secret: &str, fleet_id: &str) -> Sealer {
        let prk = Salt::new(HKDF_SHA256, SALT).extract(client_secret.as_bytes());
        let info = [fleet_id.as_bytes()];
        // Invariant: 32 bytes is a valid HKDF-SHA256 output length and AES-256 key length.
        let okm = prk
            .expand(&info, &AES_256_GCM)
            .expect("AES-256 key length is within HKDF-SHA256's limit");
        Sealer {
            key: LessSafeKey::new(UnboundKey::from(okm)),
            fleet_id: fleet_id.to_owned(),
        }
    }

    fn aad(&self, meta: Sealed) -> Vec<u8> {
        let mut aad = Vec::with_capacity(self.fleet_id.len() + 16);
        aad.extend_from_slice(self.fleet_id.as_bytes());
        aad.extend_from_slice(&meta.generation.to_be_bytes());
        aad.extend_from_slice(&meta.lifetime_ms.to_be_bytes());
        aad
    }

    /// `nonce ‖ ciphertext ‖ tag`; `None` only if the system has no randomness.
    pub fn seal(&self, token: &str, meta: Sealed) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).ok()?;
        let mut out = token.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(self.aad(meta)),
                &mut out,
            )
            .ok()?;
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&out);
        Some(sealed)
    }

    /// The token, if `sealed` was sealed by this key for exactly `meta`.
    pub fn open(&self, sealed: &[u8], meta: Sealed) -> Option<String> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(self.aad(meta)), &mut buf)
            .ok()?;
        String::from_utf8(plain.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: Sealed = Sealed {
        generation: 7,
        lifetime_ms: 60_000,
    };

    #[test]
    fn a_sealed_token_opens_only_with_its_secret_fleet_and_metadata() {
        let sealer = Sealer::new("s3cret", "oms");
        let sealed = sealer.seal("tok-abc", META).unwrap();
        assert!(!sealed.windows(7).any(|w| w == b"tok-abc"), "not in clear");
        assert_eq!(sealer.open(&sealed, META).as_deref(), Some("tok-abc"));

        assert_eq!(Sealer::new("rotated", "oms").open(&sealed, META), None);
        assert_eq!(Sealer::new("s3cret", "wms").open(&sealed, META), None);
        for meta in [
            Sealed {
                generation: 8,
                ..META
            },
            Sealed {
                lifetime_ms: 3_600_000,
                ..META
            },
        ] {
            assert_eq!(sealer.open(&sealed, meta), None, "{meta:?}");
        }
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(sealer.open(&flipped, META), None);
        assert_eq!(sealer.open(b"junk", META), None);
        assert_eq!(sealer.open(b"", META), None);
    }

    #[test]
    fn two_seals_of_one_token_differ() {
        let sealer = Sealer::new("s3cret", "oms");
        assert_ne!(sealer.seal("t", META), sealer.seal("t", META));
    }
}
