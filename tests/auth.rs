#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Caller authentication and authorization, per CONTRACT.md ("The API listener"):
//! the team JWT in `Authorization: Bearer`, verified against a configured key with the key's
//! own algorithm (never `none`, never HMAC with a public key), `exp` required, `nbf`, `iss`,
//! `aud` checked with the leeway; 401 UNAUTHORIZED with `WWW-Authenticate: Bearer`; `[teams]`
//! rules and 403 FORBIDDEN; authorization before any cache lookup and before any upstream
//! request; the shared upstream token swapped in; no token or secret in any error; and the
//! start-up (exit 2) errors for bad `[[auth.keys]]` entries.

mod common;
use common::*;

use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::Method;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The HS256 secret of key `hs-1` (the fixture file has no trailing newline).
fn hmac_secret() -> String {
    String::from_utf8(fixture_bytes("hmac_secret.txt")).unwrap()
}

/// Signs `claims` with an explicit key and header fields (for tokens `mint` cannot make).
fn sign(
    alg: Algorithm,
    kid: Option<&str>,
    typ: Option<&str>,
    key: &EncodingKey,
    claims: &Value,
) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    header.typ = typ.map(str::to_string);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

/// Like `mint` (fixture key picked by `alg`, kid `rsa-1` etc.) but with a chosen `typ`.
fn mint_typ(alg: Algorithm, kid: Option<&str>, typ: Option<&str>, claims: &Value) -> String {
    let key = match alg {
        Algorithm::RS256 | Algorithm::PS256 => {
            EncodingKey::from_rsa_pem(&fixture_bytes("rsa_private.pem")).unwrap()
        }
        Algorithm::ES256 => EncodingKey::from_ec_pem(&fixture_bytes("ec256_private.pem")).unwrap(),
        other => panic!("mint_typ: no key for {other:?}"),
    };
    sign(alg, kid, typ, &key, claims)
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// Asserts the contract's 401: status, code, JSON shape, `WWW-Authenticate: Bearer ...`, an
/// `issues` list, and no token or secret anywhere in the answer.
fn assert_401(r: &Resp, token: &str) {
    r.assert_error(401, "UNAUTHORIZED");
    let www = r
        .header("www-authenticate")
        .unwrap_or_else(|| panic!("401 without WWW-Authenticate: {r:?}"));
    assert!(www.starts_with("Bearer"), "WWW-Authenticate: {www}");
    let v = r.json();
    assert!(v["issues"].as_array().is_some_and(|i| !i.is_empty()), "{v}");
    assert_clean(r, token);
}

/// Asserts the contract's 403 and that it leaks nothing.
fn assert_403(r: &Resp, token: &str) {
    r.assert_error(403, "FORBIDDEN");
    assert_clean(r, token);
}

/// "No error message ever contains a token, a secret or a key": neither the caller's token
/// (nor its signature), nor the shared upstream token, nor the HMAC secret, in body or headers.
fn assert_clean(r: &Resp, token: &str) {
    let secret = hmac_secret();
    let mut needles: Vec<&str> = vec![UPSTREAM_TOKEN, secret.as_str()];
    if !token.is_empty() {
        needles.push(token);
    }
    if let Some(sig) = token.rsplit('.').next() {
        if sig.len() >= 16 {
            needles.push(sig);
        }
    }
    let body = r.text();
    for needle in &needles {
        assert!(
            !body.contains(needle),
            "error body contains a token/secret {needle:?}: {body}"
        );
        for (name, value) in r.headers.iter() {
            let value = String::from_utf8_lossy(value.as_bytes());
            assert!(
                !value.contains(needle),
                "header {name} contains a token/secret {needle:?}: {value}"
            );
        }
    }
}

fn issue(r: &Resp) -> String {
    r.json()["issues"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// `GET EXPORT_EU` with `token` must be a 401 that reached no upstream.
async fn refused(gw: &Gateway, token: &str) -> Resp {
    let before = gw.upstream_count();
    let r = gw.get(EXPORT_EU, token).await;
    assert_401(&r, token);
    assert_eq!(
        gw.upstream_count(),
        before,
        "a refusal reached the upstream"
    );
    r
}

/// `GET path` with `token` must be a 200 from upstream.
async fn accepted(gw: &Gateway, path: &str, token: &str) -> Resp {
    let r = gw.get(path, token).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r
}

/// A config-level check: render `keys` into an otherwise valid config and load it the way the
/// binary does (`Config::parse` then `State::build`); returns the start-up error.
async fn startup_error(keys: &str) -> convocore_gateway::ConfigError {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("convocore-token");
    std::fs::write(&token_file, UPSTREAM_TOKEN).unwrap();
    let config = TestConfig {
        keys: keys.replace("{tmp}", &dir.path().display().to_string()),
        ..Default::default()
    };
    let text = config.render(
        "http://127.0.0.1:9/v3",
        "http://127.0.0.1:9/v3",
        &token_file,
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, &text).unwrap();
    let config = match convocore_gateway::Config::parse(&text, &path) {
        Ok(c) => c,
        Err(e) => return e,
    };
    match convocore_gateway::State::build(config) {
        Ok(_) => panic!("expected a start-up error for keys:\n{keys}"),
        Err(e) => e,
    }
}

/// The fixture JWKS restricted to `kids`.
fn jwks_with(kids: &[&str]) -> String {
    let mut set: Value = serde_json::from_slice(&fixture_bytes("jwks.json")).unwrap();
    set["keys"]
        .as_array_mut()
        .unwrap()
        .retain(|k| kids.contains(&k["kid"].as_str().unwrap()));
    assert_eq!(set["keys"].as_array().unwrap().len(), kids.len());
    set.to_string()
}

/// Atomically replaces `path` (write a sibling, then rename over it).
fn replace_file(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The Authorization header
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn missing_authorization_is_401_with_bearer_challenge() {
    let gw = Gateway::start().await;
    let r = gw.request(Method::GET, EXPORT_EU, &[]).await;
    assert_401(&r, "");
    assert_eq!(r.json()["code"], "UNAUTHORIZED");
    assert_eq!(gw.upstream_count(), 0);

    // `Bearer` with nothing after it is no credential either.
    let r = gw
        .request(Method::GET, EXPORT_EU, &[("authorization", "Bearer ")])
        .await;
    assert_401(&r, "");
    assert_eq!(gw.upstream_count(), 0);
}

#[tokio::test]
async fn non_bearer_scheme_is_401_malformed() {
    let gw = Gateway::start().await;
    let valid = token("billing");
    for value in [
        "Basic YWxhZGRpbjpvcGVuc2VzYW1l".to_string(),
        format!("Basic {valid}"),
        format!("Token {valid}"),
        // No scheme at all: the bare JWT.
        valid.clone(),
    ] {
        let r = gw
            .request(Method::GET, EXPORT_EU, &[("authorization", &value)])
            .await;
        assert_401(&r, &valid);
        assert_eq!(r.json()["message"], "malformed token", "{value}");
    }
    assert_eq!(gw.upstream_count(), 0);
}

#[tokio::test]
async fn garbage_token_is_401_malformed() {
    let gw = Gateway::start().await;
    for bad in ["garbage", "not-a-jwt-at-all!!", "a.b.c", "...."] {
        let r = refused(&gw, bad).await;
        assert_eq!(r.json()["message"], "malformed token", "{bad}");
    }
    // A decodable header over a payload that is not base64url: refused (the contract only
    // requires 401; the signature is checked first, so the message may name either).
    refused(&gw, "eyJhbGciOiJSUzI1NiJ9.%%%.abc").await;
    refused(&gw, "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.").await;
    assert_eq!(gw.upstream_count(), 0);
}

#[tokio::test]
async fn token_with_two_parts_is_401_malformed() {
    let gw = Gateway::start().await;
    let valid = token("billing");
    let two: Vec<&str> = valid.split('.').take(2).collect();
    let two = two.join(".");
    let r = refused(&gw, &two).await;
    assert_eq!(r.json()["message"], "malformed token");
    // A trailing dot too few or too many is also not a JWS compact serialization.
    let r = refused(&gw, &format!("{valid}.extra")).await;
    assert_eq!(r.json()["code"], "UNAUTHORIZED");
    assert_eq!(gw.upstream_count(), 0);
}

#[tokio::test]
async fn bearer_scheme_is_case_insensitive() {
    // RFC 7235 §2.1: the auth-scheme is case-insensitive.
    let gw = Gateway::start().await;
    let t = token("billing");
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let r = gw
            .request(
                Method::GET,
                EXPORT_EU,
                &[("authorization", &format!("{scheme} {t}"))],
            )
            .await;
        assert_eq!(r.status, 200, "{scheme}: {}", r.text());
    }
    assert_eq!(gw.upstream_count(), 3);
}

// ---------------------------------------------------------------------------------------------
// Signature and algorithm
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn alg_none_is_401() {
    let gw = Gateway::start().await;
    let payload = b64(&claims("billing"));
    for header in [
        json!({"alg": "none", "typ": "JWT"}),
        json!({"alg": "none", "typ": "JWT", "kid": "rsa-1"}),
        json!({"alg": "None"}),
        json!({"alg": "NONE", "kid": "hs-1"}),
    ] {
        let h = b64(&header);
        // Empty signature, as RFC 7519 §6.1 writes an unsecured JWT.
        let unsigned = format!("{h}.{payload}.");
        refused(&gw, &unsigned).await;
        // And with a valid token's signature pasted on.
        let real = token("billing");
        let sig = real.rsplit('.').next().unwrap();
        refused(&gw, &format!("{h}.{payload}.{sig}")).await;
    }
    assert_eq!(gw.upstream_count(), 0);
}

#[tokio::test]
async fn hs256_forged_with_the_rsa_public_key_is_401() {
    // The classic algorithm-confusion attack: HMAC keyed with the public key's PEM bytes.
    let gw = Gateway::start().await;
    let public_pem = fixture_bytes("rsa_public.pem");
    let key = EncodingKey::from_secret(&public_pem);
    let c = claims("billing");
    let with_kid = sign(Algorithm::HS256, Some("rsa-1"), Some("JWT"), &key, &c);
    refused(&gw, &with_kid).await;
    let without_kid = sign(Algorithm::HS256, None, Some("JWT"), &key, &c);
    refused(&gw, &without_kid).await;
    // Also with the PEM minus its trailing newline, as some tools read it.
    let trimmed = EncodingKey::from_secret(public_pem.strip_suffix(b"\n").unwrap_or(&public_pem));
    refused(
        &gw,
        &sign(Algorithm::HS256, Some("rsa-1"), Some("JWT"), &trimmed, &c),
    )
    .await;
    refused(
        &gw,
        &sign(Algorithm::HS256, None, Some("JWT"), &trimmed, &c),
    )
    .await;
    assert_eq!(gw.upstream_count(), 0);
}

#[tokio::test]
async fn key_is_pinned_to_its_own_algorithm() {
    let gw = Gateway::start().await;
    let c = claims("billing");
    // An ES256 token naming the RS256 key's kid.
    refused(&gw, &mint(Algorithm::ES256, Some("rsa-1"), &c)).await;
    // An RS256 signature naming the PS256 key (same RSA key material, other algorithm).
    refused(&gw, &mint(Algorithm::RS256, Some("rsa-ps"), &c)).await;
    // A PS256 signature naming the RS256 key.
    refused(&gw, &mint(Algorithm::PS256, Some("rsa-1"), &c)).await;
    // An HS256 token naming the EdDSA key.
    refused(&gw, &mint(Algorithm::HS256, Some("ed-1"), &c)).await;
    assert_eq!(gw.upstream_count(), 0);
}

#[tokio::test]
async fn unknown_kid_is_401_unknown_key() {
    let gw = Gateway::start().await;
    let t = mint(Algorithm::RS256, Some("nope"), &claims("billing"));
    let r = refused(&gw, &t).await;
    let v = r.json();
    let text = format!("{} {}", v["message"], issue(&r)).to_lowercase();
    assert!(text.contains("key"), "should say the key is unknown: {v}");
    // An algorithm no key is configured for is the same failure.
    let rs512 = mint(Algorithm::RS512, Some("rsa-1"), &claims("billing"));
    refused(&gw, &rs512).await;
    let rs512_no_kid = mint(Algorithm::RS512, None, &claims("billing"));
    refused(&gw, &rs512_no_kid).await;
    assert_eq!(gw.upstream_count(), 0);
}

#[tokio::test]
async fn bad_signature_is_401() {
    let gw = Gateway::start().await;
    let other = EncodingKey::from_rsa_pem(&fixture_bytes("rsa2_private.pem")).unwrap();
    let c = claims("billing");
    let t = sign(Algorithm::RS256, Some("rsa-1"), Some("JWT"), &other, &c);
    let r = refused(&gw, &t).await;
    assert_eq!(r.json()["message"], "invalid token signature");
    // Without a kid it is tried against every RS256 key, and none verifies.
    refused(&gw, &sign(Algorithm::RS256, None, Some("JWT"), &other, &c)).await;
    // A valid token with its payload swapped (signature no longer matches).
    let good = token("billing");
    let parts: Vec<&str> = good.split('.').collect();
    let tampered = format!("{}.{}.{}", parts[0], b64(&claims("admin")), parts[2]);
    refused(&gw, &tampered).await;
    // A valid token with a flipped signature byte.
    let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    sig[10] ^= 0x01;
    let flipped = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(sig));
    refused(&gw, &flipped).await;
    // CVE-2018-0114 style: the attacker's own public key embedded in the header (`jwk`) is
    // never used; only configured keys verify.
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    header.jwk = Some(jsonwebtoken::jwk::Jwk::from_encoding_key(&other, Algorithm::RS256).unwrap());
    refused(&gw, &jsonwebtoken::encode(&header, &c, &other).unwrap()).await;
    header.kid = None;
    refused(&gw, &jsonwebtoken::encode(&header, &c, &other).unwrap()).await;
    // An HS256 token made with another secret.
    let wrong_secret = EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes!!!");
    refused(
        &gw,
        &sign(
            Algorithm::HS256,
            Some("hs-1"),
            Some("JWT"),
            &wrong_secret,
            &c,
        ),
    )
    .await;
    assert_eq!(gw.upstream_count(), 0);
}

// ---------------------------------------------------------------------------------------------
// Claims: exp, nbf, iss, aud; the header's typ
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn expired_beyond_leeway_is_401_token_expired() {
    let gw = Gateway::start().await;
    for ago in [120, 45, 3600 * 24] {
        let mut c = claims("billing");
        c["exp"] = json!(now() - ago);
        let t = mint(Algorithm::RS256, Some("rsa-1"), &c);
        let r = refused(&gw, &t).await;
        assert_eq!(r.json()["message"], "token expired", "exp = now - {ago}");
    }
    assert_eq!(gw.upstream_count(), 0);
}

#[tokio::test]
async fn expired_within_leeway_is_accepted() {
    let gw = Gateway::start().await;
    let mut c = claims("billing");
    c["exp"] = json!(now() - 10);
    accepted(&gw, EXPORT_EU, &mint(Algorithm::RS256, Some("rsa-1"), &c)).await;
    assert_eq!(gw.upstream_count(), 1);
}

#[tokio::test]
async fn nbf_in_the_future_beyond_leeway_is_401() {
    let gw = Gateway::start().await;
    for ahead in [120, 45] {
        let mut c = claims("billing");
        c["nbf"] = json!(now() + ahead);
        let t = mint(Algorithm::RS256, Some("rsa-1"), &c);
        let r = refused(&gw, &t).await;
        assert_eq!(
            r.json()["message"],
            "token not yet valid",
            "nbf = now + {ahead}"
        );
    }
    assert_eq!(gw.upstream_count(), 0);
}

#[tokio::test]
async fn nbf_within_leeway_is_accepted() {
    let gw = Gateway::start().await;
    let mut c = claims("billing");
    c["nbf"] = json!(now() + 10);
    accepted(&gw, EXPORT_EU, &mint(Algorithm::RS256, Some("rsa-1"), &c)).await;
    // And an nbf in the past is of course fine.
    let mut c = claims("billing");
    c["nbf"] = json!(now() - 60);
    accepted(&gw, EXPORT_EU, &mint(Algorithm::RS256, Some("rsa-1"), &c)).await;
    assert_eq!(gw.upstream_count(), 2);
}

#[tokio::test]
async fn missing_exp_is_401() {
    let gw = Gateway::start().await;
    let mut c = claims("billing");
    c.as_object_mut().unwrap().remove("exp");
    refused(&gw, &mint(Algorithm::RS256, Some("rsa-1"), &c)).await;
    // Same for the HMAC and EdDSA keys.
    refused(&gw, &mint(Algorithm::HS256, Some("hs-1"), &c)).await;
    refused(&gw, &mint(Algorithm::EdDSA, Some("ed-1"), &c)).await;
    // An exp of the wrong type is no exp.
    let mut c = claims("billing");
    c["exp"] = json!("tomorrow");
    refused(&gw, &mint(Algorithm::RS256, Some("rsa-1"), &c)).await;
    assert_eq!(gw.upstream_count(), 0);
}

#[tokio::test]
async fn wrong_issuer_is_401() {
    let gw = Gateway::start().await;
    for iss in [
        "https://evil.example",
        "https://idp.example.internal/",
        "https://IDP.example.internal",
        "",
    ] {
        let mut c = claims("billing");
        c["iss"] = json!(iss);
        let r = refused(&gw, &mint(Algorithm::RS256, Some("rsa-1"), &c)).await;
        assert_eq!(
            r.json()["message"],
            "token issuer not accepted",
            "iss {iss:?}"
        );
    }
    assert_eq!(gw.upstream_count(), 0);
}

#[tokio::test]
async fn missing_issuer_is_401() {
    let gw = Gateway::start().await;
    let mut c = claims("billing");
    c.as_object_mut().unwrap().remove("iss");
    refused(&gw, &mint(Algorithm::RS256, Some("rsa-1"), &c)).await;
    assert_eq!(gw.upstream_count(), 0);
}

#[tokio::test]
async fn wrong_audience_is_401() {
    let gw = Gateway::start().await;
    for aud in [
        json!("someone-else"),
        json!(["someone-else", "another"]),
        json!("convocore-gateway-2"),
        json!([]),
    ] {
        let mut c = claims("billing");
        c["aud"] = aud.clone();
        let r = refused(&gw, &mint(Algorithm::RS256, Some("rsa-1"), &c)).await;
        assert_eq!(r.json()["code"], "UNAUTHORIZED", "aud {aud}");
    }
    // An aud list that names the gateway among others is accepted (RFC 7519 §4.1.3).
    let mut c = claims("billing");
    c["aud"] = json!(["someone-else", AUDIENCE]);
    accepted(&gw, EXPORT_EU, &mint(Algorithm::RS256, Some("rsa-1"), &c)).await;
    assert_eq!(gw.upstream_count(), 1);
}

#[tokio::test]
async fn missing_audience_is_401() {
    let gw = Gateway::start().await;
    let mut c = claims("billing");
    c.as_object_mut().unwrap().remove("aud");
    refused(&gw, &mint(Algorithm::RS256, Some("rsa-1"), &c)).await;
    assert_eq!(gw.upstream_count(), 0);
}

#[tokio::test]
async fn wrong_typ_is_401() {
    let gw = Gateway::start().await;
    let c = claims("billing");
    for typ in ["JOSE+JSON", "JOSE", "secevent+jwt", "JWE"] {
        let t = mint_typ(Algorithm::RS256, Some("rsa-1"), Some(typ), &c);
        refused(&gw, &t).await;
    }
    assert_eq!(gw.upstream_count(), 0);
}

#[tokio::test]
async fn typ_at_jwt_jwt_or_absent_is_accepted() {
    let gw = Gateway::start().await;
    let c = claims("billing");
    for typ in [Some("at+jwt"), Some("JWT"), None] {
        let t = mint_typ(Algorithm::RS256, Some("rsa-1"), typ, &c);
        accepted(&gw, EXPORT_EU, &t).await;
    }
    let t = mint_typ(Algorithm::ES256, Some("ec-1"), Some("at+jwt"), &c);
    accepted(&gw, EXPORT_EU, &t).await;
    assert_eq!(gw.upstream_count(), 4);
}

/// Every key the default harness config holds: (alg, kid).
const ALL_KEYS: &[(Algorithm, &str)] = &[
    (Algorithm::RS256, "rsa-1"),
    (Algorithm::PS256, "rsa-ps"),
    (Algorithm::ES256, "ec-1"),
    (Algorithm::ES384, "ec384-1"),
    (Algorithm::EdDSA, "ed-1"),
    (Algorithm::HS256, "hs-1"),
];

/// RFC 7515 §4.1.9: `application/at+jwt` and `at+jwt` name the same type.
#[tokio::test]
async fn typ_with_application_prefix_is_accepted() {
    let gw = Gateway::start().await;
    let c = claims("billing");
    for typ in ["application/at+jwt", "application/jwt", "Application/JWT"] {
        let t = mint_typ(Algorithm::RS256, Some("rsa-1"), Some(typ), &c);
        accepted(&gw, EXPORT_EU, &t).await;
    }
    let t = mint_typ(
        Algorithm::RS256,
        Some("rsa-1"),
        Some("application/jose"),
        &c,
    );
    refused(&gw, &t).await;
    assert_eq!(gw.upstream_count(), 3);
}

#[tokio::test]
async fn every_algorithm_verifies_with_its_kid() {
    let gw = Gateway::start().await;
    for (alg, kid) in ALL_KEYS {
        let t = mint(*alg, Some(kid), &claims("billing"));
        let r = gw.get(EXPORT_EU, &t).await;
        assert_eq!(r.status, 200, "{alg:?} kid {kid}: {}", r.text());
    }
    assert_eq!(gw.upstream_count(), ALL_KEYS.len());
}

#[tokio::test]
async fn every_algorithm_verifies_without_kid() {
    let gw = Gateway::start().await;
    for (alg, _) in ALL_KEYS {
        let t = mint(*alg, None, &claims("billing"));
        let r = gw.get(EXPORT_EU, &t).await;
        assert_eq!(r.status, 200, "{alg:?} without kid: {}", r.text());
    }
    assert_eq!(gw.upstream_count(), ALL_KEYS.len());
}

#[tokio::test]
async fn pyjwt_interop_tokens_verify() {
    let gw = Gateway::start_with(TestConfig {
        teams: "[teams]\ninterop = { agents = [\"agent-eu\"] }\n".into(),
        ..Default::default()
    })
    .await;
    for alg in ["rs256", "es256", "es384", "eddsa", "ps256", "hs256"] {
        let t = String::from_utf8(fixture_bytes(&format!("interop_{alg}.jwt"))).unwrap();
        let r = gw.get(EXPORT_EU, t.trim()).await;
        assert_eq!(r.status, 200, "interop_{alg}.jwt: {}", r.text());
        // The team claim ("interop") was read: an agent [teams] does not list is refused.
        let r = gw.get(EXPORT_NA, t.trim()).await;
        assert_403(&r, t.trim());
    }
    assert_eq!(gw.upstream_count(), 6);
    assert_eq!(gw.na.request_count(), 0);
}

const JWKS_KEYS: &str = r#"
[[auth.keys]]
jwks_file = "{fixtures}/jwks.json"
"#;

#[tokio::test]
async fn jwks_file_keys_verify() {
    let gw = Gateway::start_with(TestConfig {
        keys: JWKS_KEYS.into(),
        ..Default::default()
    })
    .await;
    for (alg, kid) in [
        (Algorithm::RS256, "rsa-1"),
        (Algorithm::ES256, "ec-1"),
        (Algorithm::ES384, "ec384-1"),
        (Algorithm::EdDSA, "ed-1"),
    ] {
        let r = gw
            .get(EXPORT_EU, &mint(alg, Some(kid), &claims("billing")))
            .await;
        assert_eq!(r.status, 200, "{alg:?} kid {kid}: {}", r.text());
        // Without a kid the token is tried against the set's keys of its alg.
        let r = gw
            .get(EXPORT_EU, &mint(alg, None, &claims("billing")))
            .await;
        assert_eq!(r.status, 200, "{alg:?} without kid: {}", r.text());
    }
    assert_eq!(gw.upstream_count(), 8);
    // The interop tokens whose kids are in the set verify too.
    for alg in ["rs256", "es256", "es384", "eddsa"] {
        let t = String::from_utf8(fixture_bytes(&format!("interop_{alg}.jwt"))).unwrap();
        accepted(&gw, EXPORT_EU, t.trim()).await;
    }
    assert_eq!(gw.upstream_count(), 12);
}

#[tokio::test]
async fn jwks_file_unknown_kid_is_401() {
    let gw = Gateway::start_with(TestConfig {
        keys: JWKS_KEYS.into(),
        ..Default::default()
    })
    .await;
    let c = claims("billing");
    // Not in the set at all.
    refused(&gw, &mint(Algorithm::RS256, Some("nope"), &c)).await;
    // rsa-ps and hs-1 are configured in the default keys but not in this JWKS.
    refused(&gw, &mint(Algorithm::PS256, Some("rsa-ps"), &c)).await;
    refused(&gw, &mint(Algorithm::HS256, Some("hs-1"), &c)).await;
    refused(&gw, &mint(Algorithm::HS256, None, &c)).await;
    // A kid of the set with another algorithm.
    refused(&gw, &mint(Algorithm::ES384, Some("ec-1"), &c)).await;
    assert_eq!(gw.upstream_count(), 0);
}

#[tokio::test]
async fn jwks_file_is_reread_when_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, jwks_with(&["rsa-1"])).unwrap();
    let gw = Gateway::start_with(TestConfig {
        keys: format!("[[auth.keys]]\njwks_file = \"{}\"\n", jwks.display()),
        ..Default::default()
    })
    .await;
    let rsa = token("billing");
    let ec = mint(Algorithm::ES256, Some("ec-1"), &claims("billing"));
    accepted(&gw, EXPORT_EU, &rsa).await;
    refused(&gw, &ec).await;
    assert_eq!(gw.upstream_count(), 1);

    replace_file(&jwks, &jwks_with(&["rsa-1", "ec-1"]));
    let (g, t) = (&gw, &ec);
    assert!(
        eventually(Duration::from_secs(5), || async move {
            g.get(EXPORT_EU, t).await.status == 200
        })
        .await,
        "the ec-1 token is still refused after the JWKS file gained ec-1"
    );
    accepted(&gw, EXPORT_EU, &rsa).await;

    // A key removed from the file stops verifying.
    replace_file(&jwks, &jwks_with(&["ec-1"]));
    let (g, t) = (&gw, &rsa);
    assert!(
        eventually(Duration::from_secs(5), || async move {
            g.get(EXPORT_EU, t).await.status == 401
        })
        .await,
        "the rsa-1 token still verifies after rsa-1 left the JWKS file"
    );
    accepted(&gw, EXPORT_EU, &ec).await;
}

