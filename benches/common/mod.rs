//! What the benchmarks share: the test fixtures and the `[auth]` block that verifies the
//! fixture RSA key's tokens.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `[auth]` with the fixture RSA public key (`kid = "rsa-1"`), as TOML.
pub fn auth_toml() -> String {
    format!(
        r#"[auth]
issuers = ["https://idp.example.internal"]
audiences = ["convocore-gateway"]
[[auth.keys]]
kid = "rsa-1"
algorithm = "RS256"
public_key_file = "{}"
"#,
        fixture("rsa_public.pem").display()
    )
}
