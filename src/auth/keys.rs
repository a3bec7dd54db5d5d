//! Verification keys: PEM public keys, HMAC secrets, JWKS documents on disk or at a URL,
//! each key pinned to exactly one algorithm (RFC 8725).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};

use crate::config::{self, Config, ConfigError};
use crate::jwks::{JwksMetrics, RemoteJwks};
use crate::pool::{Connector, Origin};
use crate::watch::Watched;

/// `jwks_url` defaults: refetch period and how long the last good set outlives fetch failures.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_STALE: Duration = Duration::from_secs(24 * 3600);

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

/// Keys from one `[[auth.keys]]` entry.
pub struct Source {
    pub describe: String,
    pub keys: Arc<Watched<Vec<Key>>>,
    /// Set for `jwks_url`: its keys verify only while it is fresh enough.
    pub remote: Option<Arc<RemoteJwks>>,
}

impl Source {
    /// Whether this source's keys may verify now.
    pub fn usable(&self) -> bool {
        self.remote.as_ref().is_none_or(|r| r.usable())
    }
}

fn parse_alg(config: &Config, at: &str, alg: &str) -> Result<Algorithm, ConfigError> {
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
fn min_secret_len(alg: Algorithm) -> usize {
    match alg {
        Algorithm::HS384 => 48,
        Algorithm::HS512 => 64,
        _ => 32,
    }
}

/// Loads one `[[auth.keys]]` entry; file sources are followed from then on, `jwks_url`
/// sources are fetched in the background.
pub fn load_source(
    config: &Config,
    i: usize,
    spec: &config::Key,
    connector: &Connector,
    metrics: &JwksMetrics,
) -> Result<Source, ConfigError> {
    let at = format!("auth.keys[{i}]");
    let kid = spec.kid.clone();
    let alg = match &spec.algorithm {
        Some(a) => Some(parse_alg(config, &at, a)?),
        None => None,
    };
    let err = |key: &str, msg: String| ConfigError::new(&config.path, format!("{at}.{key}"), msg);
    let kid_note = kid
        .as_deref()
        .map(|k| format!(", kid {k}"))
        .unwrap_or_default();

    if let Some(file) = &spec.public_key_file {
        let alg = alg.ok_or_else(|| err("algorithm", "required".into()))?;
        if alg.family() == AlgorithmFamily::Hmac {
            return Err(err(
                "public_key_file",
                format!("{alg:?} is an HMAC algorithm; use secret_env or secret_file"),
            ));
        }
        let path = config.resolve(file);
        let keys = Watched::file(&path, move |pem| {
            let decoding = match alg.family() {
                AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(pem),
                AlgorithmFamily::Ec => DecodingKey::from_ec_pem(pem),
                AlgorithmFamily::Ed => DecodingKey::from_ed_pem(pem),
                // Refused above; an HMAC secret is never a PEM public key.
                AlgorithmFamily::Hmac => {
                    Err(jsonwebtoken::errors::ErrorKind::InvalidKeyFormat.into())
                }
            }
            .map_err(|e| format!("not a {alg:?} public key in PEM: {e}"))?;
            Ok(vec![Key {
                kid: kid.clone(),
                alg,
                decoding,
            }])
        })
        .map_err(|m| err("public_key_file", m))?;
        return Ok(Source {
            describe: format!("public_key_file {} ({alg:?}{kid_note})", path.display()),
            keys,
            remote: None,
        });
    }

    if spec.secret_env.is_some() || spec.secret_file.is_some() {
        let alg = alg.ok_or_else(|| err("algorithm", "required".into()))?;
        let field = if spec.secret_env.is_some() {
            "secret_env"
        } else {
            "secret_file"
        };
        if alg.family() != AlgorithmFamily::Hmac {
            return Err(err(
                field,
                format!("{alg:?} is not an HMAC algorithm; use public_key_file"),
            ));
        }
        let make = move |secret: &[u8]| -> Result<Vec<Key>, String> {
            let secret = trim_newline(secret);
            if secret.len() < min_secret_len(alg) {
                return Err(format!(
                    "the {alg:?} secret must be at least {} bytes (it has {})",
                    min_secret_len(alg),
                    secret.len()
                ));
            }
            Ok(vec![Key {
                kid: kid.clone(),
                alg,
                decoding: DecodingKey::from_secret(secret),
            }])
        };
        if let Some(var) = &spec.secret_env {
            let value = std::env::var(var).map_err(|_| {
                err(
                    "secret_env",
                    format!("environment variable {var} is not set"),
                )
            })?;
            let keys = make(value.as_bytes()).map_err(|m| err("secret_env", m))?;
            return Ok(Source {
                describe: format!("secret_env {var} ({alg:?}{kid_note})"),
                keys: Watched::fixed(keys),
                remote: None,
            });
        }
        if let Some(file) = &spec.secret_file {
            let path = config.resolve(file);
            let keys = Watched::file(&path, make).map_err(|m| err("secret_file", m))?;
            return Ok(Source {
                describe: format!("secret_file {} ({alg:?}{kid_note})", path.display()),
                keys,
                remote: None,
            });
        }
    }

    if let Some(file) = &spec.jwks_file {
        let path = config.resolve(file);
        let shown = path.display().to_string();
        let keys = Watched::file(&path, move |json| parse_jwks(json, alg, &shown))
            .map_err(|m| err("jwks_file", m))?;
        return Ok(Source {
            describe: format!("jwks_file {}", path.display()),
            keys,
            remote: None,
        });
    }

    if let Some(url) = &spec.jwks_url {
        let uri: Uri = url
            .parse()
            .map_err(|e| err("jwks_url", format!("{url:?} is not a URL: {e}")))?;
        let origin = Origin::new(&uri, connector.clone()).map_err(|m| err("jwks_url", m))?;
        let remote = RemoteJwks::start(
            uri,
            alg,
            origin,
            spec.refresh.unwrap_or(DEFAULT_REFRESH),
            spec.max_stale.unwrap_or(DEFAULT_MAX_STALE),
            metrics.clone(),
        );
        return Ok(Source {
            describe: format!("jwks_url {url}"),
            keys: remote.keys.clone(),
            remote: Some(remote),
        });
    }

    Err(err("-", "no usable key source".into()))
}

fn trim_newline(s: &[u8]) -> &[u8] {
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