/// CONTRACT.md: "a token is tried against keys of its own `alg`, and only the key with its
/// `kid` when it carries one". A configured key without a kid is not "the key with its kid".
#[tokio::test]
async fn token_with_kid_is_tried_only_against_the_key_with_that_kid() {
    let gw = Gateway::start_with(TestConfig {
        keys: r#"
[[auth.keys]]
algorithm = "RS256"
public_key_file = "{fixtures}/rsa_public.pem"
"#
        .into(),
        ..Default::default()
    })
    .await;
    // Without a kid, the kid-less RS256 key is tried and verifies.
    accepted(
        &gw,
        EXPORT_EU,
        &mint(Algorithm::RS256, None, &claims("billing")),
    )
    .await;
    assert_eq!(gw.upstream_count(), 1);
    // With a kid no configured key carries: unknown key, even though the signature would
    // verify with the kid-less key.
    let t = mint(Algorithm::RS256, Some("nope"), &claims("billing"));
    refused(&gw, &t).await;
    assert_eq!(gw.upstream_count(), 1);
}

#[tokio::test]
async fn public_key_file_is_reread_when_it_changes() {
    // CONTRACT.md: "a `*_file` is read again when it changes, without a restart".
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("idp.pem");
    std::fs::write(&pem, fixture_bytes("rsa_public.pem")).unwrap();
    let gw = Gateway::start_with(TestConfig {
        keys: format!(
            "[[auth.keys]]\nkid = \"idp\"\nalgorithm = \"RS256\"\npublic_key_file = \"{}\"\n",
            pem.display()
        ),
        ..Default::default()
    })
    .await;
    let rsa2 = EncodingKey::from_rsa_pem(&fixture_bytes("rsa2_private.pem")).unwrap();
    let old = mint(Algorithm::RS256, Some("idp"), &claims("billing"));
    let new = sign(
        Algorithm::RS256,
        Some("idp"),
        Some("JWT"),
        &rsa2,
        &claims("billing"),
    );
    accepted(&gw, EXPORT_EU, &old).await;
    refused(&gw, &new).await;

    replace_file(
        &pem,
        &String::from_utf8(fixture_bytes("rsa2_public.pem")).unwrap(),
    );
    let (g, t) = (&gw, &new);
    assert!(
        eventually(Duration::from_secs(5), || async move {
            g.get(EXPORT_EU, t).await.status == 200
        })
        .await,
        "the rotated public key file was not picked up"
    );
    refused(&gw, &old).await;

    // A broken replacement keeps the last good key rather than locking everyone out.
    replace_file(
        &pem,
        "-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n",
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    accepted(&gw, EXPORT_EU, &new).await;
}

#[tokio::test]
async fn secret_file_is_reread_when_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hmac");
    let first = "first-hmac-secret-0123456789abcdef";
    let second = "second-hmac-secret-0123456789abcdef";
    std::fs::write(&file, format!("{first}\n")).unwrap();
    let gw = Gateway::start_with(TestConfig {
        keys: format!(
            "[[auth.keys]]\nkid = \"hs\"\nalgorithm = \"HS256\"\nsecret_file = \"{}\"\n",
            file.display()
        ),
        ..Default::default()
    })
    .await;
    let with = |secret: &str| {
        sign(
            Algorithm::HS256,
            Some("hs"),
            Some("JWT"),
            &EncodingKey::from_secret(secret.as_bytes()),
            &claims("billing"),
        )
    };
    // The file's trailing newline is not part of the secret.
    accepted(&gw, EXPORT_EU, &with(first)).await;
    refused(&gw, &with(second)).await;

    replace_file(&file, second);
    let (g, t) = (&gw, &with(second));
    assert!(
        eventually(Duration::from_secs(5), || async move {
            g.get(EXPORT_EU, t).await.status == 200
        })
        .await,
        "the rotated secret file was not picked up"
    );
    let r = refused(&gw, &with(first)).await;
    assert!(!r.text().contains(first) && !r.text().contains(second));
}

