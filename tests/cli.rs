//! The command line as an operator meets it: the real `convocore-gateway` binary, started as a
//! child process with its own config file, signals sent with `kill`, output read from its pipes
//! (the harness is `tests/common/process.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::process::*;
use common::*;

use std::fmt::Display;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use convocore_gateway::testing::mock::{Faults, MockConvocore};
use http::Method;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

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

/// One `[[auth.keys]]` entry whose key comes from `source` (`public_key_file`, `secret_file`,
/// `secret_env`) = `value`.
fn one_key(kid: &str, algorithm: &str, source: &str, value: impl Display) -> String {
    format!("[[auth.keys]]\nkid = \"{kid}\"\nalgorithm = \"{algorithm}\"\n{source} = \"{value}\"\n")
}

/// A config change: `[log]` with this format, level info.
fn log_format(format: &'static str) -> impl Fn(&mut ProcConfig) {
    move |c| {
        c.set("log.format", format).set("log.level", "info");
    }
}

/// Asserts a configuration error (`what`, in the failure messages): exit 2, and stderr names
/// the key (a missing file has none) and the file; nothing secret in the output.
fn assert_config_error(
    what: &str,
    f: &Finished,
    key: Option<&str>,
    file: &Path,
    extra_secrets: &[&str],
) {
    assert_eq!(
        f.code,
        Some(2),
        "{what}: expected exit status 2 for {key:?}\nstdout: {}\nstderr: {}",
        f.stdout,
        f.stderr
    );
    if let Some(key) = key {
        assert!(
            f.stderr.contains(key),
            "{what}: the message does not name the key {key}:\n{}",
            f.stderr
        );
    }
    let file = file.display().to_string();
    assert!(
        f.stderr.contains(&file),
        "{what}: the message does not name the file {file}:\n{}",
        f.stderr
    );
    assert_no_secrets(
        &format!("{what}: the error output"),
        &f.all(),
        extra_secrets,
    );
}

/// The mocks, the EU one answering after `delay`, and a gateway in front of them.
async fn with_slow_eu(
    delay: Duration,
    change: impl Fn(&mut ProcConfig),
) -> (GatewayProcess, MockConvocore, MockConvocore) {
    let (eu, na) = mocks().await;
    eu.set_faults(Faults {
        delay,
        ..Default::default()
    });
    let gw = GatewayProcess::start(&eu, &na, change).await;
    (gw, eu, na)
}

/// Sends an EU export from a task of its own, and returns that task once the (slow) upstream
/// has the request.
async fn send_in_flight(
    gw: &GatewayProcess,
    eu: &MockConvocore,
) -> tokio::task::JoinHandle<Result<Resp, String>> {
    let url = gw.api_url(EXPORT_EU);
    let auth = bearer(&token("team-a"));
    let inflight = tokio::spawn(async move {
        try_send(
            &http_client(),
            Method::GET,
            &url,
            &[("authorization", &auth)],
        )
        .await
    });
    assert!(
        eventually(Duration::from_secs(10), || async {
            eu.request_count() >= 1
        })
        .await,
        "the request never reached the upstream"
    );
    inflight
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
    let path = ProcConfig::new(dir.path())
        .set("server.listen", "127.0.0.1:18080")
        .set("server.admin_listen", "127.0.0.1:19090")
        .write(&dir.path().join("gateway.toml"));
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
    let mut cfg = ProcConfig::new(dir.path());
    cfg.remove("upstream.token_file")
        .set("upstream.token_env", token_var.as_str());
    cfg.test.keys = one_key("hs-env", "HS256", "secret_env", &secret_var);
    let path = cfg.write(&dir.path().join("config.toml"));
    let f = run_to_end(
        check_config_cmd(&path)
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
    let path = ProcConfig::new(dir.path()).write(&dir.path().join("from-env.toml"));
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
    let f = run_to_end(check_config_cmd(&path).env("CONVOCORE_GATEWAY_CONFIG", &missing));
    assert_eq!(f.code, Some(0), "{f:?}");
}

#[test]
fn the_config_path_defaults_to_config_toml_in_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    ProcConfig::new(dir.path()).write(&dir.path().join("config.toml"));
    let f = run_to_end(gateway_cmd().arg("check-config").current_dir(dir.path()));
    assert_eq!(f.code, Some(0), "{f:?}");

    let empty = tempfile::tempdir().unwrap();
    let f = run_to_end(gateway_cmd().arg("check-config").current_dir(empty.path()));
    assert_eq!(f.code, Some(2), "{f:?}");
    assert!(f.stderr.contains("config.toml"), "{}", f.stderr);
}

