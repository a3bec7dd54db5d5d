//! Verification keys, each pinned to exactly one algorithm (RFC 8725): what a PEM public key,
//! an HMAC secret or a JWKS document becomes.

use std::str::FromStr;

use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};

use crate::config::{Config, ConfigError};

/// One verification key, pinned to one algorithm.
pub struct Key {
    pub(crate) kid: Option<String>,
    pub(crate) alg: Algorithm,
    pub(crate) decoding: DecodingKey,
}

impl Key {
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }
}

pub(super) fn parse_alg(config: &Config, at: &str, alg: &str) -> Result<Algorithm, ConfigError> {
    Algorithm::from_str(alg).map_err(|_| {
        ConfigError::new(
            &config.path,
            format!("{at}.algorithm"),
            format!(
                "{alg:?} is not one of HS256/384/512, RS256/384/512, PS256/384/512, ES256/384, EdDSA"
            ),
        )
    })
}

/// RFC 8725 §3.5: an HMAC secret at least as long as the hash.
pub(super) fn min_secret_len(alg: Algorithm) -> usize {
    match alg {
        Algorithm::HS384 => 48,
        Algorithm::HS512 => 64,
        _ => 32,
    }
}

pub(super) fn trim_newline(s: &[u8]) -> &[u8] {
    let s = s.strip_suffix(b"\n").unwrap_or(s);
    s.strip_suffix(b"\r").unwrap_or(s)
}

/// A JWKS document to keys. Keys that cannot be used (encryption keys, unknown types or
/// algorithms, no algorithm at all) are skipped with a warning; a document with no usable key
/// is an error.
pub fn parse_jwks(
    json: &[u8],
    pinned: Option<Algorithm>,
    origin: &str,
) -> Result<Vec<Key>, String> {
    #[derive(serde::Deserialize)]
    struct Set {
        keys: Vec<serde_json::Value>,
    }
    let set: Set = serde_json::from_slice(json)
        .map_err(|e| format!("{origin} is not a JWKS document: {e}"))?;
    let mut keys = Vec::new();
    for (i, raw) in set.keys.into_iter().enumerate() {
        let jwk: Jwk = match serde_json::from_value(raw) {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!(origin, index = i, error = %e, "skipping a JWK of an unsupported type");
                continue;
            }
        };
        let kid = jwk.common.key_id.clone();
        if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
            tracing::warn!(
                origin,
                kid = kid.as_deref().unwrap_or("-"),
                "skipping a JWK whose use is not sig"
            );
            continue;
        }
        let own = jwk
            .common
            .key_algorithm
            .map(|a| Algorithm::from_str(&a.to_string()));
        let alg = match (own, pinned) {
            (Some(Ok(own)), Some(pinned)) if own != pinned => {
                tracing::warn!(
                    origin,
                    kid = kid.as_deref().unwrap_or("-"),
                    "skipping a JWK whose alg differs from the configured algorithm"
                );
                continue;
            }
            (Some(Ok(own)), _) => own,
            (None, Some(pinned)) => pinned,
            (Some(Err(_)), _) | (None, None) => {
                tracing::warn!(origin, kid = kid.as_deref().unwrap_or("-"), "skipping a JWK with no usable alg (set alg in the JWK or algorithm in the config)");
                continue;
            }
        };
        let decoding = match DecodingKey::from_jwk(&jwk) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(origin, kid = kid.as_deref().unwrap_or("-"), error = %e, "skipping an unusable JWK");
                continue;
            }
        };
        if decoding.family() != alg.family() {
            tracing::warn!(
                origin,
                kid = kid.as_deref().unwrap_or("-"),
                "skipping a JWK whose key type does not fit its alg"
            );
            continue;
        }
        if alg.family() == AlgorithmFamily::Hmac
            && decoding.try_get_as_bytes().map(|b| b.len()).unwrap_or(0) < min_secret_len(alg)
        {
            tracing::warn!(
                origin,
                kid = kid.as_deref().unwrap_or("-"),
                "skipping an HMAC JWK shorter than its hash"
            );
            continue;
        }
        keys.push(Key { kid, alg, decoding });
    }
    if keys.is_empty() {
        return Err(format!("{origin} holds no usable signing key"));
    }
    Ok(keys)
}