#[tokio::test]
async fn secret_env_key_verifies() {
    // A variable name no other test uses: the environment is process-wide.
    let var = "CONVOCORE_GATEWAY_AUTH_TEST_HS_SECRET";
    let secret = "env-hmac-secret-0123456789abcdef-xyz";
    std::env::set_var(var, secret);
    let gw = Gateway::start_with(TestConfig {
        keys: format!(
            "[[auth.keys]]\nkid = \"hs-env\"\nalgorithm = \"HS256\"\nsecret_env = \"{var}\"\n"
        ),
        ..Default::default()
    })
    .await;
    let key = EncodingKey::from_secret(secret.as_bytes());
    let t = sign(
        Algorithm::HS256,
        Some("hs-env"),
        Some("JWT"),
        &key,
        &claims("billing"),
    );
    accepted(&gw, EXPORT_EU, &t).await;
    let t = sign(
        Algorithm::HS256,
        None,
        Some("JWT"),
        &key,
        &claims("billing"),
    );
    accepted(&gw, EXPORT_EU, &t).await;
    let mut c = claims("billing");
    c["exp"] = json!(now() - 3600);
    let t = sign(Algorithm::HS256, Some("hs-env"), Some("JWT"), &key, &c);
    let r = refused(&gw, &t).await;
    assert!(!r.text().contains(secret));
    assert_eq!(gw.upstream_count(), 2);
}

