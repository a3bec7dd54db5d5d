//! The gateway's own upstream pool (`src/upstream/pool.rs`) against hyper-util's legacy
//! `Client` over hyper-rustls, on the same workloads against the crate's TLS mock upstream
//! (issue 12, item 5). Everything runs in this process on loopback.
//!
//! ```sh
//! cargo run --release --example pool_compare
//! ```
//!
//! Clients: `pool.rs` (`Origins`/`Origin::send`, ALPN h2 then http/1.1); `hyper-util` (ALPN h2
//! then http/1.1, nodelay, idle timeout 60 s, at most 256 idle per host, as the pool); and
//! `hyper-util h2` (the same, but ALPN h2 only and `http2_only(true)`: what a user who knows the
//! upstream speaks HTTP/2 would set; it cannot serve an HTTP/1.1 upstream).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use convocore_gateway::testing::mock::{Faults, MockConvocore, TlsOptions};
use convocore_gateway::upstream::pool::Origin;
use convocore_gateway::upstream::{Origins, Wanted};
use http::header::{ACCEPT, AUTHORIZATION, USER_AGENT};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

const TOKEN: &str = "upstream-shared-token-0123456789";
const PATH: &str = "/v3/agents/agent-eu/convos/c1/export?format=json";
const AGENTS: &[(&str, &[&str])] = &[("agent-eu", &["c1"])];

/// The clients compared.
type Kind = &'static str;
const POOL: Kind = "pool.rs";
const HYPER: Kind = "hyper-util";
const HYPER_H2: Kind = "hyper-util h2";

// One value per client, behind an Arc: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Upstream {
    Pool(Arc<Origin>),
    Hyper(Client<HttpsConnector<HttpConnector>, Empty<Bytes>>, String),
}

/// The test PKI: a CA and a `localhost` certificate it signs (as tests/common's `test_pki`).
struct Pki {
    ca: String,
    cert: String,
    key: String,
    ca_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use rcgen::{ExtendedKeyUsagePurpose, KeyUsagePurpose};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "pool_compare CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap().pem();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    let key = key.serialize_pem();
    Pki {
        ca,
        cert,
        key,
        ca_file,
        _dir: dir,
    }
}

async fn mock(pki: &Pki, options: TlsOptions, faults: Faults) -> MockConvocore {
    let (cert, key) = (pki.cert.as_bytes(), pki.key.as_bytes());
    let mock = MockConvocore::start_tls_with("eu", TOKEN, AGENTS, cert, key, options)
        .await
        .unwrap();
    mock.set_faults(faults);
    mock
}

/// A cold client of `kind` for `mock`'s origin.
fn client(kind: Kind, pki: &Pki, mock: &MockConvocore) -> Upstream {
    let origin = format!("https://localhost:{}", mock.addr().port());
    if kind == POOL {
        let origins = Origins::default();
        let connector = origins
            .connector(Some(&pki.ca_file), Duration::from_secs(5))
            .unwrap();
        let url: Uri = origin.parse().unwrap();
        return Upstream::Pool(origins.origin(&url, &connector).unwrap());
    }
    // The gateway's own TLS client configuration (same roots, same provider); hyper-rustls
    // sets ALPN itself.
    let mut tls = convocore_gateway::tls::client_config(Some(pki.ca.as_bytes())).unwrap();
    tls.alpn_protocols.clear();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256);
    let client = if kind == HYPER_H2 {
        builder
            .http2_only(true)
            .build(https.enable_http2().wrap_connector(http))
    } else {
        builder.build(https.enable_http1().enable_http2().wrap_connector(http))
    };
    Upstream::Hyper(client, format!("{origin}{PATH}"))
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out = format!("{out}: {s}");
        source = s.source();
    }
    out
}

impl Upstream {
    /// One GET of the export, its body read to the end, as `client::exchange` does.
    async fn get(&self) -> Result<StatusCode, String> {
        let uri = match self {
            Upstream::Pool(_) => PATH,
            Upstream::Hyper(_, url) => url.as_str(),
        };
        let req = Request::get(uri)
            .header(AUTHORIZATION, format!("Bearer {TOKEN}"))
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, "pool_compare")
            .body(Empty::new())
            .unwrap();
        match self {
            Upstream::Pool(origin) => {
                let (response, conn) = origin
                    .send(req, &Wanted::always())
                    .await
                    .map_err(|e| chain(&e))?;
                let status = response.status();
                response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| chain(&e))?;
                origin.release(conn);
                Ok(status)
            }
            Upstream::Hyper(client, _) => {
                let response = client.request(req).await.map_err(|e| chain(&e))?;
                let status = response.status();
                response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| chain(&e))?;
                Ok(status)
            }
        }
    }
}

#[derive(Default)]
struct Outcome {
    ok: usize,
    non_200: usize,
    errors: usize,
    first_error: Option<String>,
    latencies: Vec<Duration>,
    elapsed: Duration,
}

