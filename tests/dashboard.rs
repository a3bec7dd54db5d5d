#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The chart's Grafana dashboard (charts/convocore-gateway/files/dashboards/) against a real
//! Prometheus: a gateway takes traffic of every kind the panels show (hits, misses, stale
//! answers, several teams, refused callers, Convocore errors, jwks_url keys, a shared Redis), the `prometheus`
//! binary (Debian's package) scrapes its /metrics every second, and every panel's query, with
//! Grafana's variables filled in, must return data.

mod common;
use common::redis_server::{key_file, RedisServer};
use common::*;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use convocore_gateway::testing::mock::{serve_http, Faults};
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::time::{sleep, sleep_until, Instant};

const DASHBOARD: &str = "charts/convocore-gateway/files/dashboards/convocore-gateway.json";

/// Grafana's variables as a dashboard of the last few minutes would have them.
const VARIABLES: &[(&str, &str)] = &[
    ("${__rate_interval}", "1m"),
    ("$__rate_interval", "1m"),
    ("${__range}", "5m"),
    ("$__range", "5m"),
    ("${__interval}", "15s"),
    ("$__interval", "15s"),
];

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A `prometheus` process on a free loopback port, scraping `target`; killed when dropped.
struct Prometheus {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
    client: HttpClient,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        match Command::new("prometheus").arg("--version").output() {
            Ok(out) if out.status.success() => {}
            other => panic!(
                "this test needs the `prometheus` binary on PATH (Debian: apt-get install \
                 prometheus; .ci/run installs it): {other:?}"
            ),
        }
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: convocore-gateway\n    metrics_path: /metrics\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// `/api/v1/query` at the current time: the result vector, or why there is none.
    async fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let uri = format!("{}/api/v1/query?query={}", self.url, encode(promql));
        let req = Request::get(uri).body(Full::new(Bytes::new())).unwrap();
        let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_slice(&body.to_bytes()).map_err(|e| e.to_string())?;
        if !status.is_success() || v["status"] != "success" {
            return Err(format!("{status}: {v}"));
        }
        match v["data"]["resultType"].as_str() {
            Some("vector") => Ok(v["data"]["result"].as_array().unwrap().clone()),
            other => Err(format!("result type {other:?}, expected a vector: {v}")),
        }
    }

    /// Waits until Prometheus holds at least `n` successful scrapes of the gateway; returns
    /// how many it holds.
    async fn scrapes(&self, n: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(r) = self.query("sum(sum_over_time(up[5m]))").await {
                if let Some(got) = r.first().map(value).filter(|got| *got >= n) {
                    return got;
                }
            }
            if Instant::now() >= deadline {
                let log = std::fs::read_to_string(self.dir.path().join("prometheus.log"));
                panic!(
                    "Prometheus did not scrape the gateway {n} times in 15 s; its log:\n{log:?}"
                );
            }
            sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A sample's value (`"value": [time, "1.5"]`).
fn value(sample: &Value) -> f64 {
    sample["value"][1].as_str().unwrap().parse().unwrap()
}

/// Percent-encoding for a query string value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every query of the dashboard, rows' panels included: (panel title, expr).
fn queries(panels: &[Value], out: &mut Vec<(String, String)>) {
    for p in panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("a target without expr");
            out.push((p["title"].as_str().unwrap().to_string(), expr.to_string()));
        }
        queries(p["panels"].as_array().map_or(&[][..], |v| v), out);
    }
}

/// A plain-HTTP JWKS endpoint on loopback serving the fixture keys (the gateway allows http://
/// jwks_url on loopback): the gateway's jwks_url key source, for the JWKS panels.
async fn jwks_server() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    let doc = Bytes::from(fixture_bytes("jwks.json"));
    let handler = move |_req| {
        let doc = doc.clone();
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(doc))
                    .unwrap(),
            )
        }
    };
    let task = tokio::spawn(serve_http(listener, None, handler, || {}, None, || None));
    (url, task)
}