// ---------------------------------------------------------------------------------------------
// Configuration errors exit 2 naming the key and the file
// ---------------------------------------------------------------------------------------------

/// A change to a valid config.
type Edit = Box<dyn Fn(&mut ProcConfig)>;

/// One broken config file: how it differs from a valid one, and what its error must say.
struct Broken {
    what: &'static str,
    /// Turns a valid config into the broken one; `None`: there is no file at all.
    edit: Option<Edit>,
    /// The key the message names (a missing file has none).
    key: Option<&'static str>,
    /// More the message must name: the variable, file or value at fault.
    mentions: Vec<String>,
    /// Values besides the upstream token and the HMAC secret that must not be echoed.
    secrets: Vec<String>,
    /// The child's environment: a variable set, or removed (`None`).
    env: Vec<(String, Option<String>)>,
    /// Whether running the gateway with the file is checked as well as `check-config`.
    run_too: bool,
}

impl Broken {
    fn edit(
        what: &'static str,
        key: &'static str,
        edit: impl Fn(&mut ProcConfig) + 'static,
    ) -> Self {
        Broken {
            what,
            edit: Some(Box::new(edit)),
            key: Some(key),
            mentions: Vec::new(),
            secrets: Vec::new(),
            env: Vec::new(),
            run_too: false,
        }
    }

    /// A row whose `[[auth.keys]]` entries are `keys`.
    fn keys(what: &'static str, key: &'static str, keys: String) -> Self {
        Self::edit(what, key, move |c| c.test.keys = keys.clone())
    }

    fn no_file(what: &'static str) -> Self {
        Broken {
            what,
            edit: None,
            key: None,
            mentions: Vec::new(),
            secrets: Vec::new(),
            env: Vec::new(),
            run_too: false,
        }
    }

    fn mentions(mut self, text: impl Into<String>) -> Self {
        self.mentions.push(text.into());
        self
    }

    fn secret(mut self, value: &str) -> Self {
        self.secrets.push(value.to_string());
        self
    }

    fn env(mut self, var: &str, value: Option<&str>) -> Self {
        self.env.push((var.to_string(), value.map(str::to_string)));
        self
    }

    /// Also run the gateway with the file: it fails the same way, before listening.
    fn run_too(mut self) -> Self {
        self.run_too = true;
        self
    }
}