// ---------------------------------------------------------------------------------------------
// The calling team and [teams]
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn team_comes_from_the_team_claim() {
    let gw = Gateway::start_with(TestConfig {
        teams: "[teams]\nbilling = { agents = [\"*\"] }\n".into(),
        ..Default::default()
    })
    .await;
    // team "billing", sub "billing-user": the team claim decides.
    accepted(&gw, EXPORT_EU, &token("billing")).await;
    // team "support" with sub "billing": still team support, which is not listed.
    let mut c = claims("support");
    c["sub"] = json!("billing");
    let t = mint(Algorithm::RS256, Some("rsa-1"), &c);
    assert_403(&gw.get(EXPORT_EU, &t).await, &t);
    assert_eq!(gw.upstream_count(), 1);
}

#[tokio::test]
async fn team_falls_back_to_sub_when_the_team_claim_is_absent() {
    let gw = Gateway::start_with(TestConfig {
        teams: "[teams]\n\"svc-reporting\" = { agents = [\"agent-eu\"] }\n".into(),
        ..Default::default()
    })
    .await;
    let mut c = claims("ignored");
    c.as_object_mut().unwrap().remove("team");
    c["sub"] = json!("svc-reporting");
    let t = mint(Algorithm::RS256, Some("rsa-1"), &c);
    accepted(&gw, EXPORT_EU, &t).await;
    // The same sub is held to its [teams] rule.
    assert_403(&gw.get(EXPORT_NA, &t).await, &t);
    // Another sub, no team claim: not listed, 403.
    let mut c = claims("ignored");
    c.as_object_mut().unwrap().remove("team");
    c["sub"] = json!("someone-else");
    let t = mint(Algorithm::RS256, Some("rsa-1"), &c);
    assert_403(&gw.get(EXPORT_EU, &t).await, &t);
    assert_eq!(gw.upstream_count(), 1);
}

