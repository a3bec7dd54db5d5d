//! The configuration file: serde structs that mirror `CONTRACT.md`, one file per section, each
//! with its own `validate()`; strict parsing (unknown keys are errors), and errors that name
//! the key and the file. `check-config`, start-up and every reload share [`Config::load`].

mod auth;
mod cache;
pub mod limits;
mod log;
mod routing;
mod server;
mod shared;
mod teams;
mod upstream;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

pub use self::auth::{Auth, Key};
pub use self::cache::Cache;
pub use self::limits::{Limits, Rate};
pub use self::log::{Log, LogFormat};
pub use self::routing::Routing;
pub use self::server::{Server, Tls};
pub use self::shared::Shared;
pub use self::teams::Team;
pub use self::upstream::{Breaker, Region, Upstream};

/// A configuration problem: which file, which key, what is wrong. Exit status 2.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(file: &Path, key: impl Into<String>, message: impl fmt::Display) -> Self {
        ConfigError {
            file: file.display().to_string(),
            key: key.into(),
            message: message.to_string(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: Server,
    #[serde(default)]
    pub upstream: Upstream,
    #[serde(default = "upstream::default_regions")]
    pub regions: BTreeMap<String, Region>,
    #[serde(default)]
    pub routing: Routing,
    #[serde(default)]
    pub auth: Auth,
    /// Absent: every authenticated team may export every agent.
    pub teams: Option<BTreeMap<String, Team>>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub cache: Cache,
    #[serde(default)]
    pub log: Log,
    /// State shared by every replica, in Redis.
    pub shared: Option<Shared>,
    /// The file this was read from; relative `*_file` paths resolve against its folder.
    #[serde(skip)]
    pub path: PathBuf,
}

/// Sizes: `"64KiB"`, `"256MiB"`, or a plain integer of bytes.
fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Int(n) => Ok(n),
        Raw::Text(s) => parse_size::Config::new()
            .with_binary()
            .parse_size(s.trim())
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid size {s:?} ({e}); use e.g. \"64KiB\", \"256MiB\" or a byte count"
                ))
            }),
    }
}

impl Config {
    /// Reads, parses and validates the file. Every error names the file and the key.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path, "-", format!("cannot read the file: {e}")))?;
        Config::parse(&text, path)
    }

    /// Parses and validates TOML text as if read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::parse(text)
            .map_err(|e| ConfigError::new(path, "-", toml_message(text, &e)))?;
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." || key.is_empty() {
                "-".to_string()
            } else {
                key
            };
            ConfigError::new(path, key, toml_message(text, &e.into_inner()))
        })?;
        config.path = path.to_path_buf();
        // An empty `[teams]` (every entry commented out, as in the shipped config) sets no
        // rules; only a table that names teams restricts access.
        if config.teams.as_ref().is_some_and(|t| t.is_empty()) {
            config.teams = None;
        }
        config.validate()?;
        Ok(config)
    }

    /// An error about `key` in this file.
    pub fn err(&self, key: impl Into<String>, message: impl fmt::Display) -> ConfigError {
        ConfigError::new(&self.path, key, message)
    }

    /// Resolves a `*_file` path: relative paths are taken from the config file's folder.
    pub fn resolve(&self, file: &Path) -> PathBuf {
        if file.is_absolute() {
            return file.to_path_buf();
        }
        match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join(file),
            _ => file.to_path_buf(),
        }
    }

    /// Checks what serde cannot, section by section: cross-references, ranges, exactly-one-of
    /// sources. Files and environment variables are read later, by the parts that use them.
    fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate(self)?;
        self.upstream.validate(self)?;
        upstream::validate_regions(self)?;
        self.routing.validate(self)?;
        self.auth.validate(self)?;
        self.limits.validate(self)?;
        if let Some(teams) = &self.teams {
            teams::validate(teams, self)?;
        }
        self.cache.validate(self)?;
        if let Some(shared) = &self.shared {
            shared.validate(self)?;
        }
        self.log.validate(self)
    }
}

/// toml's `Display` quotes the offending source line, which may hold a secret pasted under a
/// wrong key; say only what is wrong and where. serde's own message may quote the offending
/// value (`invalid type: string "..."`): quoted text is left out too.
fn toml_message(text: &str, e: &toml::de::Error) -> String {
    let message = redact_quoted(&e.message().trim().replace('\n', " "));
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
            format!("{message} (line {line}, column {column})")
        }
        None => message,
    }
}

