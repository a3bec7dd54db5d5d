//! Shared state ("Shared state: several replicas, one cache" in the contract): three gateways,
//! one real `redis-server` started per test, one mock region.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::redis_server::{key_file, RedisServer};
use common::*;

use std::time::Duration;

use convocore_gateway::testing::mock::MockConvocore;

/// A private `redis-server` and a key file (in the returned directory, kept while it lives).
async fn redis_and_key() -> (RedisServer, tempfile::TempDir, std::path::PathBuf) {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path(), "k", &[5]);
    (redis, dir, keys)
}

/// One mock region, standing for both (see [`urls`]), whose `agent-eu` has `convos`.
async fn eu_region(convos: &[&str]) -> MockConvocore {
    MockConvocore::start("eu", UPSTREAM_TOKEN, &[("agent-eu", convos)])
        .await
        .unwrap()
}

/// Both regions' URLs pointing at `region`, so every request of every replica reaches it.
fn urls(region: &MockConvocore) -> Option<(String, String)> {
    Some((region.base_url(), region.base_url()))
}

/// A replica sharing `redis` (sealing with `keys`), with `config`'s settings otherwise; ready
/// once Redis answers it.
async fn replica(redis: &RedisServer, keys: &std::path::Path, config: TestConfig) -> Gateway {
    let shared = redis.shared_config(keys);
    let gw = Gateway::start_with(TestConfig {
        extra: config.extra.clone() + &shared,
        ..config
    })
    .await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            shared_up(&gw).await == 1.0
        })
        .await,
        "shared_up"
    );
    gw
}

/// `n` replicas of one configuration sharing `redis`.
async fn replicas(
    redis: &RedisServer,
    keys: &std::path::Path,
    n: usize,
    config: TestConfig,
) -> Vec<Gateway> {
    let mut gateways = Vec::with_capacity(n);
    for _ in 0..n {
        gateways.push(replica(redis, keys, config.clone()).await);
    }
    gateways
}

struct Fleet {
    region: MockConvocore,
    gateways: Vec<Gateway>,
    _dir: tempfile::TempDir,
}

async fn fleet(redis: &RedisServer, n: usize) -> Fleet {
    fleet_with(redis, n, "enabled = true\nttl = \"1h\"\n").await
}

/// [`fleet`] with these `[cache]` settings.
async fn fleet_with(redis: &RedisServer, n: usize, cache: &str) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path(), "cache-key", &[7]);
    let region = MockConvocore::start(
        "eu",
        UPSTREAM_TOKEN,
        &[("agent-eu", &["c1", "c2", "c3"]), ("agent-na", &["c1"])],
    )
    .await
    .unwrap();
    let config = TestConfig {
        cache: cache.into(),
        region_urls: urls(&region),
        ..TestConfig::default()
    };
    let gateways = replicas(redis, &keys, n, config).await;
    Fleet {
        region,
        gateways,
        _dir: dir,
    }
}

/// `Cache-Control: no-cache`: fetched afresh and stored (memory and Redis).
async fn refetch(gw: &Gateway, t: &str) -> Resp {
    gw.request(
        http::Method::GET,
        EXPORT_EU,
        &[
            ("authorization", &format!("Bearer {t}")),
            ("cache-control", "no-cache"),
        ],
    )
    .await
}

/// A fleet lease on `EXPORT_EU` held by `holder` for `ms`, as a replica that took it would.
async fn plant_lease(redis: &RedisServer, holder: &str, ms: u64) {
    let mut conn = redis.client().await;
    let _: () = redis::cmd("SET")
        .arg("convocore-gateway:l:agent-eu:c1:json")
        .arg(holder)
        .arg("PX")
        .arg(ms)
        .query_async(&mut conn)
        .await
        .unwrap();
}

async fn shared_up(gw: &Gateway) -> f64 {
    metric(&metrics_text(gw).await, "convocore_gateway_shared_up")
}