/// Each broken file makes `check-config` (and, where a row says so, running the gateway) exit 2
/// with a message that names the key and the file, and echoes no secret.
#[test]
fn a_config_error_exits_2_naming_the_key_and_the_file_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let unset = unique_var("UNSET");
    let short_env = unique_var("SHORT_SECRET");
    let short = "short-hmac-secret-31-bytes-long"; // 31 bytes
    assert_eq!(short.len(), 31);
    let short_file = dir.path().join("short-secret");
    std::fs::write(&short_file, short).unwrap();
    let bad_pem = dir.path().join("bad.pem");
    std::fs::write(
        &bad_pem,
        "-----BEGIN PUBLIC KEY-----\nthis is not base64 at all!!\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let absent_pem = dir.path().join("keys/absent-idp.pem");
    let hmac_file = fixture("hmac_secret.txt");
    let misplaced = "misplaced-upstream-token-value-0123456789";

    let rows = vec![
        Broken::no_file("a missing config file").run_too(),
        Broken::edit("an unknown key", "cache.max_byte", |c| {
            c.test.cache = "max_byte = 1\n".into();
        })
        .run_too(),
        Broken::edit("a bad duration", "cache.ttl", |c| {
            c.test.cache = "ttl = \"soon\"\n".into();
        }),
        Broken::edit("a bad size in [cache]", "cache.max_bytes", |c| {
            c.test.cache = "max_bytes = \"lots\"\n".into();
        }),
        Broken::edit(
            "a bad size in [upstream]",
            "upstream.max_response_bytes",
            |c| {
                c.test
                    .upstream
                    .push_str("max_response_bytes = \"32 parsecs\"\n");
            },
        ),
        Broken::edit("no token source", "upstream.token_env", |c| {
            c.remove("upstream.token_file");
        }),
        Broken::edit(
            "a token_env naming an unset variable",
            "upstream.token_env",
            {
                let var = unset.clone();
                move |c| {
                    c.remove("upstream.token_file")
                        .set("upstream.token_env", var.as_str());
                }
            },
        )
        .env(&unset, None)
        .mentions(&unset),
        Broken::keys(
            "an unreadable public key file",
            "auth.keys[0].public_key_file",
            one_key("rsa-1", "RS256", "public_key_file", absent_pem.display()),
        )
        .mentions("absent-idp.pem"),
        Broken::keys(
            "a PEM that does not parse",
            "auth.keys[0].public_key_file",
            one_key("rsa-1", "RS256", "public_key_file", bad_pem.display()),
        ),
        // A secret file named as a public key by mistake: an error, and the secret is not echoed.
        Broken::keys(
            "a secret file as a public key",
            "auth.keys[0].public_key_file",
            one_key("oops", "ES256", "public_key_file", hmac_file.display()),
        ),
        Broken::edit(
            "a default region naming no region",
            "routing.default_region",
            |c| {
                c.test.routing = "default_region = \"mars\"\n".into();
            },
        )
        .mentions("mars"),
        Broken::keys(
            "an HMAC secret file shorter than 32 bytes",
            "auth.keys[0].secret_file",
            one_key("hs-short", "HS256", "secret_file", short_file.display()),
        )
        .secret(short),
        Broken::keys(
            "an HMAC secret_env shorter than 32 bytes",
            "auth.keys[0].secret_env",
            one_key("hs-short", "HS256", "secret_env", &short_env),
        )
        .env(&short_env, Some(short))
        .secret(short),
        // An operator who puts a secret into the file by mistake (under a key that does not
        // exist) gets an error naming the key; the message must not echo the line with the value.
        Broken::edit(
            "a secret under an unknown key",
            "upstream.token",
            move |c| {
                c.test
                    .upstream
                    .push_str(&format!("token = \"{misplaced}\"\n"));
            },
        )
        .secret(misplaced),
    ];

    // Every file is written before any command starts (they share the token file); then the
    // commands run side by side.
    let paths: Vec<PathBuf> = (0..rows.len())
        .map(|i| dir.path().join(format!("config-{i}.toml")))
        .collect();
    for (row, path) in rows.iter().zip(&paths) {
        if let Some(edit) = &row.edit {
            let mut cfg = ProcConfig::new(dir.path());
            edit(&mut cfg);
            cfg.write(path);
        }
    }
    let mut running = Vec::new();
    for (row, path) in rows.iter().zip(&paths) {
        let modes: &[(&str, &[&str])] = &[("check-config", &["check-config"]), ("run", &[])];
        let modes = if row.run_too { modes } else { &modes[..1] };
        for &(mode, subcommand) in modes {
            let mut cmd = gateway_cmd();
            cmd.args(subcommand).arg("--config").arg(path);
            for (var, value) in &row.env {
                match value {
                    Some(v) => cmd.env(var, v),
                    None => cmd.env_remove(var),
                };
            }
            let what = format!("{} ({mode})", row.what);
            running.push((what, row, path, Proc::spawn(&mut cmd)));
        }
    }
    for (what, row, path, proc) in running {
        let f = proc.finish();
        let secrets: Vec<&str> = row.secrets.iter().map(String::as_str).collect();
        assert_config_error(&what, &f, row.key, path, &secrets);
        for text in &row.mentions {
            assert!(
                f.stderr.contains(text.as_str()),
                "{what}: the message should name {text}: {}",
                f.stderr
            );
        }
    }
}

