//! Where keys come from: one [`Source`] per `[[auth.keys]]` entry, from a PEM file, an HMAC
//! secret (environment or file), a JWKS file, or a JWKS URL (fetched by a [`RemoteJwks`]
//! that outlives reloads).

use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use jsonwebtoken::{AlgorithmFamily, DecodingKey};

use super::jwks::{Fetchers, RemoteJwks};
use super::keys::{min_secret_len, parse_alg, parse_jwks, trim_newline, Key};
use crate::config::{self, Config, ConfigError};
use crate::upstream::{Connector, Origins};
use crate::watch::Watched;

/// `jwks_url` defaults: refetch period and how long the last good set outlives fetch failures.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_STALE: Duration = Duration::from_secs(24 * 3600);

/// What a source needs from the gateway's durable state to load: pools and TLS for
/// `jwks_url`, and the running fetchers to reuse.
pub struct Context<'a> {
    pub origins: &'a Origins,
    pub connector: &'a Connector,
    pub fetchers: &'a Fetchers,
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

/// Loads one `[[auth.keys]]` entry; file sources are followed from then on, `jwks_url`
/// sources are fetched in the background.
pub fn load_source(
    config: &Config,
    i: usize,
    spec: &config::Key,
    cx: &Context<'_>,
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
        let origin = cx
            .origins
            .origin(&uri, cx.connector)
            .map_err(|m| err("jwks_url", m))?;
        let (remote, keys) = cx.fetchers.get_or_start(
            uri,
            alg,
            origin,
            spec.refresh.unwrap_or(DEFAULT_REFRESH),
            spec.max_stale.unwrap_or(DEFAULT_MAX_STALE),
        );
        return Ok(Source {
            describe: format!("jwks_url {url}"),
            keys,
            remote: Some(remote),
        });
    }

    Err(err("-", "no usable key source".into()))
}
