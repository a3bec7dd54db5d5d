//! Caller authentication and authorization: the team JWT in `Authorization: Bearer`, verified
//! against the configured keys, each pinned to one algorithm; then the `[teams]` rules.

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;

use base64::Engine;
use http::header::AUTHORIZATION;
use http::HeaderMap;
use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};

use crate::config::{self, Config, ConfigError};
use crate::error::{ApiError, AuthFailure};
use crate::watch::Watched;

/// The longest bearer token accepted; anything longer is refused before any decoding.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub team: String,
    /// The space-separated `scope` claim, split.
    pub scopes: Vec<String>,
}

impl Caller {
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
}

/// One verification key, pinned to one algorithm.
pub struct Key {
    kid: Option<String>,
    alg: Algorithm,
    decoding: DecodingKey,
}

/// Keys from one `[[auth.keys]]` entry; a file source follows its file.
struct Source {
    describe: String,
    keys: Arc<Watched<Vec<Key>>>,
}

/// What a team may read; `None` means every agent.
#[derive(Debug, Clone)]
enum Agents {
    All,
    Some(HashSet<String>),
}

pub struct Auth {
    sources: Vec<Source>,
    /// Per algorithm: exp required, nbf checked, iss/aud when configured, leeway.
    validation: Validation,
    team_claim: String,
    teams: Option<BTreeMap<String, Agents>>,
}

impl Auth {
    /// Loads every key (files are then followed for changes). Errors name the key entry.
    pub fn from_config(config: &Config) -> Result<Auth, ConfigError> {
        let auth = &config.auth;
        let mut sources = Vec::with_capacity(auth.keys.len());
        for (i, spec) in auth.keys.iter().enumerate() {
            sources.push(load_source(config, i, spec)?);
        }
        let mut validation = Validation::new(Algorithm::RS256);
        validation.algorithms = Vec::new();
        validation.leeway = auth.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        if auth.issuers.is_empty() {
            validation.iss = None;
        } else {
            validation.set_issuer(&auth.issuers);
            required.push("iss");
        }
        if auth.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&auth.audiences);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        let teams = config.teams.as_ref().map(|teams| {
            teams
                .iter()
                .map(|(name, team)| {
                    let agents = if team.agents.iter().any(|a| a == "*") {
                        Agents::All
                    } else {
                        Agents::Some(team.agents.iter().cloned().collect())
                    };
                    (name.clone(), agents)
                })
                .collect()
        });
        Ok(Auth {
            sources,
            validation,
            team_claim: auth.team_claim.clone(),
            teams,
        })
    }

    /// One line per key source, for `check-config`; never key material.
    pub fn describe(&self) -> Vec<String> {
        self.sources
            .iter()
            .map(|s| format!("{} ({} keys loaded)", s.describe, s.keys.load().len()))
            .collect()
    }

    /// Verifies the bearer token in `headers` and names the calling team.
    pub fn verify(&self, headers: &HeaderMap) -> Result<Caller, AuthFailure> {
        let token = bearer(headers)?;
        let header = jsonwebtoken::decode_header(token).map_err(|_| header_failure(token))?;
        if let Some(typ) = &header.typ {
            // RFC 7515 §4.1.9: the `application/` prefix may be left out, and is equivalent.
            let typ = strip_prefix_ignore_case(typ, "application/");
            if !typ.eq_ignore_ascii_case("JWT") && !typ.eq_ignore_ascii_case("at+jwt") {
                return Err(AuthFailure::Malformed("typ must be JWT or at+jwt"));
            }
        }
        if header.crit.is_some() {
            return Err(AuthFailure::Malformed(
                "crit header parameters are not supported",
            ));
        }
        let mut validation = self.validation.clone();
        validation.algorithms = vec![header.alg];
        let mut tried = false;
        for source in &self.sources {
            let keys = source.keys.load();
            for key in keys.iter() {
                if key.alg != header.alg {
                    continue;
                }
                // A token with a kid is tried only against the key with that kid; one without,
                // against every key of its alg.
                if header.kid.is_some() && key.kid != header.kid {
                    continue;
                }
                tried = true;
                match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                    token,
                    &key.decoding,
                    &validation,
                ) {
                    Ok(data) => return self.caller(data.claims),
                    Err(e) => {
                        if let Some(failure) = claim_failure(e.kind()) {
                            return Err(failure);
                        }
                    }
                }
            }
        }
        if tried {
            Err(AuthFailure::BadSignature)
        } else {
            Err(AuthFailure::UnknownKey)
        }
    }

    fn caller(
        &self,
        claims: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Caller, AuthFailure> {
        let team = claims
            .get(&self.team_claim)
            .or_else(|| claims.get("sub"))
            .and_then(|v| v.as_str())
            .filter(|t| !t.is_empty() && t.len() <= 256)
            .ok_or(AuthFailure::Malformed(
                "the token names no team (team claim or sub)",
            ))?
            .to_string();
        let scopes = match claims.get("scope") {
            Some(serde_json::Value::String(s)) => {
                s.split_ascii_whitespace().map(str::to_string).collect()
            }
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        };
        Ok(Caller { team, scopes })
    }

    /// Applies `[teams]`: absent, every team may read every agent; present, only what it lists.
    pub fn authorize(&self, caller: &Caller, agent: &str) -> Result<(), ApiError> {
        let Some(teams) = &self.teams else {
            return Ok(());
        };
        match teams.get(&caller.team) {
            Some(Agents::All) => Ok(()),
            Some(Agents::Some(agents)) if agents.contains(agent) => Ok(()),
            Some(Agents::Some(_)) => Err(ApiError::Forbidden(
                "your team may not export this agent's conversations".to_string(),
            )),
            None => Err(ApiError::Forbidden(
                "your team is not allowed to use this gateway".to_string(),
            )),
        }
    }

    /// Whether `team` is named in `[teams]` (for bounded metric labels).
    pub fn is_configured_team(&self, team: &str) -> bool {
        self.teams.as_ref().is_some_and(|t| t.contains_key(team))
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> &'a str {
    match s.get(..prefix.len()) {
        Some(head) if head.eq_ignore_ascii_case(prefix) => &s[prefix.len()..],
        _ => s,
    }
}

fn bearer(headers: &HeaderMap) -> Result<&str, AuthFailure> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next().ok_or(AuthFailure::Missing)?;
    if values.next().is_some() {
        return Err(AuthFailure::Malformed("send one Authorization header"));
    }
    let value = value
        .to_str()
        .map_err(|_| AuthFailure::Malformed("Authorization must be 'Bearer <token>'"))?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthFailure::Malformed(
        "Authorization must be 'Bearer <token>'",
    ))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthFailure::Malformed(
            "Authorization must be 'Bearer <token>'",
        ));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthFailure::Missing);
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthFailure::Malformed("token too long"));
    }
    Ok(token)
}