#[tokio::test]
async fn team_claim_setting_names_the_claim() {
    let gw = Gateway::start_with(TestConfig {
        auth: "team_claim = \"grp\"".into(),
        teams: "[teams]\nanalytics = { agents = [\"*\"] }\n".into(),
        ..Default::default()
    })
    .await;
    // grp names the team; the `team` claim is now just another claim.
    let mut c = claims("billing");
    c["grp"] = json!("analytics");
    let t = mint(Algorithm::RS256, Some("rsa-1"), &c);
    let r = gw.get(EXPORT_EU, &t).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(gw.upstream_count(), 1);

    // team = analytics but no grp: the sub ("analytics-user") is the team, not listed -> 403.
    let mut c = claims("analytics");
    c.as_object_mut().unwrap().remove("grp");
    let t = mint(Algorithm::RS256, Some("rsa-1"), &c);
    let r = gw.get(EXPORT_EU, &t).await;
    assert_403(&r, &t);
    // grp names a team [teams] does not list -> 403.
    let mut c = claims("analytics");
    c["grp"] = json!("billing");
    let t = mint(Algorithm::RS256, Some("rsa-1"), &c);
    assert_403(&gw.get(EXPORT_EU, &t).await, &t);
    assert_eq!(gw.upstream_count(), 1);
}

