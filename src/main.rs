//! The `convocore-gateway` command: run | check-config | demo.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use convocore_gateway::{reload, server, Config, ConfigError, Listeners, State};

#[derive(Parser)]
#[command(
    name = "convocore-gateway",
    version,
    about = "Caching gateway for Convocore V3 conversation exports"
)]
struct Cli {
    /// The configuration file.
    #[arg(
        long,
        global = true,
        env = "CONVOCORE_GATEWAY_CONFIG",
        default_value = "config.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration (files readable, keys parse, token sources present), print a
    /// summary, and exit.
    CheckConfig {
        /// Also fetch every `jwks_url` now and report its keys (else they are fetched at
        /// start, and reported as 0 keys loaded here).
        #[arg(long)]
        fetch: bool,
    },
    /// Run the gateway on loopback in front of an embedded mock Convocore, with a demo key.
    Demo,
}

/// jemalloc, not the system's malloc. Built with `oversize_threshold:131072`
/// (`.cargo/config.toml`): a block of 128 KiB or more comes from jemalloc's oversize arena, whose
/// pages go back to the system as soon as it is freed, so an evicted cache body does not stay
/// resident (glibc's malloc kept them: a 64 MiB cache of 1 MiB exports grew to ~140 MiB).
/// `_RJEM_MALLOC_CONF` changes jemalloc's options at run time. BENCHMARKS.md, "Allocator".
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit statuses: 0 fine, 2 configuration error, 1 any other failure.
enum Failure {
    Config(ConfigError),
    Other(String),
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::Config(e)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("convocore-gateway: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            None => run(&cli.config).await,
            Some(Command::CheckConfig { fetch }) => check_config(&cli.config, fetch).await,
            Some(Command::Demo) => convocore_gateway::demo::run()
                .await
                .map_err(|e| Failure::Other(format!("demo: {e}"))),
        }
    });
    // Connections and watchers may still hold tasks; do not wait for them.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("convocore-gateway: configuration error: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Other(e)) => {
            eprintln!("convocore-gateway: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(path: &std::path::Path) -> Result<(), Failure> {
    let config = Config::load(path)?;
    let _log = convocore_gateway::log::init(config.log.format, &config.log.level);
    let state = State::build(config)?;
    let policy = state.policy();
    let server = &policy.config.server;
    let listeners = Listeners::bind(server.listen, server.admin_listen)
        .await
        .map_err(|e| {
            Failure::Other(format!(
                "cannot listen on {} / {}: {e}",
                server.listen, server.admin_listen
            ))
        })?;
    tracing::info!(
        listen = %listeners.api.local_addr().map_err(|e| Failure::Other(e.to_string()))?,
        admin_listen = %listeners.admin.local_addr().map_err(|e| Failure::Other(e.to_string()))?,
        tls = server.tls.is_some(),
        version = env!("CARGO_PKG_VERSION"),
        "convocore-gateway started"
    );
    // SIGHUP reloads the configuration (its default action would end the process).
    tokio::spawn(reload::on_sighup(Arc::downgrade(&state)));
    server::run(state, listeners, server::shutdown_signal())
        .await
        .map_err(|e| Failure::Other(e.to_string()))
}

/// How long `check-config --fetch` waits for every `jwks_url`.
const FETCH_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

async fn check_config(path: &std::path::Path, fetch: bool) -> Result<(), Failure> {
    let config = Config::load(path)?;
    let state = State::build(config)?;
    let policy = state.policy();
    if fetch {
        let deadline = tokio::time::Instant::now() + FETCH_WAIT;
        while !policy.auth.ready() {
            if tokio::time::Instant::now() >= deadline {
                for key in policy.auth.describe() {
                    eprintln!("  key           {key}");
                }
                return Err(Failure::Other(format!(
                    "check-config --fetch: a jwks_url could not be fetched within {}s",
                    FETCH_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    let c = &policy.config;
    println!("{}: OK", path.display());
    println!(
        "  listen        {} (TLS: {})",
        c.server.listen,
        if c.server.tls.is_some() { "on" } else { "off" }
    );
    println!("  admin_listen  {}", c.server.admin_listen);
    for region in &c.regions {
        println!("  region {:<6} {}", region.0, region.1.base_url);
    }
    println!(
        "  routing       default {}, discover {}, {} static agents",
        c.routing.default_region,
        c.routing.discover,
        c.routing.agents.len()
    );
    for key in policy.auth.describe() {
        println!("  key           {key}");
    }
    if c.auth.issuers.is_empty() || c.auth.audiences.is_empty() {
        println!(
            "  warning       auth.issuers or auth.audiences is empty: iss/aud are not checked"
        );
    }
    match &c.teams {
        None => println!("  teams         (none: every authenticated team may export every agent)"),
        Some(t) => println!(
            "  teams         {}",
            t.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
    }
    println!(
        "  cache         {} max_bytes {} ttl {} stale_if_error {} compress {}",
        if c.cache.enabled { "on" } else { "off" },
        c.cache.max_bytes,
        humantime::format_duration(c.cache.ttl),
        humantime::format_duration(c.cache.stale_if_error),
        match c.cache.compress.as_slice() {
            [] => "none".to_string(),
            list => list.iter().map(|c| c.name()).collect::<Vec<_>>().join(","),
        }
    );
    if c.limits.team_rate.is_some() || c.upstream.rate.is_some() {
        println!(
            "  limits        team_rate {} (burst {}), region rate {}",
            c.limits
                .team_rate
                .map_or("-".to_string(), |r| r.to_string()),
            c.limits
                .team_burst
                .map_or("-".to_string(), |b| b.to_string()),
            c.upstream.rate.map_or("-".to_string(), |r| r.to_string()),
        );
    }
    if let (Some(shared), Some(redis)) = (&c.shared, &policy.shared) {
        // The host only: the URL's user part stays out of the output.
        let url = shared.url.trim();
        let scheme_end = url.find("://").map_or(0, |i| i + 3);
        let rest = &url[scheme_end..];
        let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        println!(
            "  shared        {}{} prefix {:?} timeout {} ({} encryption keys)",
            &url[..scheme_end],
            host,
            shared.key_prefix,
            humantime::format_duration(shared.timeout),
            redis.keys.get().len()
        );
    }
    Ok(())
}
