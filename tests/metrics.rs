#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `/metrics`: every contract metric, its type and labels, counters that match the traffic
//! exactly, label values from their bounded sets, and a clean `promtool check metrics`.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::time::Duration;

use convocore_gateway::testing::mock::Faults;
use http::Method;
use jsonwebtoken::Algorithm;

/// One sample: metric name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

struct Exposition {
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut types = BTreeMap::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                types.insert(name.to_string(), kind.to_string());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').unwrap();
                    let labels = body
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once('=').unwrap();
                            (k.to_string(), v.trim_matches('"').to_string())
                        })
                        .collect();
                    (name.to_string(), labels)
                }
                None => (series.to_string(), BTreeMap::new()),
            };
            samples.push(Sample {
                name,
                labels,
                value: value.parse().unwrap(),
            });
        }
        Exposition { types, samples }
    }

    /// The value of the one sample of `name` whose labels include `labels` (0 if none).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let matching: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert!(
            matching.len() <= 1,
            "{name} {labels:?} matches {matching:?}"
        );
        matching.first().map(|s| s.value).unwrap_or(0.0)
    }

    fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }

    fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .samples
            .iter()
            .filter(|s| s.name == name)
            .filter_map(|s| s.labels.get(label).cloned())
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

async fn scrape(gw: &Gateway) -> (String, Exposition) {
    let r = gw.admin(Method::GET, "/metrics", &[]).await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let text = r.text();
    let parsed = Exposition::parse(&text);
    (text, parsed)
}

