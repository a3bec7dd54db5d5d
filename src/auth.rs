//! Caller authentication and authorization: the team JWT in `Authorization: Bearer`, verified
//! against the configured keys, each pinned to one algorithm; then the `[teams]` rules.
//! [`Auth`] is one configuration's rules and keys; the verified-token cache and the JWKS
//! fetchers outlive reloads.

pub mod jwks;
pub mod keys;
pub mod sources;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use http::header::AUTHORIZATION;
use http::HeaderMap;
use jsonwebtoken::{Algorithm, Validation};
use std::str::FromStr;

use self::sources::{load_source, Context, Source};
use crate::config::{Config, ConfigError};
use crate::error::{ApiError, AuthFailure, VerifyError};

/// Verified tokens remembered at once, and for how long at most (never past a token's `exp`).
const VERIFIED_CAPACITY: u64 = 100_000;
const VERIFIED_TTL: Duration = Duration::from_secs(60);

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

/// A token that verified: who it names, until when, under which configuration, and by which
/// key source (at which version of its keys), so a reload, a rotation or an expired JWKS
/// stops it at once.
pub struct Verified {
    caller: Arc<Caller>,
    exp: u64,
    generation: u64,
    source: usize,
    version: u64,
}

/// Tokens that verified, keyed by their SHA-256 (never the token itself). Only successes are
/// kept, so a flood of invalid tokens adds nothing. Kept across reloads; an entry counts only
/// under the configuration that made it.
pub struct VerifiedTokens(
    moka::future::Cache<[u8; 32], Arc<Verified>, foldhash::fast::RandomState>,
);

impl Default for VerifiedTokens {
    fn default() -> Self {
        VerifiedTokens(
            moka::future::Cache::builder()
                .max_capacity(VERIFIED_CAPACITY)
                .time_to_live(VERIFIED_TTL)
                .build_with_hasher(foldhash::fast::RandomState::default()),
        )
    }
}

/// What a team may read; `None` means every agent.
#[derive(Debug, Clone)]
enum Agents {
    All,
    Some(HashSet<String>),
}

pub struct Auth {
    sources: Vec<Source>,
    verified: Arc<VerifiedTokens>,
    /// Which configuration this is (see [`Verified`]).
    generation: u64,
    /// Per algorithm: exp required, nbf checked, iss/aud when configured, leeway.
    validation: Validation,
    team_claim: String,
    teams: Option<BTreeMap<String, Agents>>,
}