const TEAMS: &str = r#"
[teams]
billing = { agents = ["*"] }
support = { agents = ["agent-eu", "agent-eu-unmapped"] }
"#;

#[tokio::test]
async fn teams_wildcard_allows_every_agent() {
    let gw = Gateway::start_with(TestConfig {
        teams: TEAMS.into(),
        ..Default::default()
    })
    .await;
    let t = token("billing");
    for path in [
        EXPORT_EU,
        EXPORT_NA,
        "/v3/agents/agent-eu-unmapped/convos/c2/export",
        "/v3/agents/agent-na-unmapped/convos/c1/export?format=csv",
    ] {
        accepted(&gw, path, &t).await;
    }
    // Four exports (discovery of agent-na-unmapped may ask the EU region first).
    assert!(gw.na.request_count() >= 2);
    assert!(gw.upstream_count() >= 4);
}

#[tokio::test]
async fn teams_list_allows_only_listed_agents() {
    let gw = Gateway::start_with(TestConfig {
        teams: TEAMS.into(),
        ..Default::default()
    })
    .await;
    let t = token("support");
    accepted(&gw, EXPORT_EU, &t).await;
    accepted(&gw, "/v3/agents/agent-eu-unmapped/convos/c1/export", &t).await;
    let listed = gw.upstream_count();
    assert_eq!(listed, 2);

    for path in [
        EXPORT_NA,
        "/v3/agents/agent-na-unmapped/convos/c1/export",
        // An agent no region knows: refused before any discovery request.
        "/v3/agents/agent-unknown/convos/c1/export",
        // Prefix of a listed agent is not the agent.
        "/v3/agents/agent/convos/c1/export",
    ] {
        let r = gw.get(path, &t).await;
        assert_403(&r, &t);
        assert_eq!(gw.upstream_count(), listed, "{path} reached the upstream");
    }
}

#[tokio::test]
async fn team_not_in_teams_is_403() {
    let gw = Gateway::start_with(TestConfig {
        teams: TEAMS.into(),
        ..Default::default()
    })
    .await;
    for team in ["marketing", "Billing", "*"] {
        let t = token(team);
        for path in [EXPORT_EU, EXPORT_NA] {
            let r = gw.get(path, &t).await;
            assert_403(&r, &t);
        }
    }
    assert_eq!(gw.upstream_count(), 0);
}

#[tokio::test]
async fn without_teams_every_team_is_allowed() {
    let gw = Gateway::start().await;
    for team in ["billing", "marketing", "anyone-at-all"] {
        let t = token(team);
        accepted(&gw, EXPORT_EU, &t).await;
        accepted(&gw, EXPORT_NA, &t).await;
    }
    assert_eq!(gw.eu.request_count(), 3);
    assert_eq!(gw.na.request_count(), 3);
}