/// One round of traffic: Convocore EU failing (a cold key: 500; c1, when its cached entry has
/// expired: stale), then healthy (c1 miss or revalidated, hit), the support team on NA, a caller without a
/// token (401) and one whose team may not export (403, team other).
async fn wave(gw: &Gateway, stale_expected: bool) {
    let (billing, support, stranger) = (token("billing"), token("support"), token("stranger"));
    gw.eu.set_faults(Faults {
        status: Some(500),
        ..Default::default()
    });
    let r = gw.get(EXPORT_EU, &billing).await;
    if stale_expected {
        assert_eq!(r.header("x-cache"), Some("STALE"), "{}", r.text());
    } else {
        assert_eq!(r.status, 500, "{}", r.text());
    }
    let cold = gw.get("/v3/agents/agent-eu/convos/c3/export", &billing);
    assert_eq!(cold.await.status, 500);
    gw.eu.set_faults(Faults::default());
    // Healthy again: c1 fetched, or its expired entry revalidated (unchanged upstream).
    let r = gw.get(EXPORT_EU, &billing).await;
    let refreshed = if stale_expected {
        "REVALIDATED"
    } else {
        "MISS"
    };
    assert_eq!(
        (r.status.as_u16(), r.header("x-cache")),
        (200, Some(refreshed))
    );
    assert_eq!(
        gw.get(EXPORT_EU, &billing).await.header("x-cache"),
        Some("HIT")
    );
    for _ in 0..2 {
        assert_eq!(gw.get(EXPORT_NA, &support).await.status, 200);
    }
    assert_eq!(gw.request(Method::GET, EXPORT_EU, &[]).await.status, 401);
    assert_eq!(gw.get(EXPORT_EU, &stranger).await.status, 403);
    // Traffic control: a 503 without Retry-After is retried once; the bulk team (one request
    // a minute) is over its bucket by its second request.
    gw.eu.set_faults(Faults {
        status: Some(503),
        ..Default::default()
    });
    let before = gw.eu.request_count();
    let r = gw
        .get("/v3/agents/agent-eu/convos/c2/export", &billing)
        .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(gw.eu.request_count(), before + 2, "retried once");
    gw.eu.set_faults(Faults::default());
    let bulk = token("bulk");
    let _ = gw.get(EXPORT_NA, &bulk).await;
    assert_eq!(gw.get(EXPORT_NA, &bulk).await.status, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_query_returns_data() {
    let started = Instant::now();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(DASHBOARD);
    let board: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let mut all = Vec::new();
    queries(board["panels"].as_array().unwrap(), &mut all);
    assert!(all.len() >= 10, "only {} queries in {DASHBOARD}", all.len());

    let (jwks_url, jwks) = jwks_server().await;
    // [shared] on a private redis-server: the Redis panels' series.
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path(), "cache-key", &[7]);
    let gw = Gateway::start_with(TestConfig {
        extra: redis.shared_config(&keys),
        cache: "enabled = true\nttl = \"1s\"\nstale_if_error = \"1h\"\n".into(),
        teams: "[teams]\nbilling = { agents = [\"*\"] }\nsupport = { agents = [\"agent-na\"] }\n\
                bulk = { agents = [\"*\"], rate = \"1/m\", burst = 1 }\n"
            .into(),
        keys: format!("[[auth.keys]]\njwks_url = \"{jwks_url}\"\n"),
        ..Default::default()
    })
    .await;
    let prometheus = Prometheus::start(gw.admin);

    // A scrape before any traffic, one between the waves and two after the second: every
    // counter the traffic makes has grown between two samples, so rates and quantiles are
    // numbers (a series whose first sample already holds its whole count has a rate of 0).
    let n = prometheus.scrapes(1.0).await;
    wave(&gw, false).await;
    let expired = Instant::now() + Duration::from_millis(1100); // c1's 1 s ttl
    let n = prometheus.scrapes(n + 1.0).await;
    sleep_until(expired).await;
    wave(&gw, true).await;
    prometheus.scrapes(n + 2.0).await;

    let mut failures = Vec::new();
    let mut checked = 0;
    for (title, expr) in &all {
        let promql = VARIABLES
            .iter()
            .fold(expr.clone(), |e, (var, v)| e.replace(var, v));
        assert!(!promql.contains('$'), "{title}: unknown variable in {expr}");
        match prometheus.query(&promql).await {
            Ok(r) if r.iter().map(value).any(f64::is_finite) => {
                checked += 1;
                let shown: Vec<String> = r
                    .iter()
                    .map(|s| format!("{} = {}", s["metric"], s["value"][1]))
                    .collect();
                println!("ok {title}: {promql}\n   {}", shown.join("\n   "));
            }
            Ok(r) => failures.push(format!("{title}: no data (or NaN only): {promql} -> {r:?}")),
            Err(e) => failures.push(format!("{title}: {promql}: {e}")),
        }
    }
    jwks.abort();
    assert!(
        failures.is_empty(),
        "queries without data:\n{}",
        failures.join("\n")
    );
    println!(
        "{checked} of {} queries returned data, in {:.1?}",
        all.len(),
        started.elapsed()
    );
}