impl Auth {
    /// Loads every key (files are then followed for changes). Errors name the key entry.
    pub fn from_config(
        config: &Config,
        cx: &Context<'_>,
        verified: Arc<VerifiedTokens>,
        generation: u64,
    ) -> Result<Auth, ConfigError> {
        let auth = &config.auth;
        let mut sources = Vec::with_capacity(auth.keys.len());
        for (i, spec) in auth.keys.iter().enumerate() {
            sources.push(load_source(config, i, spec, cx)?);
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
            verified,
            generation,
            validation,
            team_claim: auth.team_claim.clone(),
            teams,
        })
    }

    /// One line per key source, for `check-config`; never key material.
    pub fn describe(&self) -> Vec<String> {
        self.sources
            .iter()
            .map(|s| {
                let keys = s.keys.load();
                let kids: Vec<&str> = keys.iter().filter_map(|k| k.kid()).collect();
                if kids.is_empty() {
                    format!("{} ({} keys loaded)", s.describe, keys.len())
                } else {
                    format!(
                        "{} ({} keys loaded: {})",
                        s.describe,
                        keys.len(),
                        kids.join(", ")
                    )
                }
            })
            .collect()
    }

    /// Whether every `jwks_url` source has keys fresh enough to verify with.
    pub fn ready(&self) -> bool {
        self.sources.iter().all(Source::usable)
    }

    /// Verifies the bearer token in `headers` and names the calling team. A token seen before
    /// costs a hash and a lookup; a new one, a signature check.
    pub async fn verify(&self, headers: &HeaderMap) -> Result<Arc<Caller>, VerifyError> {
        let token = bearer(headers)?;
        let digest = digest(token);
        if let Some(hit) = self.verified.0.get(&digest).await {
            if self.still_valid(&hit) {
                return Ok(hit.caller.clone());
            }
            self.verified.0.invalidate(&digest).await;
        }
        // Boxed: the rare path (a JWKS refetch among it) is large, and inline it would make
        // every request's future larger.
        Box::pin(self.verify_and_remember(token, digest)).await
    }

    /// A token not in the verified-token cache: the signature check, then remembered.
    async fn verify_and_remember(
        &self,
        token: &str,
        digest: [u8; 32],
    ) -> Result<Arc<Caller>, VerifyError> {
        let verified = match self.verify_token(token) {
            Err(VerifyError::Refused(AuthFailure::UnknownKey))
                if self.refetch_for_unknown_kid().await =>
            {
                self.verify_token(token)?
            }
            other => other?,
        };
        let verified = Arc::new(verified);
        let caller = verified.caller.clone();
        self.verified.0.insert(digest, verified).await;
        Ok(caller)
    }

    /// Verifies without the verified-token cache: the cost of a token seen for the first time
    /// (benchmarks compare the two).
    pub fn verify_uncached(&self, headers: &HeaderMap) -> Result<Arc<Caller>, VerifyError> {
        Ok(self.verify_token(bearer(headers)?)?.caller)
    }

    /// A cached verification holds until the token's `exp`, while the key source that verified
    /// it is unchanged and usable.
    fn still_valid(&self, v: &Verified) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(u64::MAX);
        now < v.exp
            && v.generation == self.generation
            && self
                .sources
                .get(v.source)
                .is_some_and(|s| s.keys.version() == v.version && s.usable())
    }

    /// Asks every `jwks_url` source for an early refetch (rate-limited); whether any happened.
    async fn refetch_for_unknown_kid(&self) -> bool {
        let mut refetched = false;
        for source in &self.sources {
            if let Some(remote) = &source.remote {
                refetched |= remote.refetch_for_unknown_kid().await;
            }
        }
        refetched
    }

    fn verify_token(&self, token: &str) -> Result<Verified, VerifyError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| header_failure(token))?;
        if let Some(typ) = &header.typ {
            // RFC 7515 §4.1.9: the `application/` prefix may be left out, and is equivalent.
            let typ = strip_prefix_ignore_case(typ, "application/");
            if !typ.eq_ignore_ascii_case("JWT") && !typ.eq_ignore_ascii_case("at+jwt") {
                return Err(AuthFailure::Malformed("typ must be JWT or at+jwt").into());
            }
        }
        if header.crit.is_some() {
            return Err(AuthFailure::Malformed("crit header parameters are not supported").into());
        }
        let mut validation = self.validation.clone();
        validation.algorithms = vec![header.alg];
        let mut tried = false;
        let mut stale = false;
        for (index, source) in self.sources.iter().enumerate() {
            let usable = source.usable();
            let version = source.keys.version();
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
                if !usable {
                    // A key that would be tried, but is past max_stale.
                    stale = true;
                    continue;
                }
                tried = true;
                match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                    token,
                    &key.decoding,
                    &validation,
                ) {
                    Ok(data) => {
                        check_claims(token, &data.claims)?;
                        let exp = data
                            .claims
                            .get("exp")
                            .and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|f| f as u64)))
                            .unwrap_or(0);
                        return Ok(Verified {
                            caller: Arc::new(self.caller(data.claims)?),
                            exp,
                            generation: self.generation,
                            source: index,
                            version,
                        });
                    }
                    Err(e) => {
                        if let Some(failure) = claim_failure(e.kind()) {
                            return Err(refine(failure, token).into());
                        }
                    }
                }
            }
        }
        if tried {
            Err(AuthFailure::BadSignature.into())
        } else if stale {
            Err(VerifyError::KeysStale)
        } else {
            Err(AuthFailure::UnknownKey.into())
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

    /// The `team` metric label: the team when `[teams]` names it, else `other`.
    pub fn team_label<'a>(&'a self, team: &'a str) -> &'a str {
        match &self.teams {
            Some(t) if t.contains_key(team) => team,
            _ => "other",
        }
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
        // A known alg: something else in the header is wrong.
        Some(a) if Algorithm::from_str(&a).is_ok() => {
            AuthFailure::Malformed("the token header is malformed (a field has the wrong type)")
        }
        Some(_) => AuthFailure::Malformed("the token's alg is not supported"),
        None => AuthFailure::Malformed("not a JWT (header.payload.signature, base64url JSON)"),
    }
}

/// SHA-256 of the token: the verified-token cache's key, so tokens are never held in memory.
fn digest(token: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A token's claims as JSON, decoded without verifying anything: only for telling a verified
/// token's faults apart.
fn payload(token: &str) -> Option<Vec<u8>> {
    let part = token.split('.').nth(1)?;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .ok()
}

/// What the signature check leaves to us: `iss` is a string (not an array that merely holds
/// an accepted issuer), and no claim is given twice (parsers disagree on which one counts).
fn check_claims(
    token: &str,
    claims: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), AuthFailure> {
    if claims.get("iss").is_some_and(|iss| !iss.is_string()) {
        return Err(AuthFailure::Malformed("iss must be a string"));
    }
    let unique = payload(token).is_some_and(|json| {
        let mut de = serde_json::Deserializer::from_slice(&json);
        serde::Deserializer::deserialize_map(&mut de, UniqueKeys).unwrap_or(false)
    });
    if !unique {
        return Err(AuthFailure::Malformed("a claim is given more than once"));
    }
    Ok(())
}

/// Whether a JSON object's keys are unique (true) or one repeats (false).
struct UniqueKeys;

impl<'de> serde::de::Visitor<'de> for UniqueKeys {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            map.next_value::<serde::de::IgnoredAny>()?;
            if !seen.insert(key) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// A claim failure told more exactly from the (verified) payload: an `exp` that is there but
/// not a number is not "missing".
fn refine(failure: AuthFailure, token: &str) -> AuthFailure {
    let exp_failure = matches!(
        failure,
        AuthFailure::Malformed("exp is required")
            | AuthFailure::Malformed("exp, nbf, iss or aud has the wrong type")
    );
    if !exp_failure {
        return failure;
    }
    let claims: Option<serde_json::Map<String, serde_json::Value>> =
        payload(token).and_then(|json| serde_json::from_slice(&json).ok());
    match claims.as_ref().and_then(|c| c.get("exp")) {
        Some(exp) if exp.as_u64().is_none() => {
            AuthFailure::Malformed("exp must be a number of seconds since 1970 (NumericDate)")
        }
        _ => failure,
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