#[tokio::test]
async fn authorization_happens_before_the_cache() {
    let gw = Gateway::start_with(TestConfig {
        teams: TEAMS.into(),
        cache: "enabled = true\nttl = \"5m\"\n".into(),
        ..Default::default()
    })
    .await;
    // Warm the cache for agent-na with a team allowed to read it.
    accepted(&gw, EXPORT_NA, &token("billing")).await;
    let warmed = gw.upstream_count();
    assert_eq!(warmed, 1);

    // No token, a bad token, an expired token, a forbidden team: none gets the cached body.
    let r = gw.request(Method::GET, EXPORT_NA, &[]).await;
    assert_401(&r, "");
    refused_at(&gw, EXPORT_NA, "garbage").await;
    let mut c = claims("billing");
    c["exp"] = json!(now() - 3600);
    refused_at(&gw, EXPORT_NA, &mint(Algorithm::RS256, Some("rsa-1"), &c)).await;
    let t = token("support");
    let r = gw.get(EXPORT_NA, &t).await;
    assert_403(&r, &t);
    assert_ne!(r.header("x-cache"), Some("HIT"));
    assert_eq!(gw.upstream_count(), warmed);
}

async fn refused_at(gw: &Gateway, path: &str, token: &str) {
    let before = gw.upstream_count();
    let r = gw.get(path, token).await;
    assert_401(&r, token);
    assert_ne!(r.header("x-cache"), Some("HIT"));
    assert_eq!(gw.upstream_count(), before);
}

// ---------------------------------------------------------------------------------------------
// No secrets in refusals; the token swap upstream
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn refusals_never_contain_tokens_or_secrets() {
    let gw = Gateway::start_with(TestConfig {
        teams: TEAMS.into(),
        ..Default::default()
    })
    .await;
    let secret = hmac_secret();
    let mut bad = Vec::new();
    // HMAC tokens (the secret is the one thing that must never leak) in every failure.
    let mut c = claims("billing");
    c["exp"] = json!(now() - 3600);
    bad.push(mint(Algorithm::HS256, Some("hs-1"), &c));
    let mut c = claims("billing");
    c["nbf"] = json!(now() + 3600);
    bad.push(mint(Algorithm::HS256, Some("hs-1"), &c));
    let mut c = claims("billing");
    c["iss"] = json!("https://evil.example");
    bad.push(mint(Algorithm::HS256, Some("hs-1"), &c));
    let mut c = claims("billing");
    c["aud"] = json!("nope");
    bad.push(mint(Algorithm::HS256, Some("hs-1"), &c));
    bad.push(mint(Algorithm::HS256, Some("nope"), &claims("billing")));
    bad.push(sign(
        Algorithm::HS256,
        Some("hs-1"),
        Some("JWT"),
        &EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes!!!"),
        &claims("billing"),
    ));
    // Tokens that carry the secrets themselves as claims or as the whole token.
    let mut c = claims("billing");
    c["exp"] = json!(now() - 3600);
    c["leak"] = json!(secret.clone());
    c["up"] = json!(UPSTREAM_TOKEN);
    bad.push(mint(Algorithm::RS256, Some("rsa-1"), &c));
    bad.push(secret.clone());
    bad.push(UPSTREAM_TOKEN.to_string());
    bad.push(format!("{}.{}.", b64(&json!({"alg": "none"})), b64(&c)));
    for t in &bad {
        let r = gw.get(EXPORT_EU, t).await;
        assert_401(&r, t);
    }
    // A 403 with a valid HMAC token.
    let t = mint(Algorithm::HS256, Some("hs-1"), &claims("marketing"));
    assert_403(&gw.get(EXPORT_EU, &t).await, &t);
    let t = mint(Algorithm::HS256, Some("hs-1"), &claims("support"));
    assert_403(&gw.get(EXPORT_NA, &t).await, &t);
    assert_eq!(gw.upstream_count(), 0);
}

#[tokio::test]
async fn upstream_gets_the_shared_token_never_the_callers() {
    let gw = Gateway::start().await;
    for (alg, kid) in ALL_KEYS {
        let caller = mint(*alg, Some(kid), &claims("billing"));
        gw.eu.clear_requests();
        let r = gw
            .request(
                Method::GET,
                EXPORT_EU,
                &[
                    ("authorization", &format!("Bearer {caller}")),
                    ("proxy-authorization", &format!("Bearer {caller}")),
                    ("x-forwarded-authorization", &format!("Bearer {caller}")),
                ],
            )
            .await;
        assert_eq!(r.status, 200, "{alg:?}: {}", r.text());
        // Nor does the response echo the caller's token.
        assert_clean(&r, &caller);
        let seen = gw.eu.requests();
        assert_eq!(seen.len(), 1);
        let auth: Vec<_> = seen[0].headers.get_all("authorization").iter().collect();
        assert_eq!(auth.len(), 1, "{:?}", seen[0].headers);
        assert_eq!(auth[0], format!("Bearer {UPSTREAM_TOKEN}").as_str());
        let sig = caller.rsplit('.').next().unwrap();
        for (name, value) in seen[0].headers.iter() {
            let value = String::from_utf8_lossy(value.as_bytes());
            assert!(
                !value.contains(&caller) && !value.contains(sig),
                "upstream header {name} carries the caller's token: {value}"
            );
        }
    }
    assert_eq!(gw.na.request_count(), 0);
}

// ---------------------------------------------------------------------------------------------
// Start-up errors for [[auth.keys]] (exit 2, naming the key)
// ---------------------------------------------------------------------------------------------

fn assert_names_key0(e: &convocore_gateway::ConfigError) {
    assert!(
        e.key.starts_with("auth.keys[0]"),
        "error should name auth.keys[0]: key {:?}, message {:?}",
        e.key,
        e.message
    );
    assert!(!e.file.is_empty(), "error should name the file: {e}");
}

#[tokio::test]
async fn short_hmac_secret_is_a_startup_error() {
    let short = "only-31-bytes-of-hmac-secret-!!";
    assert_eq!(short.len(), 31);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("short.txt");
    std::fs::write(&file, short).unwrap();
    let e = startup_error(&format!(
        "[[auth.keys]]\nkid = \"hs-short\"\nalgorithm = \"HS256\"\nsecret_file = \"{}\"\n",
        file.display()
    ))
    .await;
    assert_names_key0(&e);
    let shown = e.to_string();
    assert!(
        !shown.contains(short),
        "the error shows the secret: {shown}"
    );

    // HS512 needs 64 bytes: the 39-byte fixture secret is too short for it.
    let e = startup_error(
        "[[auth.keys]]\nkid = \"hs-512\"\nalgorithm = \"HS512\"\nsecret_file = \"{fixtures}/hmac_secret.txt\"\n",
    )
    .await;
    assert_names_key0(&e);
    assert!(!e.to_string().contains(&hmac_secret()), "{e}");
}