/// The header did not decode: say why without echoing it (the slow path; only for refusals).
fn header_failure(token: &str) -> AuthFailure {
    if token.split('.').count() != 3 {
        return AuthFailure::Malformed("not a JWT (header.payload.signature, base64url JSON)");
    }
    let alg = token
        .split('.')
        .next()
        .and_then(|h| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .ok()
        })
        .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok())
        .and_then(|h| h.get("alg").and_then(|a| a.as_str()).map(str::to_string));
    match alg {
        Some(a) if a.eq_ignore_ascii_case("none") => {
            AuthFailure::Malformed("unsigned tokens (alg none) are not accepted")
        }
        Some(_) => AuthFailure::Malformed("the token's alg is not supported"),
        None => AuthFailure::Malformed("not a JWT (header.payload.signature, base64url JSON)"),
    }
}

/// Errors after the signature verified (or of the token's shape); `None` for a signature that
/// does not verify with this key, so the next key is tried.
fn claim_failure(kind: &jsonwebtoken::errors::ErrorKind) -> Option<AuthFailure> {
    use jsonwebtoken::errors::ErrorKind as K;
    Some(match kind {
        K::InvalidSignature
        | K::InvalidAlgorithm
        | K::InvalidRsaKey(_)
        | K::InvalidEcdsaKey
        | K::InvalidEddsaKey
        | K::InvalidKeyFormat
        | K::Provider(_) => return None,
        K::ExpiredSignature => AuthFailure::Expired,
        K::ImmatureSignature => AuthFailure::NotYetValid,
        K::InvalidIssuer => AuthFailure::Issuer,
        K::InvalidAudience => AuthFailure::Audience,
        K::MissingRequiredClaim(c) if c == "exp" => AuthFailure::Malformed("exp is required"),
        K::MissingRequiredClaim(c) if c == "iss" => AuthFailure::Issuer,
        K::MissingRequiredClaim(c) if c == "aud" => AuthFailure::Audience,
        K::InvalidClaimFormat(_) => {
            AuthFailure::Malformed("exp, nbf, iss or aud has the wrong type")
        }
        _ => AuthFailure::Malformed("not a JWT (header.payload.signature, base64url JSON)"),
    })
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

fn load_source(config: &Config, i: usize, spec: &config::Key) -> Result<Source, ConfigError> {
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
                AlgorithmFamily::Hmac => unreachable_hmac(),
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
            });
        }
        if let Some(file) = &spec.secret_file {
            let path = config.resolve(file);
            let keys = Watched::file(&path, make).map_err(|m| err("secret_file", m))?;
            return Ok(Source {
                describe: format!("secret_file {} ({alg:?}{kid_note})", path.display()),
                keys,
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
        });
    }

    Err(err("-", "no usable key source".into()))
}

fn unreachable_hmac() -> Result<DecodingKey, jsonwebtoken::errors::Error> {
    Err(jsonwebtoken::errors::ErrorKind::InvalidKeyFormat.into())
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer(&HeaderMap::new()), Err(AuthFailure::Missing));
        assert_eq!(bearer(&headers("Bearer abc")), Ok("abc"));
        assert_eq!(bearer(&headers("bearer abc")), Ok("abc"));
        assert!(matches!(
            bearer(&headers("Basic abc")),
            Err(AuthFailure::Malformed(_))
        ));
        assert!(matches!(
            bearer(&headers("Bearer")),
            Err(AuthFailure::Malformed(_))
        ));
    }

    #[test]
    fn alg_none_is_named() {
        let h = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#);
        let p = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"exp":1}"#);
        assert_eq!(
            header_failure(&format!("{h}.{p}.")),
            AuthFailure::Malformed("unsigned tokens (alg none) are not accepted")
        );
    }
}
