//! The test harness: mock EU and NA Convocore regions on loopback, the real gateway on
//! `127.0.0.1:0` in front of them, token minting with the fixture keys, and a small client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
pub mod process;
pub mod redis_server;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use convocore_gateway::testing::mock::MockConvocore;
use convocore_gateway::{Config, ConfigError, Limits, Listeners, State};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tokio::sync::oneshot;

pub const UPSTREAM_TOKEN: &str = "upstream-shared-token-0123456789";
pub const ISSUER: &str = "https://idp.example.internal";
pub const AUDIENCE: &str = "convocore-gateway";

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

pub fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// The parts of the gateway's config a test may change; `render` writes the rest.
#[derive(Clone)]
pub struct TestConfig {
    /// Lines added to `[server]`, and tables after it such as `[server.tls]`.
    pub server: String,
    /// Lines added to `[upstream]`, e.g. `request_timeout = "300ms"` (overrides the harness's
    /// default connect_timeout = 1s / request_timeout = 5s).
    pub upstream: String,
    /// `[routing]` body (default region, discover), without the agents table.
    pub routing: String,
    /// `[routing.agents]` body.
    pub agents: String,
    /// Lines added to `[auth]` (overrides the harness's leeway = 30s / team_claim = "team").
    pub auth: String,
    /// The `[[auth.keys]]` entries, with `{fixtures}` standing for the fixture folder.
    pub keys: String,
    /// A whole `[teams]` table, or empty.
    pub teams: String,
    /// The `[cache]` body.
    pub cache: String,
    /// Extra TOML appended at the end (more tables).
    pub extra: String,
    /// Lines added to `[regions.na]`, e.g. a region's own `token_file`.
    pub na_region: String,
    /// Override the region URLs (e.g. a TLS mock): (eu, na).
    pub region_urls: Option<(String, String)>,
    /// The listeners' limits, when a test shortens or lowers them.
    pub limits: Option<Limits>,
}

impl Default for TestConfig {
    fn default() -> Self {
        TestConfig {
            server: String::new(),
            upstream: String::new(),
            routing: "default_region = \"eu\"\ndiscover = true\n".into(),
            agents: "\"agent-eu\" = \"eu\"\n\"agent-na\" = \"na\"\n".into(),
            auth: String::new(),
            keys: DEFAULT_KEYS.into(),
            teams: String::new(),
            // Off unless a test is about the cache, so other tests see every request upstream.
            cache: "enabled = false\n".into(),
            extra: String::new(),
            na_region: String::new(),
            region_urls: None,
            limits: None,
        }
    }
}

/// One key of each kind the gateway supports, all from `tests/fixtures`.
pub const DEFAULT_KEYS: &str = r#"
[[auth.keys]]
kid = "rsa-1"
algorithm = "RS256"
public_key_file = "{fixtures}/rsa_public.pem"

[[auth.keys]]
kid = "rsa-ps"
algorithm = "PS256"
public_key_file = "{fixtures}/rsa_public.pem"

[[auth.keys]]
kid = "ec-1"
algorithm = "ES256"
public_key_file = "{fixtures}/ec256_public.pem"

[[auth.keys]]
kid = "ec384-1"
algorithm = "ES384"
public_key_file = "{fixtures}/ec384_public.pem"

[[auth.keys]]
kid = "ed-1"
algorithm = "EdDSA"
public_key_file = "{fixtures}/ed25519_public.pem"

[[auth.keys]]
kid = "hs-1"
algorithm = "HS256"
secret_file = "{fixtures}/hmac_secret.txt"
"#;

impl TestConfig {
    /// `[upstream]` lines: the test's own, plus short timeouts it did not set itself.
    fn upstream_lines(&self) -> String {
        let mut lines = self.upstream.clone();
        if !lines.contains("connect_timeout") {
            lines.push_str("\nconnect_timeout = \"1s\"");
        }
        if !lines.contains("request_timeout") {
            lines.push_str("\nrequest_timeout = \"5s\"");
        }
        lines
    }

    /// `[auth]` lines: the test's own, plus `leeway = "30s"` and `team_claim = "team"` unless
    /// it set them itself.
    fn auth_lines(&self) -> String {
        let mut lines = self.auth.clone();
        if !lines.contains("leeway") {
            lines.push_str("\nleeway = \"30s\"");
        }
        if !lines.contains("team_claim") {
            lines.push_str("\nteam_claim = \"team\"");
        }
        lines
    }

