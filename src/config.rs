//! The configuration file: serde structs that mirror `CONTRACT.md`, strict parsing (unknown keys
//! are errors) and one `validate()` whose errors name the key and the file.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A configuration problem: which file, which key, what is wrong. Exit status 2.
#[derive(Debug, thiserror::Error)]
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
    #[serde(default = "default_regions")]
    pub regions: BTreeMap<String, Region>,
    #[serde(default)]
    pub routing: Routing,
    #[serde(default)]
    pub auth: Auth,
    /// Absent: every authenticated team may export every agent.
    pub teams: Option<BTreeMap<String, Team>>,
    #[serde(default)]
    pub cache: Cache,
    #[serde(default)]
    pub log: Log,
    /// The file this was read from; relative `*_file` paths resolve against its folder.
    #[serde(skip)]
    pub path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    pub tls: Option<Tls>,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            shutdown_grace: Duration::from_secs(30),
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Upstream {
    pub token_env: Option<String>,
    pub token_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(deserialize_with = "size")]
    pub max_response_bytes: u64,
    pub ca_file: Option<PathBuf>,
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            token_env: None,
            token_file: None,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(30),
            max_response_bytes: 32 << 20,
            ca_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub base_url: String,
    pub token_env: Option<String>,
    pub token_file: Option<PathBuf>,
}