/// `n` GETs by `concurrency` workers.
async fn run(upstream: &Arc<Upstream>, n: usize, concurrency: usize) -> Outcome {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (upstream, next) = (upstream.clone(), next.clone());
        workers.spawn(async move {
            let mut out = Outcome::default();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let t = Instant::now();
                let result = upstream.get().await;
                out.latencies.push(t.elapsed());
                match result {
                    Ok(StatusCode::OK) => out.ok += 1,
                    Ok(_) => out.non_200 += 1,
                    Err(e) => {
                        out.errors += 1;
                        out.first_error.get_or_insert(e);
                    }
                }
            }
            out
        });
    }
    let mut total = Outcome::default();
    while let Some(out) = workers.join_next().await {
        total.add(out.unwrap());
    }
    total.elapsed = started.elapsed();
    total.latencies.sort_unstable();
    total
}

impl Outcome {
    fn add(&mut self, other: Outcome) {
        self.ok += other.ok;
        self.non_200 += other.non_200;
        self.errors += other.errors;
        self.first_error = self.first_error.take().or(other.first_error);
        self.latencies.extend(other.latencies);
        self.elapsed += other.elapsed;
    }
}

/// The `p` quantile of sorted latencies, in ms.
fn pct(lat: &[Duration], p: f64) -> String {
    let i = ((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1));
    let d = lat.get(i).copied().unwrap_or_default();
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn row(workload: &str, kind: Kind, out: &Outcome, conns: u64) {
    let rps = out.latencies.len() as f64 / out.elapsed.as_secs_f64();
    let error = out.first_error.as_deref().unwrap_or("");
    println!(
        "| {workload} | {} | {} | {} | {} | {conns} | {} | {:.0} | {} | {} | {} |",
        kind,
        out.ok,
        out.non_200,
        out.errors,
        out.elapsed.as_millis(),
        rps,
        pct(&out.latencies, 0.50),
        pct(&out.latencies, 0.99),
        error.chars().take(110).collect::<String>(),
    );
}

#[tokio::main]
async fn main() {
    let pki = pki();
    let h2 = TlsOptions::default();
    let all = [POOL, HYPER, HYPER_H2];
    println!(
        "| workload | client | 200 | non-200 | errors | conns | ms | req/s | p50 ms | p99 ms | first error |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");

    // (i) 3,000 GETs at concurrency 64 over h2; the server sends GOAWAY every 200 requests.
    for kind in all {
        let faults = Faults {
            goaway_every: Some(200),
            ..Faults::default()
        };
        let mock = mock(&pki, h2, faults).await;
        let upstream = Arc::new(client(kind, &pki, &mock));
        let out = run(&upstream, 3_000, 64).await;
        row("(i) h2 goaway/200, 3k @64", kind, &out, mock.connections());
    }

    // (ii) 40 concurrent GETs on a cold client; the server allows 16 streams a connection and
    // refuses (REFUSED_STREAM) what a client opens beyond that before it read the setting.
    // Five rounds, each with a new client and a new mock.
    for kind in all {
        let refusing = TlsOptions {
            max_concurrent_streams: Some(16),
            ..TlsOptions::default()
        };
        let (mut total, mut conns) = (Outcome::default(), 0);
        for _ in 0..5 {
            let mock = mock(&pki, refusing, Faults::default()).await;
            let upstream = Arc::new(client(kind, &pki, &mock));
            let out = run(&upstream, 40, 40).await;
            conns += mock.connections();
            total.add(out);
        }
        total.latencies.sort_unstable();
        row("(ii) cold 40 @40, max streams 16, x5", kind, &total, conns);
    }

    // (ii-b) Refusals in steady state: the server rotates connections (GOAWAY every 200) and
    // allows 16 streams a connection, so requests that pile onto each new connection before
    // its SETTINGS arrive are refused.
    for kind in all {
        let options = TlsOptions {
            max_concurrent_streams: Some(16),
            ..TlsOptions::default()
        };
        let faults = Faults {
            goaway_every: Some(200),
            ..Faults::default()
        };
        let mock = mock(&pki, options, faults).await;
        let upstream = Arc::new(client(kind, &pki, &mock));
        let out = run(&upstream, 3_000, 64).await;
        row(
            "(ii-b) goaway/200 + max 16, 3k @64",
            kind,
            &out,
            mock.connections(),
        );
    }

    // (iii) Steady state: 20,000 GETs at concurrency 32 after a 2,000-GET warm-up, no faults,
    // over h2 and over HTTP/1.1 (the mock offering only http/1.1 by ALPN).
    let h1 = TlsOptions {
        http1_only: true,
        ..TlsOptions::default()
    };
    for (proto, options) in [("h2", h2), ("h1", h1)] {
        for kind in all {
            if kind == HYPER_H2 && proto == "h1" {
                continue;
            }
            let mock = mock(&pki, options, Faults::default()).await;
            let upstream = Arc::new(client(kind, &pki, &mock));
            let _ = run(&upstream, 2_000, 32).await;
            let out = run(&upstream, 20_000, 32).await;
            let workload = format!("(iii) {proto} steady, 20k @32");
            row(&workload, kind, &out, mock.connections());
        }
    }

    // (iv) The connection cap: 300 concurrent GETs on a cold client over HTTP/1.1.
    for kind in [POOL, HYPER] {
        let mock = mock(&pki, h1, Faults::default()).await;
        let upstream = Arc::new(client(kind, &pki, &mock));
        let out = run(&upstream, 300, 300).await;
        row("(iv) h1 cold 300 @300", kind, &out, mock.connections());
    }
}