    pub fn render(&self, eu: &str, na: &str, token_file: &Path) -> String {
        let fixtures = fixture("");
        let fixtures = fixtures.to_string_lossy();
        let fixtures = fixtures.trim_end_matches('/');
        let (eu, na) = match &self.region_urls {
            Some((e, n)) => (e.as_str(), n.as_str()),
            None => (eu, na),
        };
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "5s"
{server}

[upstream]
token_file = "{token}"
{upstream}

[regions.eu]
base_url = "{eu}"
[regions.na]
base_url = "{na}"
{na_region}

[routing]
{routing}
[routing.agents]
{agents}

[auth]
issuers = ["{ISSUER}"]
audiences = ["{AUDIENCE}"]
{auth}

{keys}

{teams}

[cache]
{cache}

[log]
format = "json"
level = "info"

{extra}
"#,
            token = token_file.display(),
            server = self.server,
            upstream = self.upstream_lines(),
            na_region = self.na_region,
            routing = self.routing,
            agents = self.agents,
            auth = self.auth_lines(),
            keys = self.keys.replace("{fixtures}", fixtures),
            teams = self.teams,
            cache = self.cache,
            extra = self.extra,
        )
    }
}

/// The mock EU and NA regions, with the agents of [`EU_AGENTS`] and [`NA_AGENTS`].
pub async fn mocks() -> (MockConvocore, MockConvocore) {
    let eu = MockConvocore::start("eu", UPSTREAM_TOKEN, EU_AGENTS)
        .await
        .unwrap();
    let na = MockConvocore::start("na", UPSTREAM_TOKEN, NA_AGENTS)
        .await
        .unwrap();
    (eu, na)
}

/// A running gateway with its two mock regions.
pub struct Gateway {
    pub addr: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
    pub eu: MockConvocore,
    pub na: MockConvocore,
    pub dir: tempfile::TempDir,
    pub state: Arc<State>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

/// The agents and conversations the mocks know.
pub const EU_AGENTS: &[(&str, &[&str])] = &[
    ("agent-eu", &["c1", "c2", "c3"]),
    ("agent-eu-unmapped", &["c1", "c2"]),
];
pub const NA_AGENTS: &[(&str, &[&str])] = &[
    ("agent-na", &["c1", "c2", "c3"]),
    ("agent-na-unmapped", &["c1", "c2"]),
];

impl Gateway {
    pub async fn start() -> Gateway {
        Self::start_with(TestConfig::default()).await
    }

    pub async fn start_with(config: TestConfig) -> Gateway {
        let (eu, na) = mocks().await;
        Self::start_with_mocks(config, eu, na).await
    }

    pub async fn start_with_mocks(
        config: TestConfig,
        eu: MockConvocore,
        na: MockConvocore,
    ) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("convocore-token");
        std::fs::write(&token_file, format!("{UPSTREAM_TOKEN}\n")).unwrap();
        let text = config.render(&eu.base_url(), &na.base_url(), &token_file);
        let path = dir.path().join("config.toml");
        std::fs::write(&path, &text).unwrap();
        let limits = config.limits.unwrap_or_default();
        let config = Config::load(&path).unwrap_or_else(|e| panic!("config: {e}\n{text}"));
        let state = State::build(config).unwrap_or_else(|e| panic!("state: {e}"));
        let listeners = Listeners::bind(([127, 0, 0, 1], 0).into(), ([127, 0, 0, 1], 0).into())
            .await
            .unwrap();
        let addr = listeners.api.local_addr().unwrap();
        let admin = listeners.admin.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(convocore_gateway::run_with(
            state.clone(),
            listeners,
            async move {
                let _ = rx.await;
            },
            limits,
        ));
        Gateway {
            addr,
            admin,
            eu,
            na,
            dir,
            state,
            shutdown: Some(tx),
            task: Some(task),
            client: Client::builder(TokioExecutor::new())
                // Below the admin listener's 2 s idle timeout, as a well-behaved client keeps it:
                // a connection the server may be closing is not reused.
                .pool_idle_timeout(Duration::from_secs(1))
                .build_http(),
        }
    }

    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("convocore-token")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// Renders `config` against this gateway's mocks, as its config file would hold it.
    pub fn render(&self, config: &TestConfig) -> String {
        config.render(&self.eu.base_url(), &self.na.base_url(), &self.token_file())
    }

    /// Replaces the config file the way Kubernetes updates a mounted ConfigMap: the new text
    /// is written beside it and renamed over it (a new inode).
    pub fn replace_config(&self, text: &str) {
        let path = self.config_path();
        let next = self.dir.path().join("config.toml.next");
        std::fs::write(&next, text).unwrap();
        std::fs::rename(&next, &path).unwrap();
    }

