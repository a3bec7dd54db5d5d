//! Fairness simulation (issue 13): 20 teams share one Convocore region through the gateway.
//! The mock region enforces its per-token quota as a token bucket and answers `429` beyond
//! it; the gateway's region `rate` is set to that quota. 19 quiet teams each ask exactly
//! their fair share; one noisy team asks 50 times its share. Over the steady state (after a
//! warm-up) it prints each team's share of what got through and checks the targets: every
//! quiet team gets at least 95 % of its fair share, the region's rate is at least 95 % used,
//! and the mock sends no 429 in the steady state.
//!
//! `cargo bench --bench fairness` (real time, about 20 s; exit status 1 when a target is
//! missed). Everything runs on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::fixture;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use convocore_gateway::testing::mock::{Faults, MockConvocore};
use convocore_gateway::{Config, Limits, Listeners, State};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tokio::time::Instant;

const TOKEN: &str = "fairness-upstream-token";
/// The region's quota (requests per second), and the mock's bucket size.
const QUOTA: u32 = 40;
const QUOTA_BURST: u32 = 4;
const TEAMS: usize = 20;
const NOISY_FACTOR: u32 = 50;
const WARMUP: Duration = Duration::from_secs(5);
const MEASURE: Duration = Duration::from_secs(12);

fn token(team: &str) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = serde_json::json!({
        "iss": "https://idp.example.internal",
        "aud": "convocore-gateway",
        "sub": "sim",
        "team": team,
        "iat": now,
        "exp": now + 3600,
    });
    let key =
        EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa_private.pem")).unwrap()).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    ok: AtomicU64,
    limited: AtomicU64,
    unavailable: AtomicU64,
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let passed = rt.block_on(simulate());
    std::process::exit(if passed { 0 } else { 1 });
}

async fn simulate() -> bool {
    let mock = MockConvocore::start("eu", TOKEN, &[("agent-eu", &["c1"])])
        .await
        .unwrap();
    mock.set_faults(Faults {
        quota: Some((QUOTA, QUOTA_BURST)),
        delay: Duration::from_millis(20),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    let text = format!(
        r#"
[upstream]
token_file = "token"
rate = "{QUOTA}/s"
max_concurrency = 8
max_queue = 200
queue_timeout = "2s"
retries = 0
[regions.eu]
base_url = "{eu}"
[regions.na]
base_url = "{eu}"
[routing]
default_region = "eu"
discover = false
{auth}[cache]
enabled = false
[log]
level = "warn"
"#,
        eu = mock.base_url(),
        auth = common::auth_toml(),
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    let state = State::build(Config::load(&path).unwrap()).unwrap();
    let listeners = Listeners::bind(([127, 0, 0, 1], 0).into(), ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let addr = listeners.api.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(convocore_gateway::run_with(
        state,
        listeners,
        async move {
            let _ = stop_rx.await;
        },
        Limits::default(),
    ));

    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(512)
        .build_http();
    let url: http::Uri = format!("http://{addr}/v3/agents/agent-eu/convos/c1/export")
        .parse()
        .unwrap();
    let fair = f64::from(QUOTA) / TEAMS as f64;
    let measuring = Arc::new(AtomicBool::new(false));
    let tallies: Arc<Mutex<BTreeMap<String, Arc<Tally>>>> = Arc::default();
    let start = Instant::now();
    let end = start + WARMUP + MEASURE;
    let mut senders = Vec::new();
    for t in 0..TEAMS {
        let (team, per_second) = if t == 0 {
            ("noisy".to_string(), fair * f64::from(NOISY_FACTOR))
        } else {
            (format!("quiet-{t:02}"), fair)
        };
        let tally = Arc::new(Tally::default());
        tallies.lock().unwrap().insert(team.clone(), tally.clone());
        let bearer = format!("Bearer {}", token(&team));
        let (client, url, measuring) = (client.clone(), url.clone(), measuring.clone());
        senders.push(tokio::spawn(async move {
            // Open loop: requests leave on a fixed schedule whatever the answers.
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            // Spread the teams' phases.
            tokio::time::sleep(Duration::from_millis(37 * t as u64 % 500)).await;
            let mut inflight = tokio::task::JoinSet::new();
            while Instant::now() < end {
                tick.tick().await;
                let counted = measuring.load(Ordering::Relaxed);
                let req = http::Request::get(url.clone())
                    .header("authorization", &bearer)
                    .body(Empty::new())
                    .unwrap();
                let (client, tally) = (client.clone(), tally.clone());
                inflight.spawn(async move {
                    let status = match client.request(req).await {
                        Ok(resp) => {
                            let status = resp.status().as_u16();
                            let _ = resp.into_body().collect().await;
                            status
                        }
                        Err(_) => 0,
                    };
                    if counted {
                        tally.sent.fetch_add(1, Ordering::Relaxed);
                        match status {
                            200 => tally.ok.fetch_add(1, Ordering::Relaxed),
                            429 => tally.limited.fetch_add(1, Ordering::Relaxed),
                            _ => tally.unavailable.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                });
                while inflight.try_join_next().is_some() {}
            }
            while inflight.join_next().await.is_some() {}
        }));
    }
    tokio::time::sleep(WARMUP).await;
    let throttled_before = mock.throttled();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(MEASURE).await;
    measuring.store(false, Ordering::Relaxed);
    let throttled = mock.throttled() - throttled_before;
    for s in senders {
        let _ = s.await;
    }
    let _ = stop_tx.send(());
    let _ = server.await;

    let secs = MEASURE.as_secs_f64();
    println!(
        "fairness: region quota {QUOTA}/s (mock bucket burst {QUOTA_BURST}), gateway rate {QUOTA}/s, \
         {TEAMS} teams, fair share {fair:.1}/s, noisy team asks {NOISY_FACTOR}x; {secs:.0} s measured after {:.0} s warm-up",
        WARMUP.as_secs_f64()
    );
    println!();
    println!("| team | asked/s | got/s | share of fair share | 429 | 503 |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let tallies = tallies.lock().unwrap();
    let mut total_ok = 0.0;
    let mut worst_quiet = f64::INFINITY;
    for (team, tally) in tallies.iter() {
        let ok = tally.ok.load(Ordering::Relaxed) as f64 / secs;
        total_ok += ok;
        let share = ok / fair;
        if team != "noisy" {
            worst_quiet = worst_quiet.min(share);
        }
        println!(
            "| {team} | {:.1} | {ok:.2} | {:.0} % | {} | {} |",
            tally.sent.load(Ordering::Relaxed) as f64 / secs,
            share * 100.0,
            tally.limited.load(Ordering::Relaxed),
            tally.unavailable.load(Ordering::Relaxed),
        );
    }
    let used = total_ok / f64::from(QUOTA);
    println!();
    println!(
        "worst quiet team: {:.0} % of its fair share (target >= 95 %); region rate used: {:.1} % \
         (target >= 95 %); mock 429s in the steady state: {throttled} (target 0)",
        worst_quiet * 100.0,
        used * 100.0
    );
    let passed = worst_quiet >= 0.95 && used >= 0.95 && throttled == 0;
    println!("{}", if passed { "PASS" } else { "FAIL" });
    passed
}