#[test]
fn a_port_already_in_use_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let (_, admin_port) = free_ports();
    let path = ProcConfig::new(dir.path())
        .set("server.listen", held.local_addr().unwrap().to_string())
        .set("server.admin_listen", format!("127.0.0.1:{admin_port}"))
        .write(&dir.path().join("config.toml"));
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
    let mut gw = GatewayProcess::start(&eu, &na, |_| {}).await;

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
    let mut gw = GatewayProcess::start(&eu, &na, log_format("json")).await;

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
    let access: Vec<serde_json::Value> = gw
        .proc
        .stdout_json()
        .into_iter()
        .filter(|v| v["request_id"].is_string())
        .collect();
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
            "queue_ms",
        ] {
            assert!(v.get(field).is_some(), "{id}: no {field} in {v}");
        }
        // The wait for an upstream slot: 0 for a request that never queued.
        assert!(v["queue_ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{v}");
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
    let (mut gw, eu, _na) = with_slow_eu(Duration::from_millis(2000), |_| {}).await;
    assert_eq!(gw.admin_get("/readyz").await.status, 200);

    // A request that is still waiting on the slow upstream when SIGTERM arrives.
    let inflight = send_in_flight(&gw, &eu).await;
    assert!(!inflight.is_finished());

    gw.proc.send_signal("-TERM");
    let signalled = Instant::now();

    // /readyz turns 503 at once, and the admin listener keeps answering during the drain.
    let admin = http_client();
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
            SHUTDOWN_GRACE + Duration::from_secs(5),
            "after SIGTERM, within shutdown_grace",
        )
        .await;
}

/// Requests still in flight when `shutdown_grace` runs out do not hold the process: it exits 0
/// long before the (very slow) upstream answers.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_grace_bounds_the_drain() {
    let (mut gw, eu, _na) = with_slow_eu(Duration::from_secs(30), |c| {
        c.set("server.shutdown_grace", "1s");
    })
    .await;
    let inflight = send_in_flight(&gw, &eu).await;
    gw.proc.send_signal("-TERM");
    gw.proc
        .expect_exit_0(Duration::from_secs(15), "with shutdown_grace = 1s")
        .await;
    inflight.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_exits_0() {
    let (eu, na) = mocks().await;
    let mut gw = GatewayProcess::start(&eu, &na, log_format("text")).await;
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

    let line = demo
        .wait_for_line(STARTUP, "a curl line", |l| {
            l.contains("curl ") && l.contains("Authorization: Bearer ey")
        })
        .await;
    let (token, url) = parse_curl(&line);
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    if held.is_some() {
        assert!(!url.starts_with("http://127.0.0.1:8080/"), "{url}");
    }
    assert_eq!(token.split('.').count(), 3, "not a JWT: {token}");

    let c = http_client();
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
    if let Some(csv_line) = demo
        .stdout_lines()
        .into_iter()
        .find(|l| l.contains("curl ") && l.contains("format=csv"))
    {
        let (_, csv_url) = parse_curl(&csv_line);
        let r = try_send(&c, Method::GET, &csv_url, &[("authorization", &auth)])
            .await
            .unwrap_or_else(|e| panic!("GET {csv_url}: {e}"));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-convocore-region"), Some("na"));
    }

    demo.send_signal("-TERM");
    demo.expect_exit_0(Duration::from_secs(20), "the demo after SIGTERM")
        .await;
    drop(held);
}