fn subset(values: &[String], allowed: &[&str]) {
    for v in values {
        assert!(
            allowed.contains(&v.as_str()),
            "label value {v:?} not in {allowed:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_is_counted_exactly() {
    let gw = Gateway::start_with(TestConfig {
        cache: "enabled = true\nttl = \"1s\"\nstale_if_error = \"1h\"\n".into(),
        upstream: "request_timeout = \"300ms\"".into(),
        teams: "[teams]\nbilling = { agents = [\"*\"] }\nsupport = { agents = [\"agent-na\"] }\n"
            .into(),
        ..Default::default()
    })
    .await;
    let billing = token("billing");
    let support = token("support");
    let stranger = token("stranger");
    let expired = {
        let mut c = claims("billing");
        c["exp"] = serde_json::json!(now() - 3600);
        mint(Algorithm::RS256, Some("rsa-1"), &c)
    };

    // Refused before any upstream work: 400, 404, 405, 401 (missing, expired), 403 (two teams).
    assert_eq!(
        gw.get("/v3/agents/a.b/convos/c1/export", &billing)
            .await
            .status,
        400
    );
    assert_eq!(gw.get("/nope", &billing).await.status, 404);
    assert_eq!(gw.request(Method::POST, EXPORT_EU, &[]).await.status, 405);
    assert_eq!(gw.request(Method::GET, EXPORT_EU, &[]).await.status, 401);
    assert_eq!(gw.get(EXPORT_EU, &expired).await.status, 401);
    assert_eq!(gw.get(EXPORT_EU, &support).await.status, 403);
    assert_eq!(gw.get(EXPORT_EU, &stranger).await.status, 403);

    // EU c1: miss, hit, bypass.
    assert_eq!(
        gw.get(EXPORT_EU, &billing).await.header("x-cache"),
        Some("MISS")
    );
    assert_eq!(
        gw.get(EXPORT_EU, &billing).await.header("x-cache"),
        Some("HIT")
    );
    let auth = format!("Bearer {billing}");
    let r = gw
        .request(
            Method::GET,
            EXPORT_EU,
            &[("authorization", &auth), ("cache-control", "no-store")],
        )
        .await;
    assert_eq!(r.header("x-cache"), Some("BYPASS"));

    // NA by support: miss.
    assert_eq!(gw.get(EXPORT_NA, &support).await.status, 200);

    // Five concurrent cold requests for EU c2: one upstream request, four coalesced.
    gw.eu.set_faults(Faults {
        delay: Duration::from_millis(150),
        ..Default::default()
    });
    let mut set = tokio::task::JoinSet::new();
    let url = gw.url("/v3/agents/agent-eu/convos/c2/export");
    for _ in 0..5 {
        let url = url.clone();
        let auth = auth.clone();
        set.spawn(async move {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http();
            send(&client, Method::GET, &url, &[("authorization", &auth)])
                .await
                .status
        });
    }
    while let Some(status) = set.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    gw.eu.set_faults(Faults::default());

    // Upstream 500 on a cold key (c3): passed through, a miss.
    gw.eu.set_faults(Faults {
        status: Some(500),
        ..Default::default()
    });
    assert_eq!(
        gw.get("/v3/agents/agent-eu/convos/c3/export", &billing)
            .await
            .status,
        500
    );
    // Stale: c1 is past its 1 s ttl, the upstream fails, the entry is served.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = gw.get(EXPORT_EU, &billing).await;
    assert_eq!(r.header("x-cache"), Some("STALE"));
    gw.eu.set_faults(Faults::default());
    // Healthy again and c1 unchanged: its conditional refresh gets a 304, the entry is renewed.
    let r = gw.get(EXPORT_EU, &billing).await;
    assert_eq!(r.header("x-cache"), Some("REVALIDATED"));

    // Upstream timeout on a cold key: 504.
    gw.eu.set_faults(Faults {
        delay: Duration::from_millis(1000),
        ..Default::default()
    });
    let r = gw
        .get("/v3/agents/agent-eu-unmapped/convos/c1/export", &billing)
        .await;
    assert_eq!(r.status, 504);
    gw.eu.set_faults(Faults::default());

    let (_, m) = scrape(&gw).await;
    let req = "convocore_gateway_requests_total";
    for (region, status, cache, n) in [
        ("none", "400", "none", 1.0),
        ("none", "404", "none", 1.0),
        ("none", "405", "none", 1.0),
        ("none", "401", "none", 2.0),
        ("none", "403", "none", 2.0),
        ("eu", "200", "miss", 6.0), // c1 miss + 5 for c2 (1 leader, 4 collapsed)
        ("eu", "200", "hit", 1.0),
        ("eu", "200", "bypass", 1.0),
        ("eu", "200", "stale", 1.0),
        ("eu", "200", "revalidated", 1.0),
        ("na", "200", "miss", 1.0),
        ("eu", "500", "miss", 1.0),
        ("eu", "504", "miss", 1.0),
    ] {
        assert_eq!(
            m.value(
                req,
                &[("region", region), ("status", status), ("cache", cache)]
            ),
            n,
            "{req}{{{region},{status},{cache}}}"
        );
    }
    assert_eq!(m.sum(req), 20.0);
    assert_eq!(
        m.value(
            "convocore_gateway_request_duration_seconds_count",
            &[("cache", "hit")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "convocore_gateway_request_duration_seconds_count",
            &[("cache", "none")]
        ),
        7.0
    );
    assert_eq!(
        m.sum("convocore_gateway_request_duration_seconds_count"),
        20.0
    );

    // Authenticated requests per team: billing's c1 miss, hit, bypass, 5 × c2, c3, stale,
    // revalidated, timeout; support's 403 and NA miss; the unlisted team's 403 counts as other.
    assert_eq!(
        m.value(
            "convocore_gateway_team_requests_total",
            &[("team", "billing")]
        ),
        12.0
    );
    assert_eq!(
        m.value(
            "convocore_gateway_team_requests_total",
            &[("team", "support")]
        ),
        2.0
    );
    assert_eq!(
        m.value(
            "convocore_gateway_team_requests_total",
            &[("team", "other")]
        ),
        1.0
    );

    let up = "convocore_gateway_upstream_requests_total";
    // c1 miss, bypass, c2 once, c3 500, stale refetch 500, c1 revalidated (304), timeout.
    assert_eq!(m.value(up, &[("region", "eu"), ("status", "200")]), 3.0);
    assert_eq!(m.value(up, &[("region", "eu"), ("status", "500")]), 2.0);
    assert_eq!(m.value(up, &[("region", "eu"), ("status", "304")]), 1.0);
    assert_eq!(m.value(up, &[("region", "eu"), ("status", "timeout")]), 1.0);
    assert_eq!(m.value(up, &[("region", "na"), ("status", "200")]), 1.0);
    assert_eq!(m.sum(up), gw.upstream_count() as f64);
    assert_eq!(
        m.value(
            "convocore_gateway_upstream_duration_seconds_count",
            &[("region", "eu")]
        ),
        7.0
    );

    let af = "convocore_gateway_auth_failures_total";
    assert_eq!(m.value(af, &[("reason", "missing")]), 1.0);
    assert_eq!(m.value(af, &[("reason", "expired")]), 1.0);
    assert_eq!(m.value(af, &[("reason", "forbidden")]), 2.0);
    assert_eq!(m.sum(af), 4.0);

    assert_eq!(
        m.value("convocore_gateway_coalesced_requests_total", &[]),
        4.0
    );
    assert_eq!(m.value("convocore_gateway_inflight_requests", &[]), 0.0);
    // c1 (json), c2, NA c1: three entries.
    assert_eq!(m.value("convocore_gateway_cache_entries", &[]), 3.0);
    let (_, weighted) = gw.state.cache.usage().await;
    assert_eq!(
        m.value("convocore_gateway_cache_bytes", &[]),
        weighted as f64
    );
    assert!(weighted > 0);
    assert_eq!(
        m.value(
            "convocore_gateway_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    // Label values only from their bounded sets.
    subset(&m.label_values(req, "region"), &["eu", "na", "none"]);
    subset(
        &m.label_values(req, "cache"),
        &["hit", "miss", "stale", "bypass", "revalidated", "none"],
    );
    subset(
        &m.label_values("convocore_gateway_request_duration_seconds_count", "cache"),
        &["hit", "miss", "stale", "bypass", "revalidated", "none"],
    );
    subset(
        &m.label_values("convocore_gateway_team_requests_total", "team"),
        &["billing", "support", "other"],
    );
    subset(&m.label_values(up, "region"), &["eu", "na"]);
    for status in m
        .label_values(up, "status")
        .iter()
        .chain(m.label_values(req, "status").iter())
    {
        assert!(
            status == "error"
                || status == "timeout"
                || status.parse::<u16>().is_ok_and(|s| (100..600).contains(&s)),
            "status label {status:?}"
        );
    }
    subset(
        &m.label_values(af, "reason"),
        &[
            "missing",
            "malformed",
            "bad_signature",
            "expired",
            "not_yet_valid",
            "issuer",
            "audience",
            "unknown_key",
            "forbidden",
        ],
    );
}

#[tokio::test]
async fn every_contract_metric_is_present_with_its_type_and_labels() {
    let gw = Gateway::start().await;
    assert_eq!(gw.get(EXPORT_EU, &token("billing")).await.status, 200);
    let (text, m) = scrape(&gw).await;
    for (name, kind, labels) in [
        (
            "convocore_gateway_requests_total",
            "counter",
            &["region", "status", "cache"][..],
        ),
        (
            "convocore_gateway_request_duration_seconds",
            "histogram",
            &["cache"][..],
        ),
        (
            "convocore_gateway_team_requests_total",
            "counter",
            &["team"][..],
        ),
        (
            "convocore_gateway_upstream_requests_total",
            "counter",
            &["region", "status"][..],
        ),
        (
            "convocore_gateway_upstream_duration_seconds",
            "histogram",
            &["region"][..],
        ),
        (
            "convocore_gateway_auth_failures_total",
            "counter",
            &["reason"][..],
        ),
        ("convocore_gateway_cache_entries", "gauge", &[][..]),
        ("convocore_gateway_cache_bytes", "gauge", &[][..]),
        (
            "convocore_gateway_coalesced_requests_total",
            "counter",
            &[][..],
        ),
        ("convocore_gateway_inflight_requests", "gauge", &[][..]),
        (
            "convocore_gateway_jwks_fetches_total",
            "counter",
            &["result"][..],
        ),
        (
            "convocore_gateway_jwks_last_success_timestamp_seconds",
            "gauge",
            &[][..],
        ),
        ("convocore_gateway_build_info", "gauge", &["version"][..]),
        (
            "convocore_gateway_config_reloads_total",
            "counter",
            &["result"][..],
        ),
        (
            "convocore_gateway_config_last_reload_success_timestamp_seconds",
            "gauge",
            &[][..],
        ),
    ] {
        assert_eq!(
            m.types.get(name).map(String::as_str),
            Some(kind),
            "type of {name}"
        );
        let series = if kind == "histogram" {
            format!("{name}_count")
        } else {
            name.to_string()
        };
        let samples: Vec<&Sample> = m.samples.iter().filter(|s| s.name == series).collect();
        assert!(!samples.is_empty(), "{name} has no samples:\n{text}");
        for s in samples {
            let keys: Vec<&str> = s.labels.keys().map(String::as_str).collect();
            let mut want = labels.to_vec();
            want.sort();
            assert_eq!(keys, want, "labels of {name}");
        }
    }
    // A cache hit takes tens of microseconds: the request histogram has buckets below 100 µs.
    let low: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("convocore_gateway_request_duration_seconds_bucket{"))
        .filter_map(|l| l.split("le=\"").nth(1)?.split('"').next())
        .filter(|le| le.parse::<f64>().is_ok_and(|v| v < 0.0001))
        .collect();
    assert!(low.len() >= 3 * 5, "buckets below 100 µs: {low:?}");
    // Both reload results exist from the start; the configuration in force was loaded at start.
    for result in ["ok", "error"] {
        assert_eq!(
            m.value(
                "convocore_gateway_config_reloads_total",
                &[("result", result)]
            ),
            0.0
        );
    }
    let loaded = m.value(
        "convocore_gateway_config_last_reload_success_timestamp_seconds",
        &[],
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        loaded > now - 60.0 && loaded <= now + 1.0,
        "{loaded} vs {now}"
    );
    // Process metrics, where the platform has them.
    if cfg!(target_os = "linux") {
        assert!(
            m.types.contains_key("process_resident_memory_bytes"),
            "{text}"
        );
    }
}

/// The live output passes `promtool check metrics` with no warnings. CI installs Debian's
/// `prometheus` package for promtool; a machine without it fails this test on purpose.
#[tokio::test]
async fn promtool_finds_nothing_to_complain_about() {
    let gw = Gateway::start().await;
    assert_eq!(gw.get(EXPORT_EU, &token("billing")).await.status, 200);
    assert_eq!(gw.request(Method::GET, EXPORT_EU, &[]).await.status, 401);
    let (text, _) = scrape(&gw).await;
    let mut child = match tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!("promtool not found on PATH ({e}); install Debian's prometheus package"),
    };
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool failed: {said}");
    assert!(said.trim().is_empty(), "promtool warned: {said}");
}
