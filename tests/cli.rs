//! The command line as an operator meets it: the real `convocore-gateway` binary, started as a
//! child process with its own config file, signals sent with `kill`, output read from its pipes.
//!
//! Every child is owned by a [`Proc`] guard that kills it when dropped, so a failing assertion
//! never leaves a gateway behind. Only 127.0.0.1 is used.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use convocore_gateway::testing::mock::{Faults, MockConvocore};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

const BIN: &str = env!("CARGO_BIN_EXE_convocore-gateway");

/// How long a short-lived command (check-config, a config error) may take.
const QUICK: Duration = Duration::from_secs(30);
/// How long a gateway may take to answer `/healthz` after it is started.
const STARTUP: Duration = Duration::from_secs(30);
/// `server.shutdown_grace` in the configs these tests write.
const GRACE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------------

/// A command for the binary with a clean environment for the variables it reads.
fn gateway_cmd() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("CONVOCORE_GATEWAY_CONFIG")
        .env_remove("RUST_LOG")
        .env_remove("CONVOCORE_API_TOKEN")
        .stdin(Stdio::null());
    cmd
}

/// A started child with its stdout and stderr drained into buffers by reader threads (so a full
/// pipe never stalls it). Dropping it kills the child if it still runs.
struct Proc {
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    status: Option<ExitStatus>,
}