/// The one log line a request can cause besides its access line (discovery's) carries the
/// request id in its span, even from the task that fetches for it.
#[tokio::test(flavor = "multi_thread")]
async fn log_lines_during_a_request_carry_its_request_id() {
    let (eu, na) = mocks().await;
    let mut gw = GatewayProcess::start(&eu, &na, log_format("json")).await;
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
    let lines = gw.proc.stdout_json();
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
    let (mut gw, eu, _na) = with_slow_eu(Duration::from_secs(2), log_format("json")).await;
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
    let access: Vec<serde_json::Value> = gw
        .proc
        .stdout_json()
        .into_iter()
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
    // Its export had gone upstream: the line says for how long so far.
    assert!(
        line["upstream_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{line}"
    );
    assert_eq!(eu.request_count(), 1);
}

/// `SIGHUP` reloads the config file in the running binary (it used to end the process): a
/// `[teams]` change and the log level apply to the next request, a changed listen address is
/// logged and waits for a restart, an invalid file is refused and counted, and the process
/// goes on until SIGTERM ends it with 0.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_config_and_keeps_running() {
    let (eu, na) = mocks().await;
    let mut gw = GatewayProcess::start(&eu, &na, |c| {
        c.set("log.format", "json").set("log.level", "warn");
    })
    .await;
    let auth = bearer(&token("team-a"));
    let authorized = [("authorization", auth.as_str())];
    assert_eq!(gw.get(EXPORT_EU, &authorized).await.status, 200);
    let access_lines = |gw: &GatewayProcess| {
        gw.proc
            .stdout_json()
            .iter()
            .filter(|l| l["target"] == "access")
            .count()
    };
    assert_eq!(access_lines(&gw), 0, "level warn: no access line");

    // teams now refuse team-a for EU, the level is info, and the listen address moves.
    let mut text = gw.config.render();
    text.push_str("\n[teams]\nteam-a = { agents = [\"agent-na\"] }\n");
    let text = text
        .replace("level = \"warn\"", "level = \"info\"")
        .replace(
            &format!("\nlisten = \"{}\"", gw.api),
            "\nlisten = \"127.0.0.1:1\"",
        );
    std::fs::write(&gw.config_path, &text).unwrap();
    gw.proc.send_signal("-HUP");
    gw.proc
        .wait_for_line(QUICK, "the reload", |l| {
            l.contains("configuration reloaded")
        })
        .await;
    assert!(gw.proc.exited().is_none(), "SIGHUP ended the process");
    let r = gw.get(EXPORT_EU, &authorized).await;
    assert_eq!(r.status, 403, "the new [teams]: {}", r.text());
    gw.proc
        .wait_for_line(QUICK, "an access line at info", |l| {
            l.contains("\"target\":\"access\"") && l.contains("\"status\":403")
        })
        .await;
    gw.proc
        .wait_for_line(QUICK, "the listen warning", |l| {
            l.contains("server.listen changed") && l.contains("127.0.0.1:1")
        })
        .await;

    // An invalid file: refused, logged with its key and file, counted; the process goes on.
    std::fs::write(
        &gw.config_path,
        text.replace("[cache]", "[cache]\nmax_byte = 3"),
    )
    .unwrap();
    gw.proc.send_signal("-HUP");
    let line = gw
        .proc
        .wait_for_line(QUICK, "the refusal", |l| {
            l.contains("configuration reload refused")
        })
        .await;
    assert!(line.contains("cache.max_byte"), "{line}");
    assert!(line.contains("config.toml"), "{line}");
    assert_no_secrets("the refusal line", &line, &[]);
    assert_eq!(
        gw.get(EXPORT_EU, &authorized).await.status,
        403,
        "the last good config stays"
    );
    let metrics = gw.admin_get("/metrics").await.text();
    for line in [
        r#"convocore_gateway_config_reloads_total{result="ok"} 1"#,
        r#"convocore_gateway_config_reloads_total{result="error"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    let (out, err) = gw.stop_with("-TERM").await;
    assert_no_secrets("stdout", &out, &[]);
    assert_no_secrets("stderr", &err, &[]);
}
