//! The real `convocore-gateway` binary as a child process: started with its own config file,
//! signalled with the `kill` command, its stdout and stderr drained into buffers, waited for.
//!
//! Every child is owned by a [`Proc`] guard that kills it when dropped, so a failing assertion
//! never leaves a gateway behind. Only 127.0.0.1 is used.
//!
//! - [`Proc`]: any child (`Proc::spawn(gateway_cmd().arg("demo"))`): `send_signal`,
//!   `stdout_lines`/`stdout_json`, `wait_for_line`, `expect_exit_0`; `finish` for one that
//!   ends by itself.
//! - [`run_to_end`] / [`check_config`]: a command that ends by itself, as a [`Finished`].
//! - [`ProcConfig`]: a config file, written from a [`TestConfig`] plus what only a process sets
//!   (listen addresses, shutdown grace, log format, token source).
//! - [`GatewayProcess::start`]: the gateway in front of two mocks on free ports, healthy.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use super::*;

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Instant;

pub const BIN: &str = env!("CARGO_BIN_EXE_convocore-gateway");

/// How long a short-lived command (check-config, a config error) may take.
pub const QUICK: Duration = Duration::from_secs(30);
/// How long a gateway may take to answer `/healthz` after it is started.
pub const STARTUP: Duration = Duration::from_secs(30);
/// `server.shutdown_grace` in the files [`ProcConfig`] writes, unless a test sets its own.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------------

/// A command for the binary with a clean environment for the variables it reads.
pub fn gateway_cmd() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("CONVOCORE_GATEWAY_CONFIG")
        .env_remove("RUST_LOG")
        .env_remove("CONVOCORE_API_TOKEN")
        .stdin(Stdio::null());
    cmd
}

/// `convocore-gateway check-config --config <path>`, to run or to add environment to.
pub fn check_config_cmd(path: &Path) -> Command {
    let mut cmd = gateway_cmd();
    cmd.arg("check-config").arg("--config").arg(path);
    cmd
}

