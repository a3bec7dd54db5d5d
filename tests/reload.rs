//! Live reconfiguration ("Reloading the configuration" in the contract): every kind of change
//! applies to the next request, whether the reload comes from `SIGHUP` (the same function the
//! signal handler calls) or from the config file being replaced, as a ConfigMap update does.
//! The `SIGHUP` signal itself is sent to the real binary in `tests/cli.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use convocore_gateway::testing::mock::{Faults, MockConvocore};
use http::Method;
use jsonwebtoken::Algorithm;

/// How a test makes the gateway reload.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    /// What `SIGHUP` runs.
    Signal,
    /// The file replaced through a rename (a new inode, as a ConfigMap's `..data` swap).
    File,
}

const BOTH: [Trigger; 2] = [Trigger::Signal, Trigger::File];

fn reloads(gw: &Gateway, result: &str) -> u64 {
    gw.state
        .metrics
        .config_reloads
        .with_label_values(&[result])
        .get()
}

/// Writes `config` as the gateway's config file and has it reloaded by `trigger`; returns
/// once the reload has happened (ok or refused).
async fn reload_with(gw: &Gateway, config: &TestConfig, trigger: Trigger) {
    apply_text(gw, &gw.render(config), trigger).await;
}

async fn apply_text(gw: &Gateway, text: &str, trigger: Trigger) {
    let before = reloads(gw, "ok") + reloads(gw, "error");
    gw.replace_config(text);
    match trigger {
        Trigger::Signal => {
            let _ = gw.reload().await;
        }
        Trigger::File => {
            let seen = eventually(Duration::from_secs(10), || async {
                reloads(gw, "ok") + reloads(gw, "error") > before
            })
            .await;
            assert!(seen, "the changed file was not reloaded");
        }
    }
    assert_eq!(reloads(gw, "ok") + reloads(gw, "error"), before + 1);
}