/// `invalid type: string "s3cr3t", expected ...` to `invalid type: string "…", expected ...`.
fn redact_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut inside = false;
    for c in message.chars() {
        if c == '"' {
            if inside {
                out.push('…');
            }
            inside = !inside;
            out.push(c);
        } else if !inside {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    const MINIMAL: &str = r#"
        [upstream]
        token_env = "TOKEN"
        [[auth.keys]]
        algorithm = "HS256"
        secret_env = "SECRET"
    "#;

    #[test]
    fn shared_keys_are_checked_and_never_echo_a_password() {
        let with = |shared: &str| parse(&format!("{MINIMAL}\n[shared]\n{shared}\n"));
        let ok =
            with("url = \"rediss://gateway@redis.internal:6380/1\"\nencryption_key_file = \"k\"")
                .unwrap();
        let shared = ok.shared.unwrap();
        assert_eq!(shared.key_prefix, "convocore-gateway:");
        assert_eq!(shared.timeout, Duration::from_millis(50));
        for (text, key) in [
            ("encryption_key_file = \"k\"", "shared"),
            ("url = \"http://redis\"\nencryption_key_file = \"k\"", "shared.url"),
            ("url = \"redis://\"\nencryption_key_file = \"k\"", "shared.url"),
            ("url = \"redis://redis\"", "shared.encryption_key_file"),
            ("url = \"redis://redis\"\nencryption_key_file = \"k\"\ntimeout = \"0s\"", "shared.timeout"),
            ("url = \"redis://redis\"\nencryption_key_file = \"k\"\nkey_prefix = \"\"", "shared.key_prefix"),
            ("url = \"redis://redis\"\nencryption_key_file = \"k\"\npassword_env = \"A\"\npassword_file = \"p\"", "shared.password_env"),
            ("url = \"redis://redis\"\nencryption_key_file = \"k\"\ndatabase = 2", "shared"),
        ] {
            let e = with(text).unwrap_err();
            assert!(e.key.starts_with(key), "{text}: {e}");
        }
        let e = with("url = \"redis://user:s3cr3t-pw@redis:6379\"\nencryption_key_file = \"k\"")
            .unwrap_err();
        assert_eq!(e.key, "shared.url");
        assert!(!e.to_string().contains("s3cr3t"), "{e}");
        assert!(e.message.contains("password_file"), "{e}");
    }

    #[test]
    fn traffic_control_keys_have_contract_defaults_and_are_checked() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.upstream.max_concurrency, 32);
        assert_eq!(c.upstream.max_queue, 1000);
        assert_eq!(c.upstream.queue_timeout, Duration::from_secs(10));
        assert_eq!(c.upstream.retries, 1);
        assert_eq!(c.upstream.rate, None);
        assert_eq!(c.upstream.breaker, Breaker::default());
        assert_eq!(c.limits, Limits::default());
        let with = |extra: &str| {
            let text = MINIMAL.replace(
                "token_env = \"TOKEN\"",
                &format!("token_env = \"TOKEN\"\n{extra}"),
            );
            parse(&text)
        };
        let ok = with("rate = \"600/m\"\nmax_concurrency = 4\n[upstream.breaker]\nwindow = 5\nmin_exchanges = 5\n[regions.eu]\nbase_url = \"https://eu.example/v3\"\nrate = \"5/s\"\nmax_queue = 10\nqueue_timeout = \"2s\"\n[limits]\nteam_rate = \"50/s\"\nteam_burst = 100\n[teams]\nreports = { agents = [\"*\"], rate = \"100/s\", burst = 200, weight = 4 }\n[routing]\ndefault_region = \"eu\"\n").unwrap();
        assert_eq!(
            ok.upstream.rate.map(|r| r.to_string()),
            Some("600/m".into())
        );
        assert_eq!(ok.regions["eu"].queue_timeout, Some(Duration::from_secs(2)));
        assert_eq!(ok.teams.as_ref().unwrap()["reports"].weight, Some(4));
        for (extra, key) in [
            ("rate = \"10/h\"", "upstream.rate"),
            ("max_concurrency = 0", "upstream.max_concurrency"),
            ("queue_timeout = \"0s\"", "upstream.queue_timeout"),
            ("retries = 9", "upstream.retries"),
            (
                "[upstream.breaker]\nfailure_ratio = 0.0",
                "upstream.breaker.failure_ratio",
            ),
            (
                "[upstream.breaker]\nmin_exchanges = 30",
                "upstream.breaker.min_exchanges",
            ),
            ("[limits]\nteam_burst = 5", "limits.team_burst"),
            ("[limits]\nteam_rate = \"0/s\"", "limits.team_rate"),
            (
                "[teams]\na = { agents = [\"*\"], weight = 0 }",
                "teams.a.weight",
            ),
        ] {
            let e = with(extra).unwrap_err();
            assert_eq!(e.key, key, "{extra}: {e}");
        }
    }

    #[test]
    fn minimal_config_gets_production_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.server.listen.port(), 8080);
        assert_eq!(c.server.admin_listen.port(), 9090);
        assert_eq!(
            c.regions["eu"].base_url,
            "https://eu-gcp-api.vg-stuff.com/v3"
        );
        assert_eq!(
            c.regions["na"].base_url,
            "https://na-gcp-api.vg-stuff.com/v3"
        );
        assert_eq!(c.upstream.max_response_bytes, 32 << 20);
        assert_eq!(c.cache.max_bytes, 256 << 20);
        assert_eq!(c.cache.ttl, Duration::from_secs(300));
        assert_eq!(c.auth.leeway, Duration::from_secs(30));
        assert_eq!(c.routing.default_region, "eu");
        assert!(c.routing.discover);
    }

    #[test]
    fn compress_offers_the_contract_encodings_and_refuses_others() {
        use crate::compress::Coding;
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.cache.compress, [Coding::Zstd, Coding::Br, Coding::Gzip]);
        let with = |list: &str| parse(&format!("{MINIMAL}\n[cache]\ncompress = {list}\n"));
        assert!(with("[]").unwrap().cache.compress.is_empty());
        assert_eq!(
            with("[\"gzip\", \"zstd\"]").unwrap().cache.compress,
            [Coding::Gzip, Coding::Zstd]
        );
        let e = with("[\"deflate\"]").unwrap_err();
        assert!(e.key.starts_with("cache.compress"), "{e}");
        assert!(e.message.contains("deflate"), "{e}");
        let e = with("[\"br\", \"br\"]").unwrap_err();
        assert_eq!(e.key, "cache.compress");
        assert!(e.message.contains("twice"), "{e}");
        assert!(with("\"gzip\"").is_err(), "a list, not a string");
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let e = parse(&format!("{MINIMAL}\n[cache]\nmax_byte = 3\n")).unwrap_err();
        assert_eq!(e.file, "test.toml");
        assert_eq!(e.key, "cache.max_byte");
        assert!(e.message.contains("max_byte"), "{e}");
        let e = parse(&format!("{MINIMAL}\n[bogus]\n")).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn durations_and_sizes_parse() {
        let c = parse(&format!(
            "{MINIMAL}\n[cache]\nmax_bytes = \"64KiB\"\nttl = \"250ms\"\nstale_if_error = \"1h\"\n"
        ))
        .unwrap();
        assert_eq!(c.cache.max_bytes, 64 * 1024);
        assert_eq!(c.cache.ttl, Duration::from_millis(250));
        assert_eq!(c.cache.stale_if_error, Duration::from_secs(3600));
        let c = parse(&format!("{MINIMAL}\n[cache]\nmax_bytes = 1000\n")).unwrap();
        assert_eq!(c.cache.max_bytes, 1000);
        let e = parse(&format!("{MINIMAL}\n[cache]\nttl = \"soon\"\n")).unwrap_err();
        assert_eq!(e.key, "cache.ttl");
        let e = parse(&format!("{MINIMAL}\n[cache]\nmax_bytes = \"lots\"\n")).unwrap_err();
        assert_eq!(e.key, "cache.max_bytes");
    }

    #[test]
    fn cross_references_are_checked() {
        let e = parse(&format!(
            "{MINIMAL}\n[routing]\ndefault_region = \"mars\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "routing.default_region");
        let e = parse(&format!(
            "{MINIMAL}\n[routing.agents]\n\"a-1\" = \"mars\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "routing.agents.a-1");
        let e = parse(&format!("{MINIMAL}\n[routing.agents]\n\"a.1\" = \"eu\"\n")).unwrap_err();
        assert_eq!(e.key, "routing.agents.a.1");
    }

    #[test]
    fn token_source_is_required() {
        let e = parse("[[auth.keys]]\nalgorithm = \"HS256\"\nsecret_env = \"S\"\n").unwrap_err();
        assert_eq!(e.key, "upstream.token_env");
    }

    #[test]
    fn keys_need_exactly_one_source_and_an_algorithm() {
        let e = parse("[upstream]\ntoken_env = \"T\"\n").unwrap_err();
        assert_eq!(e.key, "auth.keys");
        let e = parse("[upstream]\ntoken_env = \"T\"\n[[auth.keys]]\nalgorithm = \"RS256\"\n")
            .unwrap_err();
        assert_eq!(e.key, "auth.keys[0]");
        let e = parse(
            "[upstream]\ntoken_env = \"T\"\n[[auth.keys]]\nsecret_env = \"S\"\nsecret_file = \"f\"\nalgorithm = \"HS256\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "auth.keys[0]");
        let e = parse("[upstream]\ntoken_env = \"T\"\n[[auth.keys]]\nsecret_env = \"S\"\n")
            .unwrap_err();
        assert_eq!(e.key, "auth.keys[0].algorithm");
    }

    #[test]
    fn windows_and_leeway_have_upper_bounds() {
        // Found by the property tests: these used to panic at start or on every token.
        for (extra, key) in [
            ("[auth]\nleeway = \"57y\"\n", "auth.leeway"),
            ("[cache]\nttl = \"1001y\"\n", "cache.ttl"),
            (
                "[cache]\nttl = \"18446744073709551615s\"\nstale_if_error = \"1s\"\n",
                "cache.ttl",
            ),
            (
                "[cache]\nstale_while_revalidate = \"1000y\"\n",
                "cache.stale_while_revalidate",
            ),
        ] {
            let e = parse(&format!("{MINIMAL}\n{extra}")).unwrap_err();
            assert_eq!(e.key, key, "{extra}");
        }
        assert!(parse(&format!(
            "{MINIMAL}\n[cache]\nttl = \"30d\"\nstale_if_error = \"365d\"\n"
        ))
        .is_ok());
    }

    #[test]
    fn relative_files_resolve_against_the_config_folder() {
        let c = Config::parse(MINIMAL, Path::new("/etc/gw/config.toml")).unwrap();
        assert_eq!(
            c.resolve(Path::new("keys/a.pem")),
            Path::new("/etc/gw/keys/a.pem")
        );
        assert_eq!(c.resolve(Path::new("/abs.pem")), Path::new("/abs.pem"));
    }

    #[test]
    fn an_empty_teams_table_sets_no_rules() {
        let c = parse(&format!("{MINIMAL}\n[teams]\n")).unwrap();
        assert!(c.teams.is_none());
        let c = parse(&format!(
            "{MINIMAL}\n[teams]\nbilling = {{ agents = [\"*\"] }}\n"
        ))
        .unwrap();
        assert_eq!(c.teams.unwrap().len(), 1);
    }

    #[test]
    fn errors_never_quote_the_source() {
        let e = parse(&format!(
            "{MINIMAL}\n[upstream2]\ntoken = \"s3cr3t-value\"\n"
        ))
        .unwrap_err();
        assert!(!e.to_string().contains("s3cr3t-value"), "{e}");
        assert!(e.message.contains("line"), "{e}");
        let e = parse("[upstream]\ntoken = \"s3cr3t-value\"\n").unwrap_err();
        assert_eq!(e.key, "upstream.token");
        assert!(!e.to_string().contains("s3cr3t-value"), "{e}");
        let e = parse("token = \"s3cr3t-value").unwrap_err();
        assert!(!e.to_string().contains("s3cr3t-value"), "{e}");
        // Pasted into a table of names, where serde's message would quote the value.
        for table in ["teams", "regions"] {
            let e =
                parse(&format!("{MINIMAL}\n[{table}]\ntoken = \"s3cr3t-value\"\n")).unwrap_err();
            assert!(!e.to_string().contains("s3cr3t-value"), "{e}");
            assert_eq!(e.key, format!("{table}.token"));
        }
    }
}