    /// Reloads the config file now, as `SIGHUP` does.
    pub async fn reload(&self) -> Result<(), ConfigError> {
        convocore_gateway::reload::reload(&self.state, "test").await
    }

    /// Starts the graceful shutdown and returns the server task to await.
    pub fn shutdown(&mut self) -> tokio::task::JoinHandle<std::io::Result<()>> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.take().unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A request to the API listener.
    pub async fn request(&self, method: Method, path: &str, headers: &[(&str, &str)]) -> Resp {
        send(&self.client, method, &self.url(path), headers).await
    }

    /// `GET path` with `Authorization: Bearer token`.
    pub async fn get(&self, path: &str, token: &str) -> Resp {
        self.request(
            Method::GET,
            path,
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await
    }

    /// `method` on [`EXPORT_EU`] as the `billing` team, with `headers` besides its
    /// `Authorization` (conditions, `Accept-Encoding`).
    pub async fn billing_export(&self, method: Method, headers: &[(&str, &str)]) -> Resp {
        let bearer = format!("Bearer {}", token("billing"));
        let mut all = vec![("authorization", bearer.as_str())];
        all.extend_from_slice(headers);
        self.request(method, EXPORT_EU, &all).await
    }

    /// A request to the admin listener.
    pub async fn admin(&self, method: Method, path: &str, headers: &[(&str, &str)]) -> Resp {
        send(
            &self.client,
            method,
            &format!("http://{}{}", self.admin, path),
            headers,
        )
        .await
    }

    /// All requests both mocks saw.
    pub fn upstream_count(&self) -> usize {
        self.eu.request_count() + self.na.request_count()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

pub async fn send(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
) -> Resp {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Resp {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts the contract's error shape and code.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text());
        assert_eq!(self.header("content-type"), Some("application/json"));
        let v = self.json();
        assert_eq!(v["code"], code, "{v}");
        assert!(v["message"].is_string(), "{v}");
    }
}

/// Default valid claims for `team`.
pub fn claims(team: &str) -> serde_json::Value {
    serde_json::json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": format!("{team}-user"),
        "team": team,
        "iat": now(),
        "exp": now() + 3600,
    })
}

/// Signs `claims` with a fixture key: alg picks the key (RS256/PS256 rsa, ES256 ec256,
/// ES384 ec384, EdDSA ed25519, HS256 the HMAC secret); `kid` is put in the header if given.
pub fn mint(alg: Algorithm, kid: Option<&str>, claims: &serde_json::Value) -> String {
    let key = match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => EncodingKey::from_rsa_pem(&fixture_bytes("rsa_private.pem")).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&fixture_bytes("ec256_private.pem")).unwrap(),
        Algorithm::ES384 => EncodingKey::from_ec_pem(&fixture_bytes("ec384_private.pem")).unwrap(),
        Algorithm::EdDSA => {
            EncodingKey::from_ed_pem(&fixture_bytes("ed25519_private.pem")).unwrap()
        }
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            EncodingKey::from_secret(&fixture_bytes("hmac_secret.txt"))
        }
        other => panic!("no fixture key for {other:?}"),
    };
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

/// A valid RS256 token (kid rsa-1) for `team`.
pub fn token(team: &str) -> String {
    mint(Algorithm::RS256, Some("rsa-1"), &claims(team))
}

/// Polls `check` until it holds, for at most `limit` (for file watchers and background work).
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub const EXPORT_EU: &str = "/v3/agents/agent-eu/convos/c1/export";
pub const EXPORT_NA: &str = "/v3/agents/agent-na/convos/c1/export";

/// A test CA and a `localhost` server certificate it signed: (ca_pem, cert_pem, key_pem).
pub fn test_pki() -> (String, String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "convocore-gateway test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

/// Fires `n` concurrent GETs of `path` and returns every response.
pub async fn concurrent(gw: &Arc<Gateway>, n: usize, path: &'static str, token: &str) -> Vec<Resp> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let gw = gw.clone();
        let token = token.to_string();
        set.spawn(async move { gw.get(path, &token).await });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        out.push(r.unwrap());
    }
    out
}

/// `GET /metrics` on the admin listener, as text.
pub async fn metrics_text(gw: &Gateway) -> String {
    let r = gw.admin(http::Method::GET, "/metrics", &[]).await;
    assert_eq!(r.status, 200);
    r.text()
}

/// The value of one series (`name{label="v"}` exactly as exposed) in Prometheus text; 0 when
/// absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.trim().parse::<f64>().ok())?
        })
        .unwrap_or(0.0)
}