fn default_regions() -> BTreeMap<String, Region> {
    let region = |url: &str| Region {
        base_url: url.to_string(),
        token_env: None,
        token_file: None,
    };
    BTreeMap::from([
        (
            "eu".to_string(),
            region("https://eu-gcp-api.vg-stuff.com/v3"),
        ),
        (
            "na".to_string(),
            region("https://na-gcp-api.vg-stuff.com/v3"),
        ),
    ])
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Routing {
    pub default_region: String,
    pub discover: bool,
    pub agents: BTreeMap<String, String>,
}

impl Default for Routing {
    fn default() -> Self {
        Routing {
            default_region: "eu".to_string(),
            discover: true,
            agents: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    pub issuers: Vec<String>,
    pub audiences: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    pub team_claim: String,
    pub keys: Vec<Key>,
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            issuers: Vec::new(),
            audiences: Vec::new(),
            leeway: Duration::from_secs(30),
            team_claim: "team".to_string(),
            keys: Vec::new(),
        }
    }
}

/// One `[[auth.keys]]` entry: exactly one source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Key {
    pub kid: Option<String>,
    pub algorithm: Option<String>,
    pub public_key_file: Option<PathBuf>,
    pub secret_env: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub jwks_file: Option<PathBuf>,
    pub jwks_url: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub refresh: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub max_stale: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Team {
    /// Agent ids this team may export; `"*"` stands for every agent.
    pub agents: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cache {
    pub enabled: bool,
    #[serde(deserialize_with = "size")]
    pub max_bytes: u64,
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub stale_if_error: Duration,
    #[serde(with = "humantime_serde")]
    pub stale_while_revalidate: Duration,
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            enabled: true,
            max_bytes: 256 << 20,
            ttl: Duration::from_secs(300),
            stale_if_error: Duration::from_secs(3600),
            stale_while_revalidate: Duration::ZERO,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    pub format: LogFormat,
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            format: LogFormat::Json,
            level: "info".to_string(),
        }
    }
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

/// Ids of agents and conversations: 1 to 128 characters of `A-Z a-z 0-9 _ -`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
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

    fn err(&self, key: impl Into<String>, message: impl fmt::Display) -> ConfigError {
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

    /// Checks what serde cannot: cross-references, ranges, exactly-one-of sources.
    /// Files and environment variables are read later, by the parts that use them.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.server.listen == self.server.admin_listen && self.server.listen.port() != 0 {
            return Err(self.err("server.admin_listen", "must differ from server.listen"));
        }
        if self.upstream.connect_timeout.is_zero() {
            return Err(self.err("upstream.connect_timeout", "must be greater than 0"));
        }
        if self.upstream.request_timeout.is_zero() {
            return Err(self.err("upstream.request_timeout", "must be greater than 0"));
        }
        if self.upstream.max_response_bytes == 0 {
            return Err(self.err("upstream.max_response_bytes", "must be greater than 0"));
        }
        if self.upstream.token_env.is_some() && self.upstream.token_file.is_some() {
            return Err(self.err(
                "upstream.token_env",
                "set token_env or token_file, not both",
            ));
        }
        if self.regions.is_empty() {
            return Err(self.err("regions", "at least one region is required"));
        }
        let shared_token = self.upstream.token_env.is_some() || self.upstream.token_file.is_some();
        for (name, region) in &self.regions {
            let key = format!("regions.{name}");
            if name.is_empty()
                || name.len() > 32
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(self.err(key, "region names are 1 to 32 characters of a-z 0-9 -"));
            }
            check_base_url(&region.base_url).map_err(|m| self.err(format!("{key}.base_url"), m))?;
            if region.token_env.is_some() && region.token_file.is_some() {
                return Err(self.err(
                    format!("{key}.token_env"),
                    "set token_env or token_file, not both",
                ));
            }
            if !shared_token && region.token_env.is_none() && region.token_file.is_none() {
                return Err(self.err(
                    "upstream.token_env",
                    format!(
                        "no Convocore token source: set upstream.token_env or upstream.token_file \
                         (or a token source on region {name})"
                    ),
                ));
            }
        }
        if !self.regions.contains_key(&self.routing.default_region) {
            return Err(self.err(
                "routing.default_region",
                format!("no region named {:?}", self.routing.default_region),
            ));
        }
        for (agent, region) in &self.routing.agents {
            if !valid_id(agent) {
                return Err(self.err(
                    format!("routing.agents.{agent}"),
                    "agent ids are 1 to 128 characters of A-Z a-z 0-9 _ -",
                ));
            }
            if !self.regions.contains_key(region) {
                return Err(self.err(
                    format!("routing.agents.{agent}"),
                    format!("no region named {region:?}"),
                ));
            }
        }
        if self.auth.team_claim.is_empty() {
            return Err(self.err("auth.team_claim", "must not be empty"));
        }
        if self.auth.keys.is_empty() {
            return Err(self.err(
                "auth.keys",
                "at least one [[auth.keys]] entry is required to verify team JWTs",
            ));
        }
        for (i, key) in self.auth.keys.iter().enumerate() {
            let at = format!("auth.keys[{i}]");
            let sources = [
                key.public_key_file.is_some(),
                key.secret_env.is_some(),
                key.secret_file.is_some(),
                key.jwks_file.is_some(),
                key.jwks_url.is_some(),
            ];
            match sources.iter().filter(|s| **s).count() {
                1 => {}
                0 => {
                    return Err(self.err(
                        at,
                        "needs one key source: public_key_file, secret_env, secret_file, \
                         jwks_file or jwks_url",
                    ))
                }
                _ => return Err(self.err(at, "set exactly one key source per [[auth.keys]] entry")),
            }
            let jwks = key.jwks_file.is_some() || key.jwks_url.is_some();
            if !jwks && key.algorithm.is_none() {
                return Err(self.err(
                    format!("{at}.algorithm"),
                    "required for public_key_file, secret_env and secret_file keys",
                ));
            }
            if key.jwks_url.is_none() && (key.refresh.is_some() || key.max_stale.is_some()) {
                return Err(self.err(
                    format!("{at}.refresh"),
                    "refresh and max_stale apply to jwks_url keys only",
                ));
            }
            if jwks && key.kid.is_some() {
                return Err(self.err(
                    format!("{at}.kid"),
                    "a JWKS names its own kids; kid applies to single keys only",
                ));
            }
            if let Some(url) = &key.jwks_url {
                check_jwks_url(url).map_err(|m| self.err(format!("{at}.jwks_url"), m))?;
            }
            if key.refresh.is_some_and(|r| r.is_zero()) {
                return Err(self.err(format!("{at}.refresh"), "must be greater than 0"));
            }
            if key.max_stale.is_some_and(|r| r.is_zero()) {
                return Err(self.err(format!("{at}.max_stale"), "must be greater than 0"));
            }
        }
        if let Some(teams) = &self.teams {
            for (team, rule) in teams {
                for agent in &rule.agents {
                    if agent != "*" && !valid_id(agent) {
                        return Err(self.err(
                            format!("teams.{team}.agents"),
                            format!("{agent:?} is neither \"*\" nor a valid agent id"),
                        ));
                    }
                }
            }
        }
        if self.cache.enabled && self.cache.max_bytes == 0 {
            return Err(self.err("cache.max_bytes", "must be greater than 0"));
        }
        if self.cache.enabled && self.cache.ttl.is_zero() {
            return Err(self.err("cache.ttl", "must be greater than 0"));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(self.err(
                "log.level",
                format!("{:?} is not a level or filter directive", self.log.level),
            ));
        }
        Ok(())
    }
}

fn check_base_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("https") | Some("http") => {}
        _ => return Err(format!("{url:?} must start with https:// or http://")),
    }
    if uri.host().is_none() {
        return Err(format!("{url:?} has no host"));
    }
    if uri.query().is_some() {
        return Err(format!("{url:?} must not have a query"));
    }
    Ok(())
}

/// JWKS URLs are HTTPS; plain HTTP only on loopback (a local sidecar IdP, tests).
fn check_jwks_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let host = uri.host().ok_or_else(|| format!("{url:?} has no host"))?;
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if host == "localhost" || host == "127.0.0.1" || host == "[::1]" => Ok(()),
        _ => Err(format!("{url:?} must be an https:// URL")),
    }
}

/// toml's `Display` quotes the offending source line, which may hold a secret pasted under a
/// wrong key; say only what is wrong and where.
fn toml_message(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().replace('\n', " ");
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

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn ids() {
        assert!(valid_id("agent-123_X"));
        assert!(valid_id(&"a".repeat(128)));
        assert!(!valid_id(&"a".repeat(129)));
        assert!(!valid_id(""));
        assert!(!valid_id("a.b"));
        assert!(!valid_id("a%2Fb"));
        assert!(!valid_id("é"));
    }
}
