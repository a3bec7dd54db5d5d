//! `convocore-gateway demo`: an EU and an NA mock Convocore on loopback, the gateway in front
//! of them with a freshly generated Ed25519 demo signing key, and a printed team JWT and `curl`
//! line. Needs no network and no files; what it writes goes to a temporary folder.

use std::net::SocketAddr;
use std::sync::Arc;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use crate::config::Config;
use crate::server::{self, Listeners};
use crate::testing::mock::MockConvocore;
use crate::{reload, State};

pub const DEMO_ISSUER: &str = "https://demo.convocore-gateway.invalid";
pub const DEMO_AUDIENCE: &str = "convocore-gateway";
/// The demo's admin port: not 9090, Prometheus's own default, so a local Prometheus and the
/// demo can run side by side.
pub const DEMO_ADMIN_PORT: u16 = 9190;

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the 32 key bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Runs the demo until SIGINT/SIGTERM.
pub async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| "cannot generate a key")?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| "cannot load the key")?;
    let mut spki = ED25519_SPKI_PREFIX.to_vec();
    spki.extend_from_slice(pair.public_key().as_ref());
    let public_pem = pem::encode(&pem::Pem::new("PUBLIC KEY", spki));
    std::fs::write(dir.path().join("demo-key.pem"), public_pem)?;

    let mut secret = [0u8; 16];
    aws_lc_rs::rand::fill(&mut secret).map_err(|_| "no randomness")?;
    let upstream_token: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(dir.path().join("convocore-token"), &upstream_token)?;

    let eu = MockConvocore::start(
        "eu",
        &upstream_token,
        &[
            ("agent-eu-1", &["convo-1", "convo-2"]),
            ("agent-eu-2", &["convo-3"]),
        ],
    )
    .await?;
    let na = MockConvocore::start(
        "na",
        &upstream_token,
        &[("agent-na-1", &["convo-10", "convo-11"])],
    )
    .await?;
    // Conversations of some length (~6 KiB of JSON), so compression shows.
    eu.set_turns(24);
    na.set_turns(24);

    let listeners = bind_or_any(
        ([127, 0, 0, 1], 8080).into(),
        ([127, 0, 0, 1], DEMO_ADMIN_PORT).into(),
    )
    .await?;
    let api = listeners.api.local_addr()?;
    let admin = listeners.admin.local_addr()?;
    let config_text = format!(
        r#"# Written by `convocore-gateway demo`.
[server]
listen = "{api}"
admin_listen = "{admin}"
shutdown_grace = "5s"

[upstream]
token_file = "convocore-token"

[regions.eu]
base_url = "{eu}"
[regions.na]
base_url = "{na}"

[routing]
default_region = "eu"
discover = true
[routing.agents]
"agent-eu-1" = "eu"

[auth]
issuers = ["{DEMO_ISSUER}"]
audiences = ["{DEMO_AUDIENCE}"]

[[auth.keys]]
kid = "demo"
algorithm = "EdDSA"
public_key_file = "demo-key.pem"

[log]
format = "text"
"#,
        eu = eu.base_url(),
        na = na.base_url(),
    );
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, config_text)?;
    let config = Config::load(&config_path)?;
    let _log = crate::log::init(config.log.format, &config.log.level);
    let state = State::build(config)?;
    tokio::spawn(reload::on_sighup(Arc::downgrade(&state)));

    let now = jsonwebtoken::get_current_timestamp();
    let claims = serde_json::json!({
        "iss": DEMO_ISSUER,
        "aud": DEMO_AUDIENCE,
        "sub": "demo-user",
        "team": "demo",
        "scope": "convocore-gateway:purge",
        "iat": now,
        "exp": now + 24 * 3600,
    });
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some("demo".to_string());
    let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_der(pkcs8.as_ref()))?;

    println!(
        r#"convocore-gateway demo

  gateway   http://{api}   (admin http://{admin}: /healthz /readyz)
  mock EU   {eu}   agents: agent-eu-1 (convo-1, convo-2), agent-eu-2 (convo-3)
  mock NA   {na}   agents: agent-na-1 (convo-10, convo-11)

A team JWT (EdDSA, team "demo", valid 24 h):

  TOKEN={token}

Try it:

  curl -i -H "Authorization: Bearer {token}" "http://{api}/v3/agents/agent-eu-1/convos/convo-1/export?format=json"

agent-na-1 is in no static map: the gateway discovers it in NA. CSV works too:

  curl -i -H "Authorization: Bearer $TOKEN" "http://{api}/v3/agents/agent-na-1/convos/convo-10/export?format=csv"

Compressed (zstd, br or gzip, by Accept-Encoding), and a 304 for the copy you already have:

  curl -s -D - -o /dev/null --compressed -H "Authorization: Bearer $TOKEN" "http://{api}/v3/agents/agent-eu-1/convos/convo-1/export"
  curl -i -H "Authorization: Bearer $TOKEN" -H 'If-None-Match: "eu-agent-eu-1-convo-1-json-v1"' "http://{api}/v3/agents/agent-eu-1/convos/convo-1/export"

Press Ctrl-C to stop.
"#,
        eu = eu.base_url(),
        na = na.base_url(),
    );
    server::run(state, listeners, server::shutdown_signal()).await?;
    drop((eu, na));
    Ok(())
}

/// The usual ports when free, else any free port on loopback.
async fn bind_or_any(api: SocketAddr, admin: SocketAddr) -> std::io::Result<Listeners> {
    match Listeners::bind(api, admin).await {
        Ok(l) => Ok(l),
        Err(_) => Listeners::bind(([127, 0, 0, 1], 0).into(), ([127, 0, 0, 1], 0).into()).await,
    }
}