/// Waits until Redis holds the entry of `EXPORT_EU` (writes run after the answer).
async fn stored_in_redis(redis: &RedisServer) -> Vec<u8> {
    let mut conn = redis.client().await;
    let key = "convocore-gateway:e:agent-eu:c1:json";
    for _ in 0..200 {
        let v: Option<Vec<u8>> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        if let Some(v) = v {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no entry in Redis");
}

#[tokio::test]
async fn a_replica_answers_from_what_another_stored_with_the_fleets_age() {
    let redis = RedisServer::start().await;
    let fleet = fleet(&redis, 3).await;
    let t = token("billing");
    let first = fleet.gateways[0].get(EXPORT_EU, &t).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-cache"), Some("MISS"));
    stored_in_redis(&redis).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;

    for gw in &fleet.gateways[1..] {
        let r = gw.get(EXPORT_EU, &t).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-cache"), Some("HIT"));
        let cs = r.header("cache-status").unwrap();
        assert!(
            cs.starts_with("convocore-gateway; hit; ttl=") && cs.ends_with("; detail=shared"),
            "{cs}"
        );
        let age: u64 = r.header("age").unwrap().parse().unwrap();
        assert!(
            age >= 1,
            "Age counts from when the first replica stored it: {age}"
        );
        assert_eq!(r.body, first.body);
        assert_eq!(r.header("etag"), first.header("etag"));
        assert_eq!(r.header("content-type"), first.header("content-type"));
        assert_eq!(r.header("x-convocore-region"), Some("eu"));
        // Now in this replica's memory: a plain hit.
        let again = gw.get(EXPORT_EU, &t).await;
        assert_eq!(
            again
                .header("cache-status")
                .map(|c| c.contains("detail=shared")),
            Some(false)
        );
    }
    assert_eq!(
        fleet.region.request_count(),
        1,
        "one upstream request for the fleet"
    );
    let text = metrics_text(&fleet.gateways[1]).await;
    assert!(
        metric(
            &text,
            "convocore_gateway_shared_operations_total{op=\"get\",result=\"ok\"}"
        ) >= 1.0
    );
}

#[tokio::test]
async fn values_in_redis_are_sealed_and_a_tampered_or_moved_one_is_refetched() {
    let redis = RedisServer::start().await;
    let fleet = fleet(&redis, 2).await;
    let t = token("billing");
    let first = fleet.gateways[0].get(EXPORT_EU, &t).await;
    let sealed = stored_in_redis(&redis).await;
    // Nothing of the export in clear.
    let body = first.body.clone();
    let probe = &body[..body.len().min(24)];
    assert!(
        !sealed.windows(probe.len()).any(|w| w == probe),
        "plaintext in Redis"
    );
    assert!(!sealed.windows(3).any(|w| w == b"eu\x00"));

    // The value moved under another key does not open there.
    let mut conn = redis.client().await;
    let _: () = redis::cmd("SET")
        .arg("convocore-gateway:e:agent-eu:c2:json")
        .arg(&sealed)
        .query_async(&mut conn)
        .await
        .unwrap();
    let moved = fleet.gateways[1]
        .get("/v3/agents/agent-eu/convos/c2/export", &t)
        .await;
    assert_eq!(moved.header("x-cache"), Some("MISS"));
    // A tampered value does not open either.
    let mut tampered = sealed.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x55;
    let _: () = redis::cmd("SET")
        .arg("convocore-gateway:e:agent-eu:c1:json")
        .arg(&tampered)
        .query_async(&mut conn)
        .await
        .unwrap();
    let r = fleet.gateways[1].get(EXPORT_EU, &t).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-cache"), Some("MISS"), "refetched, not served");
    let text = metrics_text(&fleet.gateways[1]).await;
    assert_eq!(
        metric(
            &text,
            "convocore_gateway_shared_operations_total{op=\"get\",result=\"rejected\"}"
        ),
        2.0
    );
}

#[tokio::test]
async fn a_rotated_key_still_opens_older_entries() {
    let redis = RedisServer::start().await;
    let fleet = fleet(&redis, 1).await;
    let t = token("billing");
    assert_eq!(fleet.gateways[0].get(EXPORT_EU, &t).await.status, 200);
    stored_in_redis(&redis).await;
    // A replica with the new key first and the old one second.
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path(), "rotated", &[9, 7]);
    let gw = replica(
        &redis,
        &keys,
        TestConfig {
            cache: "enabled = true\nttl = \"1h\"\n".into(),
            region_urls: Some((fleet.region.base_url(), fleet.region.base_url())),
            ..TestConfig::default()
        },
    )
    .await;
    let r = gw.get(EXPORT_EU, &t).await;
    assert_eq!(r.header("x-cache"), Some("HIT"));
    assert_eq!(fleet.region.request_count(), 1);
}

#[tokio::test]
async fn a_dead_redis_costs_requests_nothing_and_is_used_again_when_back() {
    let mut redis = RedisServer::start().await;
    let port = redis.port;
    let fleet = fleet(&redis, 1).await;
    let gw = &fleet.gateways[0];
    let t = token("billing");
    redis.kill();
    // Every request still answers from upstream (or memory); none fails for Redis.
    for convo in ["c1", "c2", "c3", "c1", "c2", "c3"] {
        let r = gw
            .get(&format!("/v3/agents/agent-eu/convos/{convo}/export"), &t)
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            shared_up(gw).await == 0.0
        })
        .await
    );
    // Skipped, not tried: the requests that follow do not each pay Redis's timeout.
    let failed_ops = |text: &str| {
        ["get", "set", "lock"]
            .iter()
            .flat_map(|op| ["error", "timeout"].map(|r| (op.to_string(), r)))
            .map(|(op, r)| {
                metric(
                    text,
                    &format!(
                        "convocore_gateway_shared_operations_total{{op=\"{op}\",result=\"{r}\"}}"
                    ),
                )
            })
            .sum::<f64>()
    };
    let before = failed_ops(&metrics_text(gw).await);
    for _ in 0..10 {
        assert_eq!(refetch(gw, &t).await.status, 200);
    }
    let after = failed_ops(&metrics_text(gw).await);
    assert!(
        after - before <= 3.0,
        "{before} -> {after} failed operations while skipping"
    );
    let text = metrics_text(gw).await;
    assert!(
        metric(
            &text,
            "convocore_gateway_shared_operations_total{op=\"get\",result=\"error\"}"
        ) + metric(
            &text,
            "convocore_gateway_shared_operations_total{op=\"get\",result=\"timeout\"}"
        ) >= 1.0,
        "{text}"
    );
    // Back on the same port: used again without a restart of the gateway.
    let redis = RedisServer::start_with(None, Some(port)).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            // A refetch writes to Redis: the operation that finds it back.
            let _ = refetch(gw, &t).await;
            shared_up(gw).await == 1.0
        })
        .await,
        "shared_up back to 1"
    );
    drop(redis);
}