fn teams(rules: &str) -> String {
    format!("[teams]\n{rules}\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_teams_change_applies_to_the_next_request() {
    for trigger in BOTH {
        let mut config = TestConfig {
            teams: teams("billing = { agents = [\"*\"] }"),
            ..Default::default()
        };
        let gw = Gateway::start_with(config.clone()).await;
        let token = token("billing");
        assert_eq!(gw.get(EXPORT_EU, &token).await.status, 200, "{trigger:?}");
        config.teams = teams("billing = { agents = [\"agent-na\"] }");
        reload_with(&gw, &config, trigger).await;
        gw.get(EXPORT_EU, &token)
            .await
            .assert_error(403, "FORBIDDEN");
        assert_eq!(gw.get(EXPORT_NA, &token).await.status, 200, "{trigger:?}");
        assert_eq!(reloads(&gw, "ok"), 1);
        assert_eq!(gw.eu.request_count(), 1, "the refused request went nowhere");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_routing_change_applies_to_the_next_request() {
    for trigger in BOTH {
        let mut config = TestConfig {
            routing: "default_region = \"eu\"\ndiscover = false\n".into(),
            ..Default::default()
        };
        let gw = Gateway::start_with(config.clone()).await;
        let path = "/v3/agents/agent-na-unmapped/convos/c1/export";
        let token = token("billing");
        // Unmapped, no discovery: the default region, which does not know the agent.
        let r = gw.get(path, &token).await;
        assert_eq!(r.status, 404, "{trigger:?}");
        assert_eq!(r.header("x-convocore-region"), Some("eu"));
        config.agents.push_str("\"agent-na-unmapped\" = \"na\"\n");
        reload_with(&gw, &config, trigger).await;
        let r = gw.get(path, &token).await;
        assert_eq!(r.status, 200, "{trigger:?}: {}", r.text());
        assert_eq!(r.header("x-convocore-region"), Some("na"));
        assert_eq!(gw.na.request_count(), 1);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_key_verifies_and_a_removed_key_stops_verifying_at_once() {
    let rsa = "[[auth.keys]]\nkid = \"rsa-1\"\nalgorithm = \"RS256\"\npublic_key_file = \"{fixtures}/rsa_public.pem\"\n";
    let ec = "[[auth.keys]]\nkid = \"ec-1\"\nalgorithm = \"ES256\"\npublic_key_file = \"{fixtures}/ec256_public.pem\"\n";
    for trigger in BOTH {
        let mut config = TestConfig {
            keys: rsa.into(),
            ..Default::default()
        };
        let gw = Gateway::start_with(config.clone()).await;
        let rsa_token = token("billing");
        let ec_token = mint(Algorithm::ES256, Some("ec-1"), &claims("billing"));
        assert_eq!(gw.get(EXPORT_EU, &rsa_token).await.status, 200);
        gw.get(EXPORT_EU, &ec_token)
            .await
            .assert_error(401, "UNAUTHORIZED");

        config.keys = ec.into();
        reload_with(&gw, &config, trigger).await;
        assert_eq!(
            gw.get(EXPORT_EU, &ec_token).await.status,
            200,
            "{trigger:?}: the new key verifies"
        );
        // The RSA token verified a moment ago, and that verification is cached: a reload
        // that removes its key must not let the cached verification stand.
        gw.get(EXPORT_EU, &rsa_token)
            .await
            .assert_error(401, "UNAUTHORIZED");
        assert_eq!(gw.eu.request_count(), 2);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_region_serves_the_next_request() {
    for trigger in BOTH {
        let ap = MockConvocore::start("ap", UPSTREAM_TOKEN, &[("agent-ap", &["c1"])])
            .await
            .unwrap();
        let mut config = TestConfig::default();
        let gw = Gateway::start_with(config.clone()).await;
        let path = "/v3/agents/agent-ap/convos/c1/export";
        let token = token("billing");
        // Discovery asks EU and NA: neither knows the agent.
        assert_eq!(gw.get(path, &token).await.status, 404);

        config.agents.push_str("\"agent-ap\" = \"ap\"\n");
        config.extra = format!("[regions.ap]\nbase_url = \"{}\"\n", ap.base_url());
        reload_with(&gw, &config, trigger).await;
        let r = gw.get(path, &token).await;
        assert_eq!(r.status, 200, "{trigger:?}: {}", r.text());
        assert_eq!(r.header("x-convocore-region"), Some("ap"));
        assert_eq!(ap.request_count(), 1);
        let seen = &ap.requests()[0];
        assert_eq!(
            seen.headers["authorization"],
            format!("Bearer {UPSTREAM_TOKEN}"),
            "the new region uses the shared token"
        );
        // The metrics know the new region.
        let metrics = gw.admin(Method::GET, "/metrics", &[]).await.text();
        assert!(
            metrics.contains(
                r#"convocore_gateway_upstream_requests_total{region="ap",status="200"} 1"#
            ),
            "{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_file_changes_nothing_and_is_counted() {
    for trigger in BOTH {
        let config = TestConfig {
            teams: teams("billing = { agents = [\"*\"] }"),
            ..Default::default()
        };
        let gw = Gateway::start_with(config.clone()).await;
        let token = token("billing");
        let good = gw.render(&config);
        for (bad, why) in [
            (
                good.replace("[cache]", "[cache]\nmax_byte = 3"),
                "an unknown key",
            ),
            (
                good.replace("default_region = \"eu\"", "default_region = \"mars\""),
                "a region that does not exist",
            ),
            (
                good.replace("rsa_public.pem", "missing.pem"),
                "an unreadable key file",
            ),
            ("[server\n".to_string(), "broken TOML"),
        ] {
            let errors = reloads(&gw, "error");
            apply_text(&gw, &bad, trigger).await;
            assert_eq!(reloads(&gw, "error"), errors + 1, "{trigger:?}: {why}");
            assert_eq!(reloads(&gw, "ok"), 0, "{why}");
            let r = gw.get(EXPORT_EU, &token).await;
            assert_eq!(r.status, 200, "{trigger:?}: {why}: {}", r.text());
        }
        let r = gw.admin(Method::GET, "/readyz", &[]).await;
        assert_eq!(r.status, 200);
        let metrics = gw.admin(Method::GET, "/metrics", &[]).await.text();
        assert!(
            metrics.contains(r#"convocore_gateway_config_reloads_total{result="error"} 4"#),
            "{metrics}"
        );
        assert!(
            metrics.contains(r#"convocore_gateway_config_reloads_total{result="ok"} 0"#),
            "{metrics}"
        );
    }
}

/// A request that started before a reload finishes under the config it started with: here
/// the NA region moves to another server while a request waits on the old one.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_in_flight_finishes_under_its_own_config() {
    let moved = MockConvocore::start("na", UPSTREAM_TOKEN, NA_AGENTS)
        .await
        .unwrap();
    let config = TestConfig::default();
    let gw = Arc::new(Gateway::start_with(config.clone()).await);
    gw.na.set_faults(Faults {
        delay: Duration::from_millis(800),
        ..Default::default()
    });
    let token = token("billing");
    let in_flight = {
        let gw = gw.clone();
        let token = token.clone();
        tokio::spawn(async move { gw.get(EXPORT_NA, &token).await })
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            gw.na.request_count() == 1
        })
        .await,
        "the request reached the old region"
    );
    let text = gw
        .render(&config)
        .replace(&gw.na.base_url(), &moved.base_url());
    apply_text(&gw, &text, Trigger::Signal).await;
    let r = gw.get(EXPORT_NA, &token).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        moved.request_count(),
        1,
        "a new request goes to the new server"
    );
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-convocore-region"), Some("na"));
    assert_eq!(
        gw.na.request_count(),
        1,
        "the old server saw only the first request"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cache_keeps_its_entries_and_a_smaller_max_bytes_evicts() {
    let mut config = TestConfig {
        cache: "enabled = true\nmax_bytes = \"1MiB\"\nttl = \"10m\"\n".into(),
        ..Default::default()
    };
    let gw = Gateway::start_with(config.clone()).await;
    let token = token("billing");
    for convo in ["c1", "c2", "c3"] {
        for region in ["eu", "na"] {
            let path = format!("/v3/agents/agent-{region}/convos/{convo}/export");
            assert_eq!(gw.get(&path, &token).await.header("x-cache"), Some("MISS"));
        }
    }
    assert_eq!(gw.state.cache.usage().await.0, 6);

    // Another setting changes: every entry stays, and is a hit.
    config.teams = teams("billing = { agents = [\"*\"] }");
    reload_with(&gw, &config, Trigger::Signal).await;
    assert_eq!(gw.state.cache.usage().await.0, 6);
    let r = gw.get(EXPORT_EU, &token).await;
    assert_eq!(r.header("x-cache"), Some("HIT"));

    // max_bytes shrinks below what the six entries weigh: the cache evicts down to it (an
    // export may take at most an eighth of it, so it stays eight bodies large).
    let (_, weighed) = gw.state.cache.usage().await;
    let max = 8 * r.body.len() as u64;
    assert!(max < weighed, "{max} vs {weighed}: the shrink must evict");
    config.cache = format!("enabled = true\nmax_bytes = {max}\nttl = \"10m\"\n");
    reload_with(&gw, &config, Trigger::Signal).await;
    let (entries, bytes) = gw.state.cache.usage().await;
    assert!(bytes <= max, "{bytes} bytes after the shrink to {max}");
    assert!(
        (1..6).contains(&entries),
        "{entries} entries after the shrink"
    );

    // The NA region goes: its entries go with it.
    config.cache = "enabled = true\nmax_bytes = \"1MiB\"\nttl = \"10m\"\n".into();
    reload_with(&gw, &config, Trigger::Signal).await;
    for convo in ["c1", "c2", "c3"] {
        for region in ["eu", "na"] {
            let path = format!("/v3/agents/agent-{region}/convos/{convo}/export");
            assert_eq!(gw.get(&path, &token).await.status, 200);
        }
    }
    assert_eq!(gw.state.cache.usage().await.0, 6);
    let upstream = gw.eu.request_count();
    let eu_only = gw
        .render(&config)
        .replace("[regions.na]", "[regions.gone]")
        .replace("\"agent-na\" = \"na\"", "\"agent-na\" = \"eu\"");
    apply_text(&gw, &eu_only, Trigger::Signal).await;
    assert_eq!(reloads(&gw, "error"), 0);
    assert_eq!(
        gw.state.cache.usage().await.0,
        3,
        "the NA entries were dropped, the EU ones kept"
    );
    let r = gw.get(EXPORT_EU, &token).await;
    assert_eq!(r.header("x-cache"), Some("HIT"), "the EU entries stay");
    assert_eq!(gw.eu.request_count(), upstream);
}

/// A changed listen address is logged and waits for a restart: the gateway goes on serving
/// where it listens.
#[tokio::test(flavor = "multi_thread")]
async fn a_listen_change_waits_for_a_restart() {
    let config = TestConfig::default();
    let gw = Gateway::start_with(config.clone()).await;
    let text = gw
        .render(&config)
        .replace("\nlisten = \"127.0.0.1:0\"", "\nlisten = \"127.0.0.1:1\"");
    apply_text(&gw, &text, Trigger::Signal).await;
    assert_eq!(reloads(&gw, "ok"), 1, "the rest of the file applies");
    assert_eq!(gw.get(EXPORT_EU, &token("billing")).await.status, 200);
    assert_eq!(gw.admin(Method::GET, "/healthz", &[]).await.status, 200);
}

/// `/readyz` never blinks and no connection drops while the config is reloaded again and
/// again, between two files, by both triggers.
#[tokio::test(flavor = "multi_thread")]
async fn readiness_and_connections_hold_through_reloads() {
    let a = TestConfig {
        teams: teams("billing = { agents = [\"*\"] }"),
        ..Default::default()
    };
    let b = TestConfig {
        teams: teams("billing = { agents = [\"*\"] }\nsupport = { agents = [\"agent-eu\"] }"),
        ..Default::default()
    };
    let gw = Arc::new(Gateway::start_with(a.clone()).await);
    let done = Arc::new(AtomicBool::new(false));
    let poll = {
        let (gw, done) = (gw.clone(), done.clone());
        tokio::spawn(async move {
            // One keep-alive connection for each listener (the harness's pooled client).
            let (mut probes, mut exports) = (0, 0);
            let token = token("billing");
            while !done.load(Ordering::Relaxed) {
                let r = gw.admin(Method::GET, "/readyz", &[]).await;
                assert_eq!(r.status, 200, "/readyz blinked: {}", r.text());
                let r = gw.get(EXPORT_EU, &token).await;
                assert_eq!(r.status, 200, "{}", r.text());
                probes += 1;
                exports += 1;
            }
            (probes, exports)
        })
    };
    for i in 0..12 {
        let next = if i % 2 == 0 { &b } else { &a };
        let trigger = if i % 3 == 0 {
            Trigger::File
        } else {
            Trigger::Signal
        };
        reload_with(&gw, next, trigger).await;
    }
    done.store(true, Ordering::Relaxed);
    let (probes, exports) = poll.await.unwrap();
    assert!(
        probes > 12 && exports > 12,
        "{probes} probes, {exports} exports"
    );
    assert_eq!(reloads(&gw, "ok"), 12);
    assert_eq!(reloads(&gw, "error"), 0);
    let stamp = gw.state.metrics.config_last_reload_success.get();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(now - stamp < 60.0, "last reload stamped {stamp}, now {now}");
}