/// A started child with its stdout and stderr drained into buffers by reader threads (so a full
/// pipe never stalls it). Dropping it kills the child if it still runs.
pub struct Proc {
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
    /// Starts `cmd` with piped stdout and stderr.
    pub fn spawn(cmd: &mut Command) -> Proc {
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

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the child has exited (reaps it).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Sends a signal (`"-TERM"`, `"-INT"`, `"-HUP"`, ...) with the `kill` command; only while
    /// the child is unreaped, so the pid is still ours.
    pub fn send_signal(&mut self, sig: &str) {
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
    pub fn wait_blocking(&mut self, limit: Duration) -> Option<ExitStatus> {
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
    pub async fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
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
    pub async fn expect_exit_0(&mut self, limit: Duration, what: &str) {
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

    /// Waits (without blocking the runtime) at most `limit` for a stdout line that `wanted`
    /// accepts and returns it; panics if the child exits first or the time runs out. `what`
    /// names the line in the failure message.
    pub async fn wait_for_line(
        &mut self,
        limit: Duration,
        what: &str,
        wanted: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let out = self.stdout();
            let complete = out.rfind('\n').map_or("", |end| &out[..end]);
            if let Some(line) = complete.lines().find(|l| wanted(l)) {
                return line.to_string();
            }
            if let Some(status) = self.exited() {
                self.settle();
                panic!(
                    "the process exited ({status}) before printing {what}\nstdout: {}\nstderr: {}",
                    self.stdout(),
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {limit:?}\nstdout: {}\nstderr: {}",
                self.stdout(),
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything read from stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// Everything read from stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    /// The lines read from stdout so far (while the child runs, the last may be incomplete).
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout().lines().map(str::to_string).collect()
    }

    /// The non-blank stdout lines so far, each parsed as JSON (the log with `format = "json"`);
    /// panics naming a line that is not JSON.
    pub fn stdout_json(&self) -> Vec<serde_json::Value> {
        self.stdout_lines()
            .iter()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("a stdout line is not JSON ({e}): {line}"))
            })
            .collect()
    }

    /// After exit: lets the reader threads reach end of file (bounded), so the buffers hold
    /// all the child wrote.
    pub fn settle(&mut self) {
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
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// stdout and stderr together.
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

impl Proc {
    /// Waits (blocking the thread) for a command that is expected to end by itself, within
    /// [`QUICK`], and returns what it left.
    pub fn finish(mut self) -> Finished {
        let status = self.wait_blocking(QUICK);
        assert!(
            status.is_some(),
            "the command did not finish within {QUICK:?}\nstdout: {}\nstderr: {}",
            self.stdout(),
            self.stderr()
        );
        self.settle();
        Finished {
            code: status.and_then(|s| s.code()),
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }
}

/// Runs a command that is expected to end by itself, within [`QUICK`].
pub fn run_to_end(cmd: &mut Command) -> Finished {
    Proc::spawn(cmd).finish()
}

/// `convocore-gateway check-config --config <path>`, run to its end.
pub fn check_config(path: &Path) -> Finished {
    run_to_end(&mut check_config_cmd(path))
}

// ---------------------------------------------------------------------------------------------
// Secrets in the output
// ---------------------------------------------------------------------------------------------

/// The HMAC secret of the fixture key `hs-1` (read by the gateway from its file).
pub fn hmac_secret() -> String {
    String::from_utf8(fixture_bytes("hmac_secret.txt")).unwrap()
}

/// Asserts that `text` (`what`, in the failure message) holds neither the upstream token, nor
/// the fixture HMAC secret, nor any of `extra`.
pub fn assert_no_secrets(what: &str, text: &str, extra: &[&str]) {
    let always = [UPSTREAM_TOKEN.to_string(), hmac_secret()];
    for s in always
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

// ---------------------------------------------------------------------------------------------
// Config files
// ---------------------------------------------------------------------------------------------

/// A config file for the binary: what a [`TestConfig`] renders, with settings put over it (on
/// the parsed TOML) for what `TestConfig` keeps fixed: `server.listen`, `log.format`, the
/// upstream token source, ...
#[derive(Clone)]
pub struct ProcConfig {
    /// Keys, routing, cache, teams, extra `[upstream]` lines, ...
    pub test: TestConfig,
    /// `regions.eu.base_url`.
    pub eu: String,
    /// `regions.na.base_url`.
    pub na: String,
    token_file: PathBuf,
    /// Dotted key and its value, or `None` to remove the key; applied in order.
    settings: Vec<(String, Option<toml::Value>)>,
}

impl ProcConfig {
    /// A valid config: [`TestConfig::default`] with the upstream token in `dir/convocore-token`,
    /// `request_timeout = "10s"`, `shutdown_grace` = [`SHUTDOWN_GRACE`], and both regions at a
    /// closed port (`http://127.0.0.1:9/v3`).
    pub fn new(dir: &Path) -> ProcConfig {
        let token_file = dir.join("convocore-token");
        std::fs::write(&token_file, format!("{UPSTREAM_TOKEN}\n")).unwrap();
        let mut config = ProcConfig {
            test: TestConfig {
                upstream: "request_timeout = \"10s\"\n".into(),
                ..TestConfig::default()
            },
            eu: "http://127.0.0.1:9/v3".into(),
            na: "http://127.0.0.1:9/v3".into(),
            token_file,
            settings: Vec::new(),
        };
        config.set(
            "server.shutdown_grace",
            format!("{}s", SHUTDOWN_GRACE.as_secs()),
        );
        config
    }

    /// Sets a dotted key (`"server.listen"`, `"log.format"`), creating the tables on its way.
    pub fn set(&mut self, key: &str, value: impl Into<toml::Value>) -> &mut Self {
        self.settings.push((key.to_string(), Some(value.into())));
        self
    }

    /// Removes a dotted key (`"upstream.token_file"`) if the file has it.
    pub fn remove(&mut self, key: &str) -> &mut Self {
        self.settings.push((key.to_string(), None));
        self
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let text = self.test.render(&self.eu, &self.na, &self.token_file);
        let mut file: toml::Table = text
            .parse()
            .unwrap_or_else(|e| panic!("TestConfig rendered invalid TOML ({e}):\n{text}"));
        for (key, value) in &self.settings {
            let mut path: Vec<&str> = key.split('.').collect();
            let last = path.pop().unwrap();
            let mut table = &mut file;
            for part in path {
                let entry = table
                    .entry(part)
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                table = entry
                    .as_table_mut()
                    .unwrap_or_else(|| panic!("{part} in {key} is not a table"));
            }
            match value {
                Some(v) => table.insert(last.to_string(), v.clone()),
                None => table.remove(last),
            };
        }
        toml::to_string(&file).unwrap()
    }

    /// Writes the file to `path` (replacing it) and returns the path.
    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.render()).unwrap();
        path.to_path_buf()
    }
}

/// Two distinct ports that were free a moment ago on 127.0.0.1.
pub fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        // Below the admin listener's 2 s idle timeout, as a well-behaved client keeps it:
        // a connection the server may be closing is not reused.
        .pool_idle_timeout(Duration::from_secs(1))
        .build_http()
}

/// A request that may fail (connection refused, timeout after 15 s) instead of panicking.
pub async fn try_send(
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

/// `Bearer <token>`, for an `authorization` header.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

// ---------------------------------------------------------------------------------------------
// A running gateway
// ---------------------------------------------------------------------------------------------

/// `convocore-gateway --config <file>` running and healthy.
pub struct GatewayProcess {
    pub proc: Proc,
    pub api: SocketAddr,
    pub admin: SocketAddr,
    /// The config it was started with (listen addresses included), to change and write again.
    pub config: ProcConfig,
    /// Its config file.
    pub config_path: PathBuf,
    client: HttpClient,
    _dir: tempfile::TempDir,
}

impl GatewayProcess {
    /// Starts `convocore-gateway --config <file>` in front of the two mocks on free ports
    /// (retrying with other ports if one was taken meanwhile), and waits for `/healthz`.
    /// `change` edits the config after the harness has set the regions and ports.
    pub async fn start(
        eu: &MockConvocore,
        na: &MockConvocore,
        change: impl Fn(&mut ProcConfig),
    ) -> GatewayProcess {
        let dir = tempfile::tempdir().unwrap();
        let mut last_failure = String::new();
        for _attempt in 0..5 {
            let (api_port, admin_port) = free_ports();
            let api: SocketAddr = ([127, 0, 0, 1], api_port).into();
            let admin: SocketAddr = ([127, 0, 0, 1], admin_port).into();
            let mut config = ProcConfig::new(dir.path());
            config.eu = eu.base_url();
            config.na = na.base_url();
            config.set("server.listen", api.to_string());
            config.set("server.admin_listen", admin.to_string());
            change(&mut config);
            let config_path = config.write(&dir.path().join("config.toml"));
            let mut proc = Proc::spawn(gateway_cmd().arg("--config").arg(&config_path));
            let client = http_client();
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
                    return GatewayProcess {
                        proc,
                        api,
                        admin,
                        config,
                        config_path,
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

    pub fn api_url(&self, path: &str) -> String {
        format!("http://{}{}", self.api, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// `GET path` on the API listener with `headers`; panics if there is no response.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        try_send(&self.client, Method::GET, &self.api_url(path), headers)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// `GET path` on the admin listener; panics if there is no response.
    pub async fn admin_get(&self, path: &str) -> Resp {
        try_send(&self.client, Method::GET, &self.admin_url(path), &[])
            .await
            .unwrap_or_else(|e| panic!("admin GET {path}: {e}"))
    }

    /// Sends `sig` and waits for the exit; asserts status 0 within the grace period (plus
    /// generous slack). Returns (stdout, stderr), complete.
    pub async fn stop_with(&mut self, sig: &str) -> (String, String) {
        self.proc.send_signal(sig);
        self.proc
            .expect_exit_0(SHUTDOWN_GRACE + Duration::from_secs(10), sig)
            .await;
        (self.proc.stdout(), self.proc.stderr())
    }
}