#[tokio::test]
async fn a_wrong_password_leaves_redis_unused_and_requests_unharmed() {
    let redis = RedisServer::start_with(Some("right-password"), None).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path(), "k", &[1]);
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "wrong-password\n").unwrap();
    let gw = Gateway::start_with(TestConfig {
        cache: "enabled = true\n".into(),
        extra: format!(
            "[shared]\nurl = \"{}\"\npassword_file = \"{}\"\nencryption_key_file = \"{}\"\n",
            redis.url(),
            pw.display(),
            keys.display()
        ),
        ..TestConfig::default()
    })
    .await;
    for _ in 0..3 {
        assert_eq!(gw.get(EXPORT_EU, &token("billing")).await.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(shared_up(&gw).await, 0.0);
    // The right password (the file is re-read on change): Redis is used.
    std::fs::write(&pw, "right-password\n").unwrap();
    let t = token("billing");
    assert!(
        eventually(Duration::from_secs(10), || async {
            let _ = refetch(&gw, &t).await;
            shared_up(&gw).await == 1.0
        })
        .await,
        "shared_up after the password file changed"
    );
}

#[test]
fn check_config_names_bad_shared_keys_without_their_secrets() {
    use common::process::{check_config_cmd, run_to_end, ProcConfig};
    let dir = tempfile::tempdir().unwrap();
    let good_keys = key_file(dir.path(), "keys", &[3]);
    let bad_keys = dir.path().join("bad-keys");
    std::fs::write(&bad_keys, "c2hvcnQtYnV0LXNlY3JldA==\n").unwrap();
    let cases = [
        (
            format!("url = \"redis://u:hunter2-secret@127.0.0.1:1\"\nencryption_key_file = \"{}\"", good_keys.display()),
            "shared.url",
            "hunter2-secret",
        ),
        (
            format!("url = \"redis://127.0.0.1:1\"\nencryption_key_file = \"{}\"", bad_keys.display()),
            "shared.encryption_key_file",
            "c2hvcnQtYnV0LXNlY3JldA",
        ),
        (
            "url = \"redis://127.0.0.1:1\"\nencryption_key_file = \"/nonexistent/keys\"".to_string(),
            "shared.encryption_key_file",
            "\u{1}",
        ),
        (
            format!("url = \"redis://127.0.0.1:1\"\npassword_env = \"CONVOCORE_TEST_UNSET_PW\"\nencryption_key_file = \"{}\"", good_keys.display()),
            "shared.password_env",
            "\u{1}",
        ),
    ];
    for (shared, key, secret) in cases {
        let mut cfg = ProcConfig::new(dir.path());
        cfg.test.extra = format!("[shared]\n{shared}\n");
        let path = cfg.write(&dir.path().join("config.toml"));
        let f = run_to_end(&mut check_config_cmd(&path));
        assert_eq!(f.code, Some(2), "{shared}: {f:?}");
        assert!(f.stderr.contains(key), "{shared}: {}", f.stderr);
        assert!(!f.all().contains(secret), "{shared}: {}", f.all());
    }
    // A good [shared] passes without a Redis to talk to (it is checked when used).
    let mut cfg = ProcConfig::new(dir.path());
    cfg.test.extra = format!(
        "[shared]\nurl = \"redis://127.0.0.1:1\"\nencryption_key_file = \"{}\"\n",
        good_keys.display()
    );
    let path = cfg.write(&dir.path().join("config.toml"));
    let f = run_to_end(&mut check_config_cmd(&path));
    assert_eq!(f.code, Some(0), "{f:?}");
}

fn purge_token(team: &str) -> String {
    let mut c = claims(team);
    c["scope"] = "openid convocore-gateway:purge".into();
    mint(jsonwebtoken::Algorithm::RS256, Some("rsa-1"), &c)
}

async fn purge(gw: &Gateway) -> Resp {
    let auth = format!("Bearer {}", purge_token("ops"));
    gw.admin(
        http::Method::DELETE,
        "/admin/cache/agents/agent-eu/convos/c1",
        &[("authorization", &auth)],
    )
    .await
}

#[tokio::test]
async fn a_purge_on_one_replica_reaches_redis_and_every_replica() {
    let redis = RedisServer::start().await;
    let fleet = fleet(&redis, 3).await;
    let t = token("billing");
    assert_eq!(
        fleet.gateways[0].get(EXPORT_EU, &t).await.header("x-cache"),
        Some("MISS")
    );
    stored_in_redis(&redis).await;
    for gw in &fleet.gateways[1..] {
        assert_eq!(gw.get(EXPORT_EU, &t).await.header("x-cache"), Some("HIT"));
    }
    // Give each replica's subscriber time to be listening.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = purge(&fleet.gateways[2]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"]["purged"], 1);
    let started = std::time::Instant::now();
    let mut conn = redis.client().await;
    let left: Option<Vec<u8>> = redis::cmd("GET")
        .arg("convocore-gateway:e:agent-eu:c1:json")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(left.is_none(), "out of Redis");
    // Every replica drops its own copy: the next request there goes upstream.
    for gw in &fleet.gateways[..2] {
        assert!(
            eventually(Duration::from_secs(2), || async {
                let text = metrics_text(gw).await;
                metric(&text, "convocore_gateway_cache_entries") == 0.0
            })
            .await,
            "a replica kept the purged entry"
        );
    }
    eprintln!(
        "purge reached the other replicas in {:?}",
        started.elapsed()
    );
    assert_eq!(
        fleet.gateways[0].get(EXPORT_EU, &t).await.header("x-cache"),
        Some("MISS")
    );
    stored_in_redis(&redis).await;
    for gw in &fleet.gateways[1..] {
        assert_eq!(gw.get(EXPORT_EU, &t).await.header("x-cache"), Some("HIT"));
    }
    assert_eq!(
        fleet.region.request_count(),
        2,
        "one refetch after the purge"
    );
}

#[tokio::test]
async fn a_fetch_in_flight_during_a_purge_stores_on_no_replica() {
    let redis = RedisServer::start().await;
    let fleet = fleet(&redis, 2).await;
    let t = token("billing");
    tokio::time::sleep(Duration::from_millis(300)).await; // subscribers listening
    fleet
        .region
        .set_faults(convocore_gateway::testing::mock::Faults {
            delay: Duration::from_millis(600),
            ..Default::default()
        });
    let slow = {
        let gw0 = fleet.gateways[0].url(EXPORT_EU);
        let t = t.clone();
        tokio::spawn(async move {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<http_body_util::Empty<bytes::Bytes>>();
            let req = http::Request::get(gw0)
                .header("authorization", format!("Bearer {t}"))
                .body(http_body_util::Empty::new())
                .unwrap();
            client.request(req).await.unwrap().status()
        })
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            fleet.region.request_count() == 1
        })
        .await
    );
    // The purge lands on the other replica while replica 0's fetch is upstream.
    assert_eq!(purge(&fleet.gateways[1]).await.status, 200);
    assert_eq!(slow.await.unwrap(), 200);
    fleet.region.set_faults(Default::default());
    tokio::time::sleep(Duration::from_millis(300)).await; // a write would have landed by now
    let mut conn = redis.client().await;
    let left: Option<Vec<u8>> = redis::cmd("GET")
        .arg("convocore-gateway:e:agent-eu:c1:json")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(left.is_none(), "the pre-purge fetch was written to Redis");
    // Nor in replica 0's memory (its local epoch moved with the broadcast).
    assert_eq!(
        fleet.gateways[0].get(EXPORT_EU, &t).await.header("x-cache"),
        Some("MISS")
    );
    assert_eq!(fleet.region.request_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_spread_across_replicas_makes_one_upstream_request() {
    let redis = RedisServer::start().await;
    let fleet = std::sync::Arc::new(fleet(&redis, 3).await);
    fleet
        .region
        .set_faults(convocore_gateway::testing::mock::Faults {
            delay: Duration::from_millis(400),
            ..Default::default()
        });
    let t = token("billing");
    let mut tasks = Vec::new();
    for i in 0..12 {
        let (fleet, t) = (fleet.clone(), t.clone());
        tasks.push(tokio::spawn(async move {
            let r = fleet.gateways[i % 3].get(EXPORT_EU, &t).await;
            (
                r.status,
                r.header("x-cache").map(str::to_string),
                r.header("cache-status").map(str::to_string),
            )
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    assert!(outcomes.iter().all(|(s, _, _)| *s == 200), "{outcomes:?}");
    assert_eq!(
        fleet.region.request_count(),
        1,
        "one upstream request for the fleet: {outcomes:?}"
    );
    // The other replicas' waiters answered from the holder's entry.
    let shared = outcomes
        .iter()
        .filter(|(_, x, cs)| {
            x.as_deref() == Some("HIT")
                && cs.as_deref().is_some_and(|c| c.contains("detail=shared"))
        })
        .count();
    assert!(shared >= 2, "{outcomes:?}");
    // No lease is left behind.
    let mut conn = redis.client().await;
    let lease: Option<String> = redis::cmd("GET")
        .arg("convocore-gateway:l:agent-eu:c1:json")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(lease.is_none());
}

#[tokio::test]
async fn a_lease_whose_holder_fails_lets_the_waiters_fetch_themselves() {
    let redis = RedisServer::start().await;
    let fleet = fleet(&redis, 2).await;
    // A holder that died: its lease is there, its entry never comes.
    plant_lease(&redis, "dead-holder", 700).await;
    let started = std::time::Instant::now();
    let r = fleet.gateways[0].get(EXPORT_EU, &token("billing")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-cache"), Some("MISS"));
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "it waited for the lease first"
    );
    assert_eq!(fleet.region.request_count(), 1);
}

#[tokio::test]
async fn a_team_bucket_holds_for_the_fleet_and_for_each_replica_without_redis() {
    let mut redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path(), "k", &[5]);
    let config = TestConfig {
        extra: "[limits]\nteam_rate = \"1/m\"\nteam_burst = 2\n".into(),
        ..TestConfig::default()
    };
    let gateways = replicas(&redis, &keys, 3, config).await;
    let t = token("billing");
    // Two requests on two replicas use the team's bucket of 2; the third replica says 429.
    assert_eq!(gateways[0].get(EXPORT_EU, &t).await.status, 200);
    assert_eq!(gateways[1].get(EXPORT_EU, &t).await.status, 200);
    let limited = gateways[2].get(EXPORT_EU, &t).await;
    limited.assert_error(429, "TOO_MANY_REQUESTS");
    assert_eq!(
        limited.header("ratelimit-policy"),
        Some("\"team\";q=2;w=120")
    );
    let text = metrics_text(&gateways[2]).await;
    assert!(
        metric(
            &text,
            "convocore_gateway_shared_operations_total{op=\"limit\",result=\"ok\"}"
        ) >= 1.0
    );
    // Another team is not limited by billing's bucket.
    assert_eq!(
        gateways[2].get(EXPORT_EU, &token("support")).await.status,
        200
    );

    // Redis gone: each replica enforces (its share of) the limit itself, and nothing fails
    // for Redis's sake.
    redis.kill();
    let gw = &gateways[0];
    let team = token("reports");
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(gw.get(EXPORT_EU, &team).await.status.as_u16());
    }
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&429),
        "the limit still holds: {statuses:?}"
    );
    assert!(statuses[0] == 200, "{statuses:?}");
}

#[tokio::test]
async fn an_upstream_429_pauses_the_region_on_every_replica() {
    let redis = RedisServer::start().await;
    let fleet = fleet(&redis, 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // subscribers listening
    let t = token("billing");
    fleet
        .region
        .set_faults(convocore_gateway::testing::mock::Faults {
            status: Some(429),
            headers: vec![("retry-after".into(), "2".into())],
            ..Default::default()
        });
    assert_eq!(fleet.gateways[0].get(EXPORT_EU, &t).await.status, 429);
    assert_eq!(fleet.region.request_count(), 1);
    fleet.region.set_faults(Default::default());
    // The other replicas pause too: their own 429, nothing sent.
    for gw in &fleet.gateways[1..] {
        let mut own = None;
        for _ in 0..50 {
            let r = gw.get("/v3/agents/agent-eu/convos/c2/export", &t).await;
            if r.status == 429 {
                own = Some(r);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let own = own.expect("the pause reached this replica");
        own.assert_error(429, "TOO_MANY_REQUESTS");
        assert!(own.header("retry-after").is_some());
    }
    assert!(
        fleet.region.request_count() <= 2,
        "paused replicas sent nothing (at most one request raced the broadcast)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regions_rate_holds_for_the_fleet() {
    let (redis, _dir, keys) = redis_and_key().await;
    let region = MockConvocore::start(
        "eu",
        UPSTREAM_TOKEN,
        &[("agent-eu", &["c1", "c2", "c3", "c4", "c5", "c6"])],
    )
    .await
    .unwrap();
    let gateways: Vec<_> = replicas(
        &redis,
        &keys,
        3,
        TestConfig {
            upstream: "rate = \"5/s\"\n".into(),
            region_urls: urls(&region),
            ..TestConfig::default()
        },
    )
    .await
    .into_iter()
    .map(std::sync::Arc::new)
    .collect();
    // Three replicas, four exports each, at once (cache off: every request goes upstream).
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for gw in &gateways {
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move {
            for convo in ["c1", "c2", "c3", "c4"] {
                let r = gw
                    .get(
                        &format!("/v3/agents/agent-eu/convos/{convo}/export"),
                        &token("billing"),
                    )
                    .await;
                assert_eq!(r.status, 200, "{}", r.text());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let took = started.elapsed();
    assert_eq!(region.request_count(), 12);
    // 12 starts at 5/s for the fleet are 11 gaps of 200 ms; each replica alone at 5/s would
    // have taken 600 ms.
    assert!(
        took >= Duration::from_millis(1800),
        "12 exchanges in {took:?}"
    );
}

#[tokio::test]
async fn a_region_one_replica_discovered_is_known_to_the_others() {
    let (redis, _dir, keys) = redis_and_key().await;
    let (eu, na) = mocks().await;
    na.add_agent("agent-found", &["c1"]);
    let gateways = replicas(
        &redis,
        &keys,
        2,
        TestConfig {
            region_urls: Some((eu.base_url(), na.base_url())),
            ..TestConfig::default()
        },
    )
    .await;
    let path = "/v3/agents/agent-found/convos/c1/export";
    let t = token("billing");
    // Replica 0 discovers: EU says 404, NA has it.
    let r = gateways[0].get(path, &t).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-convocore-region"), Some("na"));
    assert_eq!((eu.request_count(), na.request_count()), (1, 1));
    // Replica 1 goes straight to NA.
    let r = gateways[1].get(path, &t).await;
    assert_eq!(r.header("x-convocore-region"), Some("na"));
    assert_eq!(
        (eu.request_count(), na.request_count()),
        (1, 2),
        "no second discovery"
    );
}

#[tokio::test]
async fn rediss_with_the_upstream_ca_file() {
    let (ca, cert, key) = test_pki();
    let redis = RedisServer::start_tls(&ca, &cert, &key).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path(), "k", &[5]);
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    let region = eu_region(&["c1"]).await;
    let config = TestConfig {
        cache: "enabled = true\n".into(),
        upstream: format!("ca_file = \"{}\"\n", ca_file.display()),
        region_urls: urls(&region),
        ..TestConfig::default()
    };
    let gateways = replicas(&redis, &keys, 2, config).await;
    let t = token("billing");
    assert_eq!(
        gateways[0].get(EXPORT_EU, &t).await.header("x-cache"),
        Some("MISS")
    );
    let sealed = stored_in_redis(&redis).await;
    assert!(!sealed.is_empty());
    let r = gateways[1].get(EXPORT_EU, &t).await;
    assert_eq!(r.header("x-cache"), Some("HIT"));
    assert!(r.header("cache-status").unwrap().contains("detail=shared"));
    assert_eq!(region.request_count(), 1);
}

#[tokio::test]
async fn both_levels_mean_the_same_for_no_cache_no_store_teams_and_stale_entries() {
    let (redis, _dir, keys) = redis_and_key().await;
    let region = eu_region(&["c1", "c2"]).await;
    let teams = "[teams]\nbilling = { agents = [\"*\"] }\nsupport = { agents = [\"agent-na\"] }\n";
    let config = TestConfig {
        cache: "enabled = true\nttl = \"1s\"\nstale_if_error = \"1h\"\n".into(),
        teams: teams.into(),
        region_urls: urls(&region),
        ..TestConfig::default()
    };
    let gateways = replicas(&redis, &keys, 3, config).await;
    let t = token("billing");
    let mut conn = redis.client().await;
    // no-store: fetched, stored at neither level.
    let r = gateways[0]
        .request(
            http::Method::GET,
            EXPORT_EU,
            &[
                ("authorization", &format!("Bearer {t}")),
                ("cache-control", "no-store"),
            ],
        )
        .await;
    assert_eq!(r.header("x-cache"), Some("BYPASS"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let none: Option<Vec<u8>> = redis::cmd("GET")
        .arg("convocore-gateway:e:agent-eu:c1:json")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(none.is_none(), "no-store wrote to Redis");

    // A stored 200 expires from Redis after ttl plus the stale window.
    assert_eq!(
        gateways[0].get(EXPORT_EU, &t).await.header("x-cache"),
        Some("MISS")
    );
    stored_in_redis(&redis).await;
    let pttl: i64 = redis::cmd("PTTL")
        .arg("convocore-gateway:e:agent-eu:c1:json")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        (3_590_000..=3_601_000).contains(&pttl),
        "expires after ttl 1s + stale_if_error 1h: {pttl} ms"
    );

    // [teams] comes before either level: a team that may not export the agent gets 403,
    // whatever Redis holds.
    gateways[1]
        .get(EXPORT_EU, &token("support"))
        .await
        .assert_error(403, "FORBIDDEN");

    // no-cache on another replica: fetched afresh although Redis has it, and replaces it.
    let before = region.request_count();
    let r = refetch(&gateways[1], &t).await;
    assert_eq!(r.header("x-cache"), Some("MISS"));
    assert_eq!(region.request_count(), before + 1);

    // Past ttl, the region failing: a replica that never saw the export serves Redis's copy
    // stale.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    region.set_faults(convocore_gateway::testing::mock::Faults {
        status: Some(500),
        ..Default::default()
    });
    let stale = gateways[2].get(EXPORT_EU, &t).await;
    assert_eq!(stale.status, 200, "{}", stale.text());
    assert_eq!(stale.header("x-cache"), Some("STALE"));
    assert!(stale.header("cache-status").unwrap().contains("fwd=stale"));
    // And /readyz does not depend on Redis.
    assert_eq!(
        gateways[2]
            .admin(http::Method::GET, "/readyz", &[])
            .await
            .status,
        200
    );
}

/// `cargo test --test shared -- --ignored --nocapture fleet_hit_ratio`: one request stream
/// (120 requests over 20 conversations, round robin over 3 replicas) with and without
/// `[shared]`; prints the fleet's hit ratio and upstream requests.
#[tokio::test]
#[ignore]
async fn fleet_hit_ratio() {
    let (redis, _dir, keys) = redis_and_key().await;
    let convos: Vec<String> = (0..20).map(|i| format!("c{i}")).collect();
    for shared in [false, true] {
        let refs: Vec<&str> = convos.iter().map(String::as_str).collect();
        let region = eu_region(&refs).await;
        let mut gateways = Vec::new();
        for _ in 0..3 {
            let extra = if shared {
                format!(
                    "[shared]\nurl = \"{}\"\nencryption_key_file = \"{}\"\nkey_prefix = \"ratio:\"\n",
                    redis.url(),
                    keys.display()
                )
            } else {
                String::new()
            };
            let gw = Gateway::start_with(TestConfig {
                cache: "enabled = true\nttl = \"1h\"\n".into(),
                region_urls: urls(&region),
                extra,
                ..TestConfig::default()
            })
            .await;
            if shared {
                assert!(
                    eventually(Duration::from_secs(5), || async {
                        shared_up(&gw).await == 1.0
                    })
                    .await
                );
            }
            gateways.push(gw);
        }
        let t = token("billing");
        let mut hits = 0;
        for i in 0..120 {
            let convo = &convos[(i * 7) % 20];
            let r = gateways[i % 3]
                .get(&format!("/v3/agents/agent-eu/convos/{convo}/export"), &t)
                .await;
            if r.header("x-cache") == Some("HIT") {
                hits += 1;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        println!(
            "fleet hit ratio, 3 replicas, {}: {:.1} % ({hits} of 120), upstream requests {}",
            if shared { "[shared]" } else { "no [shared]" },
            hits as f64 / 1.2,
            region.request_count()
        );
    }
}

#[tokio::test]
async fn a_waiter_gives_up_on_a_lease_after_request_timeout() {
    let (redis, _dir, keys) = redis_and_key().await;
    let region = eu_region(&["c1"]).await;
    let gw = replica(
        &redis,
        &keys,
        TestConfig {
            cache: "enabled = true\n".into(),
            upstream: "request_timeout = \"600ms\"\n".into(),
            region_urls: urls(&region),
            ..TestConfig::default()
        },
    )
    .await;
    // A lease that outlives the wait (a holder stuck far longer than request_timeout).
    plant_lease(&redis, "stuck-holder", 60_000).await;
    let started = std::time::Instant::now();
    let r = gw.get(EXPORT_EU, &token("billing")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-cache"), Some("MISS"));
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(400), "waited {waited:?}");
    assert!(waited < Duration::from_secs(10), "waited {waited:?}");
    assert_eq!(region.request_count(), 1);
}

#[tokio::test]
async fn a_changed_key_file_is_read_again_and_old_values_no_longer_open() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path(), "keys", &[1]);
    let region = eu_region(&["c1", "c2"]).await;
    let gateways = replicas(
        &redis,
        &keys,
        2,
        TestConfig {
            cache: "enabled = true\n".into(),
            region_urls: urls(&region),
            ..TestConfig::default()
        },
    )
    .await;
    let t = token("billing");
    assert_eq!(
        gateways[0].get(EXPORT_EU, &t).await.header("x-cache"),
        Some("MISS")
    );
    stored_in_redis(&redis).await;
    // The old key is dropped from the file (a compromised key): once the file is read again
    // (it is polled every 500 ms), its values stop opening on every replica.
    key_file(dir.path(), "keys", &[2]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = gateways[1].get(EXPORT_EU, &t).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-cache"),
        Some("MISS"),
        "served a value of the dropped key"
    );
    let text = metrics_text(&gateways[1]).await;
    assert!(
        metric(
            &text,
            "convocore_gateway_shared_operations_total{op=\"get\",result=\"rejected\"}"
        ) >= 1.0
    );
}

#[tokio::test]
async fn an_acl_user_in_the_url_with_its_password_from_a_file() {
    let redis = RedisServer::start_args(
        Some("default-password"),
        None,
        &[
            "--user",
            "gateway",
            "on",
            ">gateway-password",
            "~*",
            "&*",
            "+@all",
        ],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path(), "k", &[1]);
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "gateway-password\n").unwrap();
    let gw = Gateway::start_with(TestConfig {
        cache: "enabled = true\n".into(),
        extra: format!(
            "[shared]\nurl = \"redis://gateway@127.0.0.1:{}/0\"\npassword_file = \"{}\"\nencryption_key_file = \"{}\"\n",
            redis.port,
            pw.display(),
            keys.display()
        ),
        ..TestConfig::default()
    })
    .await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            shared_up(&gw).await == 1.0
        })
        .await,
        "the ACL user logged in"
    );
    assert_eq!(gw.get(EXPORT_EU, &token("billing")).await.status, 200);
}

/// Revalidation with `[shared]`: one replica's conditional refresh renews the entry for the
/// fleet. The other replica, holding the same expired entry, reads the renewed one from Redis
/// instead of asking Convocore again. Time moves on tokio's clock, which both replicas (in this
/// process) and the entries' ages share.
#[tokio::test]
async fn a_revalidation_on_one_replica_renews_the_entry_for_the_fleet() {
    let redis = RedisServer::start().await;
    let Fleet {
        region,
        gateways: fleet,
        _dir,
    } = fleet_with(&redis, 2, "enabled = true\nttl = \"60s\"\n").await;
    let (a, b) = (&fleet[0], &fleet[1]);
    let t = token("billing");
    let first = a.get(EXPORT_EU, &t).await;
    assert_eq!(first.header("x-cache"), Some("MISS"));
    let sealed = stored_in_redis(&redis).await;
    assert_eq!(b.get(EXPORT_EU, &t).await.header("x-cache"), Some("HIT"));
    assert_eq!(region.request_count(), 1);

    // Both replicas' entries expire.
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(61)).await;
    tokio::time::resume();
    tokio::time::sleep(Duration::from_millis(20)).await;

    let r = a.get(EXPORT_EU, &t).await;
    assert_eq!(r.header("x-cache"), Some("REVALIDATED"));
    assert_eq!(region.not_modified(), 1);
    // The renewed entry reaches Redis (after the answer): its sealed value changes.
    let mut renewed = false;
    for _ in 0..200 {
        if stored_in_redis(&redis).await != sealed {
            renewed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(renewed, "the renewed entry was written to Redis");

    let r = b.get(EXPORT_EU, &t).await;
    assert_eq!(
        r.header("x-cache"),
        Some("HIT"),
        "{:?}",
        r.header("cache-status")
    );
    assert!(r.header("cache-status").unwrap().contains("detail=shared"));
    assert_eq!(r.header("age"), Some("0"));
    assert_eq!(r.body, first.body);
    assert_eq!(
        region.request_count(),
        2,
        "one conditional request for the fleet"
    );
}

/// How many connections of `redis` subscribe to the purge channel.
async fn purge_subscribers(redis: &RedisServer) -> i64 {
    let mut conn = redis.client().await;
    let reply: Vec<redis::Value> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg("convocore-gateway:purge")
        .query_async(&mut conn)
        .await
        .unwrap();
    match reply.get(1) {
        Some(redis::Value::Int(n)) => *n,
        _ => -1,
    }
}

/// A reload that points `[shared]` at another Redis follows that one's purges at once: the
/// old subscriptions are dropped, not kept until they fail.
#[tokio::test]
async fn a_reload_to_another_redis_follows_its_purges() {
    let (first, second) = (RedisServer::start().await, RedisServer::start().await);
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path(), "cache-key", &[7]);
    let region = eu_region(&["c1"]).await;
    let config = TestConfig {
        cache: "enabled = true\nttl = \"1h\"\n".into(),
        region_urls: urls(&region),
        ..TestConfig::default()
    };
    let moved = replica(&first, &keys, config.clone()).await;
    let other = replica(&second, &keys, config.clone()).await;
    let t = token("billing");
    assert_eq!(
        moved.get(EXPORT_EU, &t).await.header("x-cache"),
        Some("MISS")
    );

    assert_eq!(purge_subscribers(&first).await, 1);
    assert_eq!(purge_subscribers(&second).await, 1);

    let text = moved.render(&TestConfig {
        extra: config.extra.clone() + &second.shared_config(&keys),
        ..config.clone()
    });
    moved.replace_config(&text);
    moved.reload().await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            purge_subscribers(&second).await == 2 && purge_subscribers(&first).await == 0
        })
        .await,
        "the reloaded replica follows the second Redis only"
    );

    // A purge on the other replica, through the second Redis, reaches the moved one.
    assert_eq!(purge(&other).await.status, 200);
    assert!(
        eventually(Duration::from_secs(5), || async {
            moved.state.cache.usage().await.0 == 0
        })
        .await,
        "the purge reached the replica that moved"
    );
    assert_eq!(
        moved.get(EXPORT_EU, &t).await.header("x-cache"),
        Some("MISS")
    );
}