fn drain(
    mut from: impl Read + Send + 'static,
    into: Arc<Mutex<Vec<u8>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => into.lock().unwrap().extend_from_slice(&buf[..n]),
            }
        }
    })
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            drain(child.stdout.take().unwrap(), out.clone()),
            drain(child.stderr.take().unwrap(), err.clone()),
        ];
        Proc {
            child,
            out,
            err,
            readers,
            status: None,
        }
    }

    /// The exit status if the child has exited (reaps it).
    fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Sends a signal with the `kill` command; only while the child is unreaped, so the pid is
    /// still ours.
    fn signal(&mut self, sig: &str) {
        assert!(
            self.exited().is_none(),
            "the gateway exited before {sig}: {:?}\nstderr: {}",
            self.status,
            self.stderr()
        );
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} failed: {status}");
    }

    /// Waits (blocking the thread) at most `limit` for the child to exit.
    fn wait_blocking(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (without blocking the runtime) at most `limit` for the child to exit.
    async fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (without blocking the runtime) at most `limit` for the exit, lets the readers
    /// reach end of file, and asserts the process exited 0; `what` says what it was waiting
    /// for, in the failure message.
    async fn expect_exit_0(&mut self, limit: Duration, what: &str) {
        let status = self.wait(limit).await;
        self.settle();
        let status = status.unwrap_or_else(|| {
            panic!(
                "no exit within {limit:?} ({what})\nstdout: {}\nstderr: {}",
                self.stdout(),
                self.stderr()
            )
        });
        assert!(
            status.success(),
            "{what}: exit {status}\nstdout: {}\nstderr: {}",
            self.stdout(),
            self.stderr()
        );
    }

    /// Everything read from stdout so far.
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// Everything read from stderr so far.
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    /// After exit: lets the reader threads reach end of file (bounded), so the buffers hold
    /// all the child wrote.
    fn settle(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for r in std::mem::take(&mut self.readers) {
            if r.is_finished() {
                let _ = r.join();
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a finished short-lived command left.
#[derive(Debug)]
struct Finished {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Finished {
    fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Runs a command that is expected to end by itself, within [`QUICK`].
fn run_to_end(cmd: &mut Command) -> Finished {
    let mut p = Proc::spawn(cmd);
    let status = p.wait_blocking(QUICK);
    assert!(
        status.is_some(),
        "the command did not finish within {QUICK:?}\nstdout: {}\nstderr: {}",
        p.stdout(),
        p.stderr()
    );
    p.settle();
    Finished {
        code: status.and_then(|s| s.code()),
        stdout: p.stdout(),
        stderr: p.stderr(),
    }
}

/// `convocore-gateway check-config --config <path>`.
fn check_config(path: &Path) -> Finished {
    run_to_end(gateway_cmd().arg("check-config").arg("--config").arg(path))
}

// ---------------------------------------------------------------------------------------------
// Config files
// ---------------------------------------------------------------------------------------------

/// The HMAC secret of the fixture key `hs-1` (read by the gateway from its file).
fn hmac_secret() -> String {
    String::from_utf8(fixture_bytes("hmac_secret.txt")).unwrap()
}

/// Values that must never show up in anything the binary prints.
fn secrets() -> Vec<String> {
    vec![UPSTREAM_TOKEN.to_string(), hmac_secret()]
}

fn assert_no_secrets(what: &str, text: &str, extra: &[&str]) {
    for s in secrets()
        .iter()
        .map(String::as_str)
        .chain(extra.iter().copied())
    {
        assert!(!s.is_empty());
        assert!(
            !text.contains(s),
            "{what} contains the secret {s:?}:\n{text}"
        );
    }
}

/// The parts of a config file a test changes; `render` writes a complete, valid file.
#[derive(Clone)]
struct Cfg {
    listen: String,
    admin: String,
    grace: String,
    /// `[upstream]` body (token source and timeouts).
    upstream: String,
    eu: String,
    na: String,
    /// `[routing]` body.
    routing: String,
    /// The `[[auth.keys]]` entries.
    keys: String,
    /// `[cache]` body.
    cache: String,
    /// `[log]` body.
    log: String,
}

impl Cfg {
    /// A valid config: the upstream token in `dir/convocore-token`, an RS256 key and the HS256
    /// fixture secret, regions pointing at a closed port.
    fn new(dir: &Path) -> Cfg {
        let token_file = dir.join("convocore-token");
        std::fs::write(&token_file, format!("{UPSTREAM_TOKEN}\n")).unwrap();
        Cfg {
            listen: "127.0.0.1:18080".into(),
            admin: "127.0.0.1:19090".into(),
            grace: format!("{}s", GRACE.as_secs()),
            upstream: format!(
                "token_file = \"{}\"\nconnect_timeout = \"1s\"\nrequest_timeout = \"10s\"\n",
                token_file.display()
            ),
            eu: "http://127.0.0.1:9/v3".into(),
            na: "http://127.0.0.1:9/v3".into(),
            routing: "default_region = \"eu\"\ndiscover = true\n[routing.agents]\n\"agent-eu\" = \"eu\"\n\"agent-na\" = \"na\"\n".into(),
            keys: format!(
                r#"
[[auth.keys]]
kid = "rsa-1"
algorithm = "RS256"
public_key_file = "{rsa}"

[[auth.keys]]
kid = "hs-1"
algorithm = "HS256"
secret_file = "{hmac}"
"#,
                rsa = fixture("rsa_public.pem").display(),
                hmac = fixture("hmac_secret.txt").display(),
            ),
            cache: "enabled = false\n".into(),
            log: "format = \"json\"\nlevel = \"info\"\n".into(),
        }
    }

    fn render(&self) -> String {
        format!(
            r#"
[server]
listen = "{listen}"
admin_listen = "{admin}"
shutdown_grace = "{grace}"

[upstream]
{upstream}

[regions.eu]
base_url = "{eu}"
[regions.na]
base_url = "{na}"

[routing]
{routing}

[auth]
issuers = ["{ISSUER}"]
audiences = ["{AUDIENCE}"]
leeway = "30s"
team_claim = "team"

{keys}

[cache]
{cache}

[log]
{log}
"#,
            listen = self.listen,
            admin = self.admin,
            grace = self.grace,
            upstream = self.upstream,
            eu = self.eu,
            na = self.na,
            routing = self.routing,
            keys = self.keys,
            cache = self.cache,
            log = self.log,
        )
    }

    /// Writes the file as `dir/name` and returns its path.
    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.render()).unwrap();
        path
    }
}

/// An environment variable name no one else uses.
fn unique_var(what: &str) -> String {
    format!(
        "CCGW_CLI_TEST_{what}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// Asserts a configuration error: exit 2, and stderr names the key and the file.
fn assert_config_error(f: &Finished, key: &str, file: &Path, extra_secrets: &[&str]) {
    assert_eq!(
        f.code,
        Some(2),
        "expected exit status 2 for {key}\nstdout: {}\nstderr: {}",
        f.stdout,
        f.stderr
    );
    assert!(
        f.stderr.contains(key),
        "the message does not name the key {key}:\n{}",
        f.stderr
    );
    let file = file.display().to_string();
    assert!(
        f.stderr.contains(&file),
        "the message does not name the file {file}:\n{}",
        f.stderr
    );
    assert_no_secrets("the error output", &f.all(), extra_secrets);
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A request that may fail (connection refused, timeout) instead of panicking.
async fn try_send(
    client: &HttpClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Resp, String> {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok::<_, String>(Resp {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(Duration::from_secs(15), exchange)
        .await
        .map_err(|_| "timed out".to_string())?
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Two distinct ports that were free a moment ago on 127.0.0.1.
fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

// ---------------------------------------------------------------------------------------------
// A running gateway
// ---------------------------------------------------------------------------------------------

struct Running {
    proc: Proc,
    api: SocketAddr,
    admin: SocketAddr,
    client: HttpClient,
    _dir: tempfile::TempDir,
}

impl Running {
    /// Starts `convocore-gateway --config <file>` in front of the two mocks on free ports
    /// (retrying with other ports if one was taken meanwhile), and waits for `/healthz`.
    async fn start(eu: &MockConvocore, na: &MockConvocore, change: impl Fn(&mut Cfg)) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let mut last_failure = String::new();
        for _attempt in 0..5 {
            let (api_port, admin_port) = free_ports();
            let api: SocketAddr = ([127, 0, 0, 1], api_port).into();
            let admin: SocketAddr = ([127, 0, 0, 1], admin_port).into();
            let mut cfg = Cfg::new(dir.path());
            cfg.listen = api.to_string();
            cfg.admin = admin.to_string();
            cfg.eu = eu.base_url();
            cfg.na = na.base_url();
            change(&mut cfg);
            let path = cfg.write(dir.path(), "config.toml");
            let mut proc = Proc::spawn(gateway_cmd().arg("--config").arg(&path));
            let client = client();
            let deadline = Instant::now() + STARTUP;
            loop {
                if let Some(status) = proc.exited() {
                    proc.settle();
                    last_failure = format!(
                        "the gateway exited at start ({status})\nstdout: {}\nstderr: {}",
                        proc.stdout(),
                        proc.stderr()
                    );
                    assert_eq!(status.code(), Some(1), "{last_failure}");
                    assert!(proc.stderr().contains("cannot listen"), "{last_failure}");
                    break; // a port was taken meanwhile: try others
                }
                let healthz = format!("http://{admin}/healthz");
                if let Ok(r) = try_send(&client, Method::GET, &healthz, &[]).await {
                    assert_eq!(r.status, 200, "/healthz: {}", r.text());
                    return Running {
                        proc,
                        api,
                        admin,
                        client,
                        _dir: dir,
                    };
                }
                assert!(
                    Instant::now() < deadline,
                    "/healthz did not answer within {STARTUP:?}\nstdout: {}\nstderr: {}",
                    proc.stdout(),
                    proc.stderr()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("could not start the gateway on free ports: {last_failure}");
    }

    fn api_url(&self, path: &str) -> String {
        format!("http://{}{}", self.api, path)
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        try_send(&self.client, Method::GET, &self.api_url(path), headers)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    async fn admin_get(&self, path: &str) -> Resp {
        try_send(&self.client, Method::GET, &self.admin_url(path), &[])
            .await
            .unwrap_or_else(|e| panic!("admin GET {path}: {e}"))
    }

    /// Sends `sig` and waits for the exit; asserts status 0 within the grace period (plus
    /// generous slack). Returns (stdout, stderr), complete.
    async fn stop_with(&mut self, sig: &str) -> (String, String) {
        self.proc.signal(sig);
        self.proc
            .expect_exit_0(GRACE + Duration::from_secs(10), sig)
            .await;
        (self.proc.stdout(), self.proc.stderr())
    }
}

async fn mocks() -> (MockConvocore, MockConvocore) {
    let eu = MockConvocore::start("eu", UPSTREAM_TOKEN, EU_AGENTS)
        .await
        .unwrap();
    let na = MockConvocore::start("na", UPSTREAM_TOKEN, NA_AGENTS)
        .await
        .unwrap();
    (eu, na)
}

/// An RS256 token signed by the unrelated `rsa2` key (a bad signature), with `rsa-1`'s kid.
fn token_bad_signature(team: &str) -> String {
    let key = EncodingKey::from_rsa_pem(&fixture_bytes("rsa2_private.pem")).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    jsonwebtoken::encode(&header, &claims(team), &key).unwrap()
}

/// A correctly signed HS256 token that expired an hour ago.
fn token_expired_hs256(team: &str) -> String {
    let mut c = claims(team);
    c["iat"] = (now() - 7200).into();
    c["exp"] = (now() - 3600).into();
    mint(Algorithm::HS256, Some("hs-1"), &c)
}

/// The JWT's signature segment: must not show up on its own either.
fn signature_of(jwt: &str) -> &str {
    jwt.rsplit('.').next().unwrap()
}

// ---------------------------------------------------------------------------------------------
// --help, --version
// ---------------------------------------------------------------------------------------------

#[test]
fn help_lists_the_subcommands_and_exits_0() {
    let f = run_to_end(gateway_cmd().arg("--help"));
    assert_eq!(f.code, Some(0), "{f:?}");
    assert!(f.stdout.contains("check-config"), "{}", f.stdout);
    assert!(f.stdout.contains("demo"), "{}", f.stdout);
    assert!(f.stdout.contains("--config"), "{}", f.stdout);
}

#[test]
fn version_prints_the_cargo_version_and_exits_0() {
    let f = run_to_end(gateway_cmd().arg("--version"));
    assert_eq!(f.code, Some(0), "{f:?}");
    assert!(f.stdout.contains(env!("CARGO_PKG_VERSION")), "{}", f.stdout);
}

// ---------------------------------------------------------------------------------------------
// check-config: a valid file
// ---------------------------------------------------------------------------------------------

#[test]
fn check_config_accepts_a_valid_file_and_prints_a_summary_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let path = Cfg::new(dir.path()).write(dir.path(), "gateway.toml");
    let f = check_config(&path);
    assert_eq!(f.code, Some(0), "{f:?}");
    assert!(f.stdout.contains("OK"), "{}", f.stdout);
    assert!(
        f.stdout.contains(&path.display().to_string()),
        "{}",
        f.stdout
    );
    assert!(f.stdout.contains("127.0.0.1:18080"), "{}", f.stdout);
    assert!(f.stdout.contains("127.0.0.1:19090"), "{}", f.stdout);
    assert!(f.stdout.contains("http://127.0.0.1:9/v3"), "{}", f.stdout);
    assert!(f.stdout.contains("RS256"), "{}", f.stdout);
    assert!(f.stdout.contains("HS256"), "{}", f.stdout);
    assert_no_secrets("check-config output", &f.all(), &[]);
}

#[test]
fn check_config_with_env_sources_never_prints_their_values() {
    let dir = tempfile::tempdir().unwrap();
    let token_var = unique_var("TOKEN");
    let secret_var = unique_var("SECRET");
    let token_value = "env-upstream-token-zzzz-0123456789abcdef";
    let secret_value = "env-hmac-secret-value-that-is-long-enough-0123";
    let mut cfg = Cfg::new(dir.path());
    cfg.upstream = format!("token_env = \"{token_var}\"\n");
    cfg.keys = format!(
        "[[auth.keys]]\nkid = \"hs-env\"\nalgorithm = \"HS256\"\nsecret_env = \"{secret_var}\"\n"
    );
    let path = cfg.write(dir.path(), "config.toml");
    let f = run_to_end(
        gateway_cmd()
            .args(["check-config", "--config"])
            .arg(&path)
            .env(&token_var, token_value)
            .env(&secret_var, secret_value),
    );
    assert_eq!(f.code, Some(0), "{f:?}");
    assert!(f.stdout.contains("OK"), "{}", f.stdout);
    assert_no_secrets(
        "check-config output",
        &f.all(),
        &[token_value, secret_value],
    );
}

#[test]
fn the_config_path_comes_from_the_environment_when_no_flag_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let path = Cfg::new(dir.path()).write(dir.path(), "from-env.toml");
    let f = run_to_end(
        gateway_cmd()
            .arg("check-config")
            .env("CONVOCORE_GATEWAY_CONFIG", &path),
    );
    assert_eq!(f.code, Some(0), "{f:?}");
    assert!(f.stdout.contains("from-env.toml"), "{}", f.stdout);

    let missing = dir.path().join("no-such-config.toml");
    let f = run_to_end(
        gateway_cmd()
            .arg("check-config")
            .env("CONVOCORE_GATEWAY_CONFIG", &missing),
    );
    assert_eq!(f.code, Some(2), "{f:?}");
    assert!(f.stderr.contains("no-such-config.toml"), "{}", f.stderr);

    // --config wins over the environment.
    let f = run_to_end(
        gateway_cmd()
            .args(["check-config", "--config"])
            .arg(&path)
            .env("CONVOCORE_GATEWAY_CONFIG", &missing),
    );
    assert_eq!(f.code, Some(0), "{f:?}");
}

#[test]
fn the_config_path_defaults_to_config_toml_in_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    Cfg::new(dir.path()).write(dir.path(), "config.toml");
    let f = run_to_end(gateway_cmd().arg("check-config").current_dir(dir.path()));
    assert_eq!(f.code, Some(0), "{f:?}");

    let empty = tempfile::tempdir().unwrap();
    let f = run_to_end(gateway_cmd().arg("check-config").current_dir(empty.path()));
    assert_eq!(f.code, Some(2), "{f:?}");
    assert!(f.stderr.contains("config.toml"), "{}", f.stderr);
}

// ---------------------------------------------------------------------------------------------
// check-config: configuration errors exit 2 naming the key and the file
// ---------------------------------------------------------------------------------------------

#[test]
fn a_missing_config_file_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.toml");
    let f = check_config(&missing);
    assert_eq!(f.code, Some(2), "{f:?}");
    assert!(
        f.stderr.contains(&missing.display().to_string()),
        "{}",
        f.stderr
    );
    // The same when running the gateway.
    let f = run_to_end(gateway_cmd().arg("--config").arg(&missing));
    assert_eq!(f.code, Some(2), "{f:?}");
}

#[test]
fn an_unknown_key_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Cfg::new(dir.path());
    cfg.cache = "max_byte = 1\n".into();
    let path = cfg.write(dir.path(), "config.toml");
    assert_config_error(&check_config(&path), "cache.max_byte", &path, &[]);
    // Running the gateway with it fails the same way, before listening.
    let f = run_to_end(gateway_cmd().arg("--config").arg(&path));
    assert_config_error(&f, "cache.max_byte", &path, &[]);
}

#[test]
fn a_bad_duration_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Cfg::new(dir.path());
    cfg.cache = "ttl = \"soon\"\n".into();
    let path = cfg.write(dir.path(), "config.toml");
    assert_config_error(&check_config(&path), "cache.ttl", &path, &[]);
}

#[test]
fn a_bad_size_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Cfg::new(dir.path());
    cfg.cache = "max_bytes = \"lots\"\n".into();
    let path = cfg.write(dir.path(), "config.toml");
    assert_config_error(&check_config(&path), "cache.max_bytes", &path, &[]);

    let mut cfg = Cfg::new(dir.path());
    cfg.upstream
        .push_str("max_response_bytes = \"32 parsecs\"\n");
    let path = cfg.write(dir.path(), "config2.toml");
    assert_config_error(
        &check_config(&path),
        "upstream.max_response_bytes",
        &path,
        &[],
    );
}

#[test]
fn a_missing_token_source_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Cfg::new(dir.path());
    cfg.upstream = "connect_timeout = \"1s\"\n".into();
    let path = cfg.write(dir.path(), "config.toml");
    assert_config_error(&check_config(&path), "upstream.token_env", &path, &[]);
}

#[test]
fn a_token_env_naming_an_unset_variable_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let var = unique_var("UNSET");
    let mut cfg = Cfg::new(dir.path());
    cfg.upstream = format!("token_env = \"{var}\"\n");
    let path = cfg.write(dir.path(), "config.toml");
    let f = run_to_end(
        gateway_cmd()
            .args(["check-config", "--config"])
            .arg(&path)
            .env_remove(&var),
    );
    assert_config_error(&f, "upstream.token_env", &path, &[]);
    assert!(
        f.stderr.contains(&var),
        "the message should name {var}: {}",
        f.stderr
    );
}

#[test]
fn an_unreadable_public_key_file_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Cfg::new(dir.path());
    let absent = dir.path().join("keys/absent-idp.pem");
    cfg.keys = format!(
        "[[auth.keys]]\nkid = \"rsa-1\"\nalgorithm = \"RS256\"\npublic_key_file = \"{}\"\n",
        absent.display()
    );
    let path = cfg.write(dir.path(), "config.toml");
    let f = check_config(&path);
    assert_config_error(&f, "auth.keys[0].public_key_file", &path, &[]);
    assert!(f.stderr.contains("absent-idp.pem"), "{}", f.stderr);
}

#[test]
fn a_pem_that_does_not_parse_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.pem");
    std::fs::write(
        &bad,
        "-----BEGIN PUBLIC KEY-----\nthis is not base64 at all!!\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let mut cfg = Cfg::new(dir.path());
    cfg.keys = format!(
        "[[auth.keys]]\nkid = \"rsa-1\"\nalgorithm = \"RS256\"\npublic_key_file = \"{}\"\n",
        bad.display()
    );
    let path = cfg.write(dir.path(), "config.toml");
    assert_config_error(
        &check_config(&path),
        "auth.keys[0].public_key_file",
        &path,
        &[],
    );

    // A secret file named as a public key by mistake: an error, and the secret is not echoed.
    let mut cfg = Cfg::new(dir.path());
    cfg.keys = format!(
        "[[auth.keys]]\nkid = \"oops\"\nalgorithm = \"ES256\"\npublic_key_file = \"{}\"\n",
        fixture("hmac_secret.txt").display()
    );
    let path = cfg.write(dir.path(), "config2.toml");
    assert_config_error(
        &check_config(&path),
        "auth.keys[0].public_key_file",
        &path,
        &[],
    );
}

#[test]
fn a_default_region_naming_no_region_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Cfg::new(dir.path());
    cfg.routing = "default_region = \"mars\"\n".into();
    let path = cfg.write(dir.path(), "config.toml");
    let f = check_config(&path);
    assert_config_error(&f, "routing.default_region", &path, &[]);
    assert!(f.stderr.contains("mars"), "{}", f.stderr);
}

#[test]
fn an_hmac_secret_shorter_than_32_bytes_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let short = "short-hmac-secret-31-bytes-long"; // 31 bytes
    assert_eq!(short.len(), 31);

    // From a file.
    let secret_file = dir.path().join("short-secret");
    std::fs::write(&secret_file, short).unwrap();
    let mut cfg = Cfg::new(dir.path());
    cfg.keys = format!(
        "[[auth.keys]]\nkid = \"hs-short\"\nalgorithm = \"HS256\"\nsecret_file = \"{}\"\n",
        secret_file.display()
    );
    let path = cfg.write(dir.path(), "config.toml");
    assert_config_error(
        &check_config(&path),
        "auth.keys[0].secret_file",
        &path,
        &[short],
    );

    // From the environment.
    let var = unique_var("SHORT_SECRET");
    let mut cfg = Cfg::new(dir.path());
    cfg.keys = format!(
        "[[auth.keys]]\nkid = \"hs-short\"\nalgorithm = \"HS256\"\nsecret_env = \"{var}\"\n"
    );
    let path = cfg.write(dir.path(), "config2.toml");
    let f = run_to_end(
        gateway_cmd()
            .args(["check-config", "--config"])
            .arg(&path)
            .env(&var, short),
    );
    assert_config_error(&f, "auth.keys[0].secret_env", &path, &[short]);
}

/// An operator who puts a secret into the file by mistake (under a key that does not exist)
/// gets an error naming the key; the message must not echo the line with the value.
#[test]
fn a_config_error_does_not_echo_the_offending_value() {
    let dir = tempfile::tempdir().unwrap();
    let misplaced = "misplaced-upstream-token-value-0123456789";
    let mut cfg = Cfg::new(dir.path());
    cfg.upstream.push_str(&format!("token = \"{misplaced}\"\n"));
    let path = cfg.write(dir.path(), "config.toml");
    assert_config_error(&check_config(&path), "upstream.token", &path, &[misplaced]);
}

#[test]
fn a_port_already_in_use_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let (_, admin_port) = free_ports();
    let mut cfg = Cfg::new(dir.path());
    cfg.listen = held.local_addr().unwrap().to_string();
    cfg.admin = format!("127.0.0.1:{admin_port}");
    let path = cfg.write(dir.path(), "config.toml");
    let f = run_to_end(gateway_cmd().arg("--config").arg(&path));
    drop(held);
    assert_eq!(f.code, Some(1), "{f:?}");
    assert!(f.stderr.contains("cannot listen"), "{}", f.stderr);
    assert_no_secrets("the error output", &f.all(), &[]);
}

// ---------------------------------------------------------------------------------------------
// Running the gateway
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_serves_exports_and_answers_health_checks() {
    let (eu, na) = mocks().await;
    let mut gw = Running::start(&eu, &na, |_| {}).await;

    let r = gw.admin_get("/healthz").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = gw.admin_get("/readyz").await;
    assert_eq!(r.status, 200, "{}", r.text());

    let r = gw
        .get(EXPORT_EU, &[("authorization", &bearer(&token("team-a")))])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-convocore-region"), Some("eu"));
    assert_eq!(r.json()["data"]["metadata"]["convo"]["id"], "c1");
    let seen = eu.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].headers["authorization"],
        bearer(UPSTREAM_TOKEN).as_str()
    );

    let r = gw
        .get(EXPORT_NA, &[("authorization", &bearer(&token("team-a")))])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-convocore-region"), Some("na"));

    let r = gw.get(EXPORT_EU, &[]).await;
    r.assert_error(401, "UNAUTHORIZED");

    gw.stop_with("-TERM").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_json_access_log_has_one_line_per_request_and_no_secrets() {
    let (eu, na) = mocks().await;
    let mut gw = Running::start(&eu, &na, |c| {
        c.log = "format = \"json\"\nlevel = \"info\"\n".into();
    })
    .await;

    let good = token("team-a");
    let bad_sig = token_bad_signature("team-b");
    let expired = token_expired_hs256("team-c");
    let hs_good = mint(Algorithm::HS256, Some("hs-1"), &claims("team-h"));
    let secret = hmac_secret();

    // (request id, path, authorization, expected status)
    let csv = format!("{EXPORT_NA}?format=csv");
    let requests: Vec<(&str, &str, String, u16)> = vec![
        ("cli-log-1", EXPORT_EU, bearer(&good), 200),
        ("cli-log-2", csv.as_str(), bearer(&hs_good), 200),
        ("cli-log-3", EXPORT_EU, bearer(&bad_sig), 401),
        ("cli-log-4", EXPORT_EU, bearer(&expired), 401),
        // A caller sending the shared token or the HMAC secret as its bearer token.
        ("cli-log-5", EXPORT_EU, bearer(UPSTREAM_TOKEN), 401),
        ("cli-log-6", EXPORT_EU, bearer(&secret), 401),
        ("cli-log-7", EXPORT_EU, String::new(), 401),
    ];
    for (id, path, auth, status) in &requests {
        let mut headers = vec![("x-request-id", *id)];
        if !auth.is_empty() {
            headers.push(("authorization", auth.as_str()));
        }
        let r = gw.get(path, &headers).await;
        assert_eq!(r.status.as_u16(), *status, "{id}: {}", r.text());
        assert_eq!(r.header("x-request-id"), Some(*id));
    }

    let (stdout, stderr) = gw.stop_with("-TERM").await;

    // Nothing secret, anywhere.
    let everything = format!("{stdout}\n{stderr}");
    let jwts = [&good, &bad_sig, &expired, &hs_good];
    let mut forbidden: Vec<&str> = jwts.iter().map(|t| t.as_str()).collect();
    forbidden.extend(jwts.iter().map(|t| signature_of(t)));
    assert_no_secrets("the gateway's output", &everything, &forbidden);

    // Every stdout line is JSON; the access lines are one per request.
    let mut access = Vec::new();
    for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a stdout line is not JSON ({e}): {line}"));
        if v["request_id"].is_string() {
            access.push(v);
        }
    }
    assert_eq!(
        access.len(),
        requests.len(),
        "one access line per request expected:\n{stdout}"
    );
    for (id, path, _, status) in &requests {
        let lines: Vec<_> = access.iter().filter(|v| v["request_id"] == *id).collect();
        assert_eq!(lines.len(), 1, "{id}: {lines:?}");
        let v = lines[0];
        for field in [
            "request_id",
            "team",
            "agent",
            "convo",
            "format",
            "region",
            "status",
            "cache",
            "duration_ms",
            "upstream_ms",
        ] {
            assert!(v.get(field).is_some(), "{id}: no {field} in {v}");
        }
        assert!(v["status"].is_number(), "{v}");
        assert_eq!(v["status"].as_u64(), Some(u64::from(*status)), "{v}");
        assert!(v["duration_ms"].is_number(), "{v}");
        assert!(v["upstream_ms"].is_number(), "{v}");
        for field in ["team", "agent", "convo", "format", "region", "cache"] {
            assert!(v[field].is_string(), "{id}: {field} is not a string: {v}");
        }
        if *status == 200 {
            assert_eq!(v["agent"], path.split('/').nth(3).unwrap(), "{v}");
            assert_eq!(v["convo"], "c1", "{v}");
        }
    }
    let first = access
        .iter()
        .find(|v| v["request_id"] == "cli-log-1")
        .unwrap();
    assert_eq!(first["team"], "team-a", "{first}");
    assert_eq!(first["agent"], "agent-eu", "{first}");
    assert_eq!(first["format"], "json", "{first}");
    assert_eq!(first["region"], "eu", "{first}");
    let second = access
        .iter()
        .find(|v| v["request_id"] == "cli-log-2")
        .unwrap();
    assert_eq!(second["team"], "team-h", "{second}");
    assert_eq!(second["format"], "csv", "{second}");
    assert_eq!(second["region"], "na", "{second}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests_and_exits_0() {
    let (eu, na) = mocks().await;
    eu.set_faults(Faults {
        delay: Duration::from_millis(2000),
        ..Default::default()
    });
    let mut gw = Running::start(&eu, &na, |_| {}).await;
    assert_eq!(gw.admin_get("/readyz").await.status, 200);

    // A request that is still waiting on the slow upstream when SIGTERM arrives.
    let url = gw.api_url(EXPORT_EU);
    let auth = bearer(&token("team-a"));
    let inflight = tokio::spawn(async move {
        let c = client();
        try_send(&c, Method::GET, &url, &[("authorization", &auth)]).await
    });
    assert!(
        eventually(Duration::from_secs(10), || async {
            eu.request_count() >= 1
        })
        .await,
        "the request never reached the upstream"
    );
    assert!(!inflight.is_finished());

    gw.proc.signal("-TERM");
    let signalled = Instant::now();

    // /readyz turns 503 at once, and the admin listener keeps answering during the drain.
    let admin = client();
    let readyz = gw.admin_url("/readyz");
    let mut last = String::new();
    let mut not_ready = false;
    while signalled.elapsed() < Duration::from_millis(1500) {
        match try_send(&admin, Method::GET, &readyz, &[]).await {
            Ok(r) if r.status == 503 => {
                r.assert_error(503, "SERVICE_UNAVAILABLE");
                not_ready = true;
                break;
            }
            Ok(r) => last = format!("{} {}", r.status, r.text()),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(not_ready, "/readyz did not turn 503 promptly; last: {last}");
    assert_eq!(gw.admin_get("/healthz").await.status, 200);

    // The API listener no longer accepts new connections.
    let mut refused = false;
    while signalled.elapsed() < Duration::from_millis(1500) {
        match TcpStream::connect_timeout(&gw.api, Duration::from_millis(200)) {
            Err(_) => {
                refused = true;
                break;
            }
            Ok(s) => drop(s),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        refused,
        "the API port still accepts connections after SIGTERM"
    );
    assert!(
        gw.proc.exited().is_none() && !inflight.is_finished(),
        "the drain should still be going on (the upstream takes 2s)"
    );

    // The in-flight request completes.
    let r = tokio::time::timeout(Duration::from_secs(20), inflight)
        .await
        .expect("the in-flight request did not complete")
        .unwrap()
        .unwrap_or_else(|e| panic!("the in-flight request failed: {e}"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"]["metadata"]["convo"]["id"], "c1");

    // And the process exits 0 within shutdown_grace (with slack for a loaded machine).
    gw.proc
        .expect_exit_0(
            GRACE + Duration::from_secs(5),
            "after SIGTERM, within shutdown_grace",
        )
        .await;
}

/// Requests still in flight when `shutdown_grace` runs out do not hold the process: it exits 0
/// long before the (very slow) upstream answers.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_grace_bounds_the_drain() {
    let (eu, na) = mocks().await;
    eu.set_faults(Faults {
        delay: Duration::from_secs(30),
        ..Default::default()
    });
    let mut gw = Running::start(&eu, &na, |c| c.grace = "1s".into()).await;
    let url = gw.api_url(EXPORT_EU);
    let auth = bearer(&token("team-a"));
    let inflight = tokio::spawn(async move {
        let c = client();
        try_send(&c, Method::GET, &url, &[("authorization", &auth)]).await
    });
    assert!(
        eventually(Duration::from_secs(10), || async {
            eu.request_count() >= 1
        })
        .await,
        "the request never reached the upstream"
    );
    gw.proc.signal("-TERM");
    gw.proc
        .expect_exit_0(Duration::from_secs(15), "with shutdown_grace = 1s")
        .await;
    inflight.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_exits_0() {
    let (eu, na) = mocks().await;
    let mut gw = Running::start(&eu, &na, |c| {
        c.log = "format = \"text\"\nlevel = \"info\"\n".into();
    })
    .await;
    let r = gw
        .get(EXPORT_EU, &[("authorization", &bearer(&token("team-a")))])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let jwt = token("team-b");
    let r = gw
        .get(EXPORT_EU, &[("authorization", &bearer(&format!("{jwt}x")))])
        .await;
    r.assert_error(401, "UNAUTHORIZED");
    let (stdout, stderr) = gw.stop_with("-INT").await;
    // `[log] format = "text"`: plain lines, the access line among them.
    assert!(stdout.contains("convocore-gateway started"), "{stdout}");
    assert!(stdout.contains("status=200"), "{stdout}");
    assert!(stdout.contains("status=401"), "{stdout}");
    assert!(!stdout.trim_start().starts_with('{'), "{stdout}");
    assert_no_secrets(
        "the gateway's output",
        &format!("{stdout}\n{stderr}"),
        &[&jwt, signature_of(&jwt)],
    );
}

// ---------------------------------------------------------------------------------------------
// demo
// ---------------------------------------------------------------------------------------------

/// Finds `Bearer <token>` and the quoted `http://...` URL in a printed curl line.
fn parse_curl(line: &str) -> (String, String) {
    let token = line
        .split("Bearer ")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no bearer token in {line:?}"))
        .to_string();
    let url = line
        .split('"')
        .find(|part| part.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_string();
    (token, url)
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_prints_a_working_curl_line_and_stops_on_sigterm() {
    // Hold 8080 when we can, so the fallback to free ports is exercised as well.
    let held = TcpListener::bind("127.0.0.1:8080").ok();
    let mut demo = Proc::spawn(gateway_cmd().arg("demo"));

    let deadline = Instant::now() + STARTUP;
    let line = loop {
        let out = demo.stdout();
        if let Some(line) = out
            .lines()
            .find(|l| l.contains("curl ") && l.contains("Authorization: Bearer ey"))
        {
            break line.to_string();
        }
        if let Some(status) = demo.exited() {
            demo.settle();
            panic!(
                "the demo exited ({status}) before printing a curl line\nstdout: {}\nstderr: {}",
                demo.stdout(),
                demo.stderr()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no curl line within {STARTUP:?}\nstdout: {out}\nstderr: {}",
            demo.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (token, url) = parse_curl(&line);
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    if held.is_some() {
        assert!(!url.starts_with("http://127.0.0.1:8080/"), "{url}");
    }
    assert_eq!(token.split('.').count(), 3, "not a JWT: {token}");

    let c = client();
    let auth = bearer(&token);
    let r = try_send(&c, Method::GET, &url, &[("authorization", &auth)])
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{:?}",
        r.headers
    );
    assert!(r.json().is_object());

    // The second curl line uses $TOKEN for a CSV export that the gateway discovers in NA.
    let out = demo.stdout();
    if let Some(csv_line) = out
        .lines()
        .find(|l| l.contains("curl ") && l.contains("format=csv"))
    {
        let (_, csv_url) = parse_curl(csv_line);
        let r = try_send(&c, Method::GET, &csv_url, &[("authorization", &auth)])
            .await
            .unwrap_or_else(|e| panic!("GET {csv_url}: {e}"));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-convocore-region"), Some("na"));
    }

    demo.signal("-TERM");
    demo.expect_exit_0(Duration::from_secs(20), "the demo after SIGTERM")
        .await;
    drop(held);
}

/// The one log line a request can cause besides its access line (discovery's) carries the
/// request id in its span, even from the task that fetches for it.
#[tokio::test(flavor = "multi_thread")]
async fn log_lines_during_a_request_carry_its_request_id() {
    let (eu, na) = mocks().await;
    let mut gw = Running::start(&eu, &na, |c| {
        c.log = "format = \"json\"\nlevel = \"info\"\n".into();
    })
    .await;
    let r = gw
        .get(
            "/v3/agents/agent-na-unmapped/convos/c1/export",
            &[
                ("x-request-id", "cli-span-1"),
                ("authorization", &bearer(&token("team-a"))),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-convocore-region"), Some("na"));
    let (stdout, _) = gw.stop_with("-TERM").await;
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let discovered = lines
        .iter()
        .find(|v| v["message"] == "discovered the agent's region")
        .unwrap_or_else(|| panic!("no discovery line:\n{stdout}"));
    assert_eq!(
        discovered["span"]["request_id"], "cli-span-1",
        "{discovered}"
    );
    assert_eq!(discovered["region"], "na");
    let access = lines
        .iter()
        .find(|v| v["request_id"] == "cli-span-1")
        .unwrap_or_else(|| panic!("no access line:\n{stdout}"));
    assert_eq!(access["region"], "na");
    assert_eq!(access["cache"], "miss");
}

/// A client that goes away before its response still gets its one access line, with nginx's
/// 499, and is counted in requests_total; the fetch it began was cut short with it.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_the_client_abandons_is_logged_and_counted_as_499() {
    use tokio::io::AsyncWriteExt;
    let (eu, na) = mocks().await;
    eu.set_faults(Faults {
        delay: Duration::from_secs(2),
        ..Default::default()
    });
    let mut gw = Running::start(&eu, &na, |c| {
        c.log = "format = \"json\"\nlevel = \"info\"\n".into();
    })
    .await;
    let mut stream = tokio::net::TcpStream::connect(gw.api).await.unwrap();
    let request = format!(
        "GET /v3/agents/agent-eu/convos/c1/export HTTP/1.1\r\nhost: gw\r\n\
         authorization: {}\r\nx-request-id: cli-gone-1\r\n\r\n",
        bearer(&token("team-a"))
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    // The request reaches the (slow) upstream, then the client hangs up.
    assert!(eventually(Duration::from_secs(5), || async { eu.request_count() == 1 }).await);
    drop(stream);
    let counted = |m: &str| {
        m.lines().any(|l| {
            l.starts_with("convocore_gateway_requests_total{")
                && l.contains(r#"status="499""#)
                && l.ends_with(" 1")
        })
    };
    let last = Arc::new(Mutex::new(String::new()));
    let seen = eventually(Duration::from_secs(5), || {
        let (gw, last) = (&gw, last.clone());
        async move {
            let text = gw.admin_get("/metrics").await.text();
            let ok = counted(&text);
            *last.lock().unwrap() = text;
            ok
        }
    })
    .await;
    let metrics = last.lock().unwrap().clone();
    assert!(seen, "no 499 in requests_total:\n{metrics}");
    assert!(
        metrics.contains("convocore_gateway_inflight_requests 0"),
        "{metrics}"
    );
    let (stdout, _) = gw.stop_with("-TERM").await;
    let access: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["request_id"] == "cli-gone-1")
        .collect();
    assert_eq!(access.len(), 1, "exactly one access line:\n{stdout}");
    let line = &access[0];
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["team"], "team-a", "{line}");
    assert_eq!(line["agent"], "agent-eu", "{line}");
    assert_eq!(line["target"], "access", "{line}");
    assert!(
        line["error"].as_str().unwrap().contains("client closed"),
        "{line}"
    );
    assert_eq!(eu.request_count(), 1);
}