#[tokio::test]
async fn public_key_file_that_is_not_pem_is_a_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not.pem");
    std::fs::write(&file, "this is not a PEM public key\n").unwrap();
    let e = startup_error(&format!(
        "[[auth.keys]]\nkid = \"k\"\nalgorithm = \"RS256\"\npublic_key_file = \"{}\"\n",
        file.display()
    ))
    .await;
    assert_names_key0(&e);
    // A missing file is the same kind of error.
    let e = startup_error(&format!(
        "[[auth.keys]]\nkid = \"k\"\nalgorithm = \"ES256\"\npublic_key_file = \"{}\"\n",
        dir.path().join("missing.pem").display()
    ))
    .await;
    assert_names_key0(&e);
}

#[tokio::test]
async fn unset_secret_env_is_a_startup_error() {
    let e = startup_error(
        "[[auth.keys]]\nkid = \"k\"\nalgorithm = \"HS256\"\nsecret_env = \"CONVOCORE_GATEWAY_AUTH_TEST_UNSET_VAR\"\n",
    )
    .await;
    assert_names_key0(&e);
}

#[tokio::test]
async fn algorithm_none_is_a_startup_error() {
    for alg in ["none", "None", "NONE"] {
        let e = startup_error(&format!(
            "[[auth.keys]]\nkid = \"k\"\nalgorithm = \"{alg}\"\npublic_key_file = \"{{fixtures}}/rsa_public.pem\"\n"
        ))
        .await;
        assert_names_key0(&e);
    }
    let e = startup_error(
        "[[auth.keys]]\nkid = \"k\"\nalgorithm = \"none\"\nsecret_file = \"{fixtures}/hmac_secret.txt\"\n",
    )
    .await;
    assert_names_key0(&e);
}

#[tokio::test]
async fn algorithm_that_does_not_fit_the_key_is_a_startup_error() {
    // RS256 with an EC public key.
    let e = startup_error(
        "[[auth.keys]]\nkid = \"k\"\nalgorithm = \"RS256\"\npublic_key_file = \"{fixtures}/ec256_public.pem\"\n",
    )
    .await;
    assert_names_key0(&e);
    // ES256 with an RSA public key.
    let e = startup_error(
        "[[auth.keys]]\nkid = \"k\"\nalgorithm = \"ES256\"\npublic_key_file = \"{fixtures}/rsa_public.pem\"\n",
    )
    .await;
    assert_names_key0(&e);
    // An HMAC algorithm with a public key file: never an HMAC check with a public key.
    let e = startup_error(
        "[[auth.keys]]\nkid = \"k\"\nalgorithm = \"HS256\"\npublic_key_file = \"{fixtures}/rsa_public.pem\"\n",
    )
    .await;
    assert_names_key0(&e);
    // The error in a later entry names that entry.
    let e = startup_error(&format!(
        "{DEFAULT_KEYS}\n[[auth.keys]]\nkid = \"k\"\nalgorithm = \"RS256\"\npublic_key_file = \"{{fixtures}}/ec256_public.pem\"\n"
    ))
    .await;
    assert!(e.key.starts_with("auth.keys[6]"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Claim and header details: each malformation has its own message
// ---------------------------------------------------------------------------------------------

/// Signs `header.payload` given as raw JSON text with the HS256 fixture secret, so a test can
/// send what no JWT library would produce (duplicate claims, wrong header types).
fn sign_raw_hs256(header: &str, payload: &str) -> String {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s.as_bytes());
    let message = format!("{}.{}", b64(header), b64(payload));
    let key = EncodingKey::from_secret(&fixture_bytes("hmac_secret.txt"));
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).unwrap();
    format!("{message}.{signature}")
}

#[tokio::test]
async fn iss_must_be_a_string_even_when_an_array_holds_an_accepted_issuer() {
    let gw = Gateway::start().await;
    let mut c = claims("billing");
    c["iss"] = serde_json::json!([ISSUER]);
    let t = mint(Algorithm::RS256, Some("rsa-1"), &c);
    let r = refused(&gw, &t).await;
    assert!(issue(&r).contains("iss must be a string"), "{}", r.text());
    c["iss"] = serde_json::json!([ISSUER, "https://other.example"]);
    refused(&gw, &mint(Algorithm::RS256, Some("rsa-1"), &c)).await;
}

#[tokio::test]
async fn a_wrong_typed_exp_is_not_called_missing() {
    let gw = Gateway::start().await;
    for exp in [
        serde_json::json!("2099-01-01"),
        serde_json::Value::Null,
        serde_json::json!(1e300),
    ] {
        let mut c = claims("billing");
        c["exp"] = exp.clone();
        let r = refused(&gw, &mint(Algorithm::RS256, Some("rsa-1"), &c)).await;
        let issue = issue(&r);
        assert!(!issue.contains("required"), "exp {exp}: {issue}");
        assert!(issue.contains("exp"), "exp {exp}: {issue}");
    }
    // And a token with no exp at all still says so.
    let mut c = claims("billing");
    c.as_object_mut().unwrap().remove("exp");
    let r = refused(&gw, &mint(Algorithm::RS256, Some("rsa-1"), &c)).await;
    assert_eq!(issue(&r), "exp is required");
}

#[tokio::test]
async fn a_malformed_header_and_duplicate_claims_get_their_own_messages() {
    let gw = Gateway::start().await;
    let payload = claims("billing").to_string();
    // kid of the wrong type: the header is malformed, the alg is fine.
    let t = sign_raw_hs256(r#"{"alg":"HS256","typ":"JWT","kid":5}"#, &payload);
    let r = refused(&gw, &t).await;
    assert!(!issue(&r).contains("alg"), "{}", r.text());
    assert!(issue(&r).contains("header"), "{}", r.text());
    // An alg nobody knows is still named as such.
    let t = sign_raw_hs256(r#"{"alg":"HS999","typ":"JWT"}"#, &payload);
    assert!(issue(&refused(&gw, &t).await).contains("alg"));
    // A claim given twice.
    let dup = payload.replacen('{', "{\"team\":\"billing\",", 1);
    assert!(dup.matches("\"team\"").count() == 2, "{dup}");
    let t = sign_raw_hs256(r#"{"alg":"HS256","typ":"JWT","kid":"hs-1"}"#, &dup);
    let r = refused(&gw, &t).await;
    assert!(issue(&r).contains("more than once"), "{}", r.text());
}
