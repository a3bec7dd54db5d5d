//! Live reconfiguration: on `SIGHUP`, or when the config file changes (polled like every
//! watched file, so a Kubernetes ConfigMap mounted as a directory applies without a restart).
//!
//! The new file is checked exactly as `check-config` checks it, and the new policy is built
//! off the async threads, reading every file the config names. Invalid: nothing changes, the
//! error (key and file) is logged and counted. Valid: the policy is swapped in for requests
//! that start from then on, the cache is resized and loses the entries of removed regions,
//! and the log level follows. Listen addresses wait for a restart. Nothing here touches a
//! connection or readiness.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::config::{Config, ConfigError};
use crate::state::{Policy, State};
use crate::watch::{Stamp, POLL};

/// Reloads the configuration file; `trigger` says why, for the log. On error nothing changes.
pub async fn reload(state: &Arc<State>, trigger: &'static str) -> Result<(), ConfigError> {
    let mut loaded = state.reloading.lock().await;
    let path = state.policy().config.path.clone();
    let building = state.clone();
    let shown = path.clone();
    let built = tokio::task::spawn_blocking(move || {
        // The version about to be read: the file watcher will not load it again.
        let stamp = Stamp::of(&shown).ok();
        let config = Config::load(&shown);
        (
            stamp,
            config.and_then(|config| building.build_policy(config)),
        )
    })
    .await
    .map(|(stamp, built)| {
        *loaded = stamp;
        built
    })
    .unwrap_or_else(|e| {
        Err(ConfigError::new(
            &path,
            "-",
            format!("the reload did not finish: {e}"),
        ))
    });
    let built = match built {
        Ok(policy) => warm(policy, &path).await,
        Err(e) => Err(e),
    };
    match built {
        Ok(policy) => {
            apply(state, policy).await;
            state.metrics.config_loaded(true);
            tracing::info!(trigger, file = %path.display(), "configuration reloaded");
            Ok(())
        }
        Err(e) => {
            state.metrics.config_loaded(false);
            tracing::error!(
                trigger,
                file = %e.file,
                key = %e.key,
                error = %e.message,
                "configuration reload refused; the running configuration stays"
            );
            Err(e)
        }
    }
}

/// How long a new configuration may take to become ready (a `jwks_url` it adds fetched).
const WARM_UP: Duration = Duration::from_secs(10);

/// Waits until the new policy could answer: every `jwks_url` it names has keys (a URL the
/// running configuration already follows has them already). A policy that does not get there
/// is refused, so that a reload never turns `/readyz` to 503, as Envoy warms a cluster
/// before using it.
async fn warm(policy: Policy, path: &Path) -> Result<Policy, ConfigError> {
    let deadline = tokio::time::Instant::now() + WARM_UP;
    while !policy.auth.ready() {
        if tokio::time::Instant::now() >= deadline {
            return Err(ConfigError::new(
                path,
                "auth.keys",
                "a jwks_url of the new configuration could not be fetched; nothing changed",
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(policy)
}

async fn apply(state: &State, policy: Policy) {
    let old = state.policy();
    let (was, now) = (&old.config.server, &policy.config.server);
    if was.listen != now.listen {
        tracing::warn!(from = %was.listen, to = %now.listen, "server.listen changed; it takes effect at the next restart");
    }
    if was.admin_listen != now.admin_listen {
        tracing::warn!(from = %was.admin_listen, to = %now.admin_listen, "server.admin_listen changed; it takes effect at the next restart");
    }
    let regions = &policy.upstream.regions;
    state
        .cache
        .configure(&policy.cache, |entry| {
            regions.by_name(entry.region.as_bytes()).is_some()
        })
        .await;
    if old.config.log.level != policy.config.log.level {
        crate::log::set_level(&policy.config.log.level);
    }
    state.install(policy);
}

/// Follows the config file: a version other than the one last loaded (a new inode through a
/// `..data` swap, a new size or time) reloads it, unless a `SIGHUP` got there first. Ends
/// when the state is dropped.
pub async fn follow_file(state: Weak<State>) {
    let Some(path) = state.upgrade().map(|s| s.policy().config.path.clone()) else {
        return;
    };
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // A file gone for a moment (a swap in progress) is not a change.
        let Some(now) = stamp(path.clone()).await else {
            continue;
        };
        let Some(state) = state.upgrade() else { return };
        if *state.reloading.lock().await == Some(now) {
            continue;
        }
        let _ = reload(&state, "file").await;
    }
}

async fn stamp(path: PathBuf) -> Option<Stamp> {
    tokio::task::spawn_blocking(move || Stamp::of(&path).ok())
        .await
        .ok()
        .flatten()
}

/// Reloads on every `SIGHUP` until the state is dropped. Installing the handler replaces the
/// signal's default action (ending the process).
#[cfg(unix)]
pub async fn on_sighup(state: Weak<State>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reload by changing the file");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        let Some(state) = state.upgrade() else { return };
        let _ = reload(&state, "SIGHUP").await;
    }
}

#[cfg(not(unix))]
pub async fn on_sighup(_state: Weak<State>) {}
