#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Property-based fuzzing (issue 12, item 10) on the stable toolchain, with proptest: the route
//! parser, the config loader, the JWT header and claims checks, and the `Cache-Control` parser,
//! each through the crate's public API. Every property's inputs are seeded from the other
//! tests' inputs (the bad paths of `src/http/route.rs`, the broken files of `tests/cli.rs`'s
//! table and `src/config.rs`, the tokens of `tests/auth.rs`, ...) next to generated values, and
//! the seeds also run one by one in a plain test, so each of them is checked on every run.
//!
//! Bounded for `cargo test`: 256 cases per property (proptest's default), or `PROPTEST_CASES`
//! for a longer run (`PROPTEST_CASES=20000 cargo test --test fuzz`). A failure prints the
//! shrunk input. Failures are not persisted: proptest's default would write a
//! `tests/fuzz.proptest-regressions` file into the work tree, during CI too, where nothing
//! reads it back; a shrunk failure is added to the property's seed list instead, where it is
//! reviewed and runs on every run.
//!
//! Accept-Encoding and conditional request headers have no parser yet: see the section left
//! for them at the end.

mod common;
use common::{
    claims, fixture, fixture_bytes, mint, now, TestConfig, AUDIENCE, DEFAULT_KEYS, ISSUER,
    UPSTREAM_TOKEN,
};

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use aws_lc_rs::hmac;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use convocore_gateway::cache::Mode;
use convocore_gateway::domain::{Export, Format};
use convocore_gateway::error::{ApiError, VerifyError};
use convocore_gateway::http::route;
use convocore_gateway::{Config, ConfigError, State};
use http::header::{AUTHORIZATION, CACHE_CONTROL};
use http::{HeaderMap, HeaderValue, Method, Uri};
use http_body_util::BodyExt;
use jsonwebtoken::Algorithm;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::TestCaseError;

/// Every property's runner: proptest's defaults (256 cases, or `PROPTEST_CASES`) without
/// failure persistence. `ProptestConfig::with_cases` is not used: it would override the
/// environment variable.
fn runner() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Runs `check` on every seed (a plain test's body), naming the seed that fails.
fn each_seed<T: std::fmt::Debug>(
    seeds: impl IntoIterator<Item = T>,
    check: impl Fn(&T) -> Result<(), TestCaseError>,
) {
    for seed in seeds {
        if let Err(e) = check(&seed) {
            panic!("seed {seed:?}: {e}");
        }
    }
}

fn fail(message: impl Into<String>) -> TestCaseError {
    TestCaseError::fail(message.into())
}

// =============================================================================================
// The route parser: `route::parse(&Method, &Uri)`
// =============================================================================================

/// `src/http/route.rs`'s tests: targets that are 400 for a GET.
const ROUTE_BAD_REQUESTS: &[&str] = &[
    "/v3/agents/a.b/convos/c/export",
    "/v3/agents/a%2Fb/convos/c/export",
    "/v3/agents/../convos/c/export",
    "/v3/agents/a/b/convos/c/export",
    "/v3/agents/a/convos/c%C3%A9/export",
    "/v3/agents//convos/c/export",
    "/v3/agents/a/convos/c/export?format=xml",
    "/v3/agents/a/convos/c/export?format=JSON",
    "/v3/agents/a/convos/c/export?format=",
    "/v3/agents/a/convos/c/export?format=json&x=1",
    "/v3/agents/a/convos/c/export?format=json&format=csv",
    "/v3/agents/a/convos/c/export?x=1",
    "/v3/agents/a/convos/c/export?format=%6Ason",
];

/// `src/http/route.rs`'s tests: targets that are 404.
const ROUTE_NOT_FOUND: &[&str] = &[
    "/",
    "/v3/agents/a/convos/c",
    "/v3/agents/a/convos/c/export/",
    "/v3/agents/a/export",
    "/v2/agents/a/convos/c/export",
];

/// `src/http/route.rs`'s tests (and the harness's `EXPORT_EU`): targets that parse.
const ROUTE_OK: &[&str] = &[
    "/v3/agents/agent-1/convos/c_2/export",
    "/v3/agents/a/convos/c/export?format=csv",
    "/v3/agents/a/convos/c/export?format=json",
    "/v3/agents/a/convos/c/export?",
    common::EXPORT_EU,
];

fn route_seeds() -> Vec<String> {
    let long = "a".repeat(129);
    let max = "a".repeat(128);
    let mut seeds: Vec<String> = [ROUTE_BAD_REQUESTS, ROUTE_NOT_FOUND, ROUTE_OK]
        .concat()
        .iter()
        .map(|s| s.to_string())
        .collect();
    seeds.push(format!("/v3/agents/{long}/convos/c/export"));
    seeds.push(format!("/v3/agents/a/convos/{long}/export"));
    seeds.push(format!("/v3/agents/{max}/convos/{max}/export"));
    seeds.push(format!("http://gw.example/v3/agents/{max}/convos/c/export"));
    seeds
}

/// The contract's id: 1 to 128 characters of A-Z a-z 0-9 _ -.
fn is_id(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether a path has the route's shape (`/v3/agents/…/convos/…/export`), whatever the ids.
fn route_shaped(path: &str) -> bool {
    path.strip_prefix("/v3/agents/")
        .and_then(|rest| rest.strip_suffix("/export"))
        .is_some_and(|ids| ids.contains("/convos/"))
}

/// Any method, any target: no panic, and only an outcome the contract allows for it.
fn check_route(method: &Method, target: &str) -> Result<(), TestCaseError> {
    // What does not parse as a request target never reaches the router (hyper answers 400).
    let Ok(uri) = target.parse::<Uri>() else {
        return Ok(());
    };
    let path = uri.path();
    let result = route::parse(method, &uri);
    match &result {
        Ok(export) => {
            prop_assert!(
                method == Method::GET || method == Method::HEAD,
                "{}",
                method
            );
            prop_assert!(is_id(&export.agent) && is_id(&export.convo), "{:?}", export);
            prop_assert_eq!(
                path,
                format!("/v3/agents/{}/convos/{}/export", export.agent, export.convo)
            );
            let format = match uri.query() {
                None | Some("") | Some("format=json") => Format::Json,
                Some("format=csv") => Format::Csv,
                Some(q) => return Err(fail(format!("the query {q:?} was accepted"))),
            };
            prop_assert_eq!(export.format, format);
        }
        Err(ApiError::NotFound) => prop_assert!(!route_shaped(path), "404 for {}", path),
        Err(ApiError::MethodNotSupported(allow)) => {
            prop_assert!(route_shaped(path), "405 for {}", path);
            prop_assert!(
                method != Method::GET && method != Method::HEAD,
                "{}",
                method
            );
            prop_assert_eq!(*allow, "GET, HEAD");
        }
        Err(ApiError::BadRequest(_)) => {
            prop_assert!(route_shaped(path), "400 for {}", path);
            prop_assert!(
                method == Method::GET || method == Method::HEAD,
                "{}",
                method
            );
        }
        Err(other) => return Err(fail(format!("unexpected {other:?}"))),
    }
    if let Err(e) = result {
        let status = e.status();
        prop_assert_eq!(e.into_response().status(), status);
    }
    Ok(())
}

/// Standard methods, and extension methods (`get` is one: methods are case-sensitive).
fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        3 => Just(Method::GET),
        2 => select(vec![
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::HEAD,
            Method::PATCH,
            Method::OPTIONS,
            Method::CONNECT,
            Method::TRACE,
        ]),
        1 => "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}"
            .prop_map(|m| Method::from_bytes(m.as_bytes()).unwrap()),
    ]
}

fn non_get() -> impl Strategy<Value = Method> {
    method().prop_filter("not GET or HEAD", |m| {
        *m != Method::GET && *m != Method::HEAD
    })
}

fn valid_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,128}"
}

/// A character or escape that no id may hold.
fn bad_fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        select(vec![
            ".", "..", "/", "//", "%2F", "%2f", "%2E", "%41", "%5F", "%", "%%", "%C3%A9", "~", "!",
            "*", "'", "(", ")", ":", "@", "&", "=", "+", "$", ",", ";", "/convos/", "/export",
            "/export/", "?", "#", "\\", "é", " ", "\t", "\0", "\u{202e}",
        ])
        .prop_map(String::from),
        any::<char>()
            .prop_filter("outside the id set", |c| !(c.is_ascii_alphanumeric()
                || *c == '_'
                || *c == '-'))
            .prop_map(String::from),
    ]
}

/// Ids outside the contract: a bad character among good ones, empty, or too long.
fn bad_id() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => ("[A-Za-z0-9_-]{0,16}", bad_fragment(), "[A-Za-z0-9_-]{0,16}")
            .prop_map(|(a, b, c)| format!("{a}{b}{c}")),
        1 => Just(String::new()),
        1 => "[A-Za-z0-9_-]{129,300}",
    ]
}

/// `(query part of the target, the format it means)` for the accepted queries.
fn good_query() -> impl Strategy<Value = (&'static str, Format)> {
    select(vec![
        ("", Format::Json),
        ("?", Format::Json),
        ("?format=json", Format::Json),
        ("?format=csv", Format::Csv),
    ])
}

/// Any query part: the accepted ones, near misses, and noise.
fn any_query() -> impl Strategy<Value = String> {
    prop_oneof![
        good_query().prop_map(|(q, _)| q.to_string()),
        select(vec![
            "?format=xml",
            "?format=JSON",
            "?format=",
            "?format",
            "?format=json&",
            "?&format=json",
            "?format=json&x=1",
            "?format=json&format=csv",
            "?x=1",
            "?format=%6Ason",
            "?format=json;csv",
            "?format=csv#frag",
            "?format=json?format=csv",
            "??",
        ])
        .prop_map(String::from),
        "\\?[A-Za-z0-9=&%;+.,_~-]{0,24}",
    ]
}

fn route_target() -> impl Strategy<Value = String> {
    let segment = || {
        prop_oneof![
            3 => valid_id(),
            2 => bad_id(),
            1 => "[A-Za-z0-9_.~%/:@!$&'()*+,;=-]{0,24}",
        ]
    };
    prop_oneof![
        1 => select(route_seeds()),
        2 => "\\PC{0,64}",
        1 => any::<String>(),
        4 => (segment(), segment(), any_query())
            .prop_map(|(a, c, q)| format!("/v3/agents/{a}/convos/{c}/export{q}")),
        2 => (
            select(vec!["/v3/agents/", "/v3/agents", "/V3/agents/", "/v3//agents/", "//v3/agents/", ""]),
            segment(),
            select(vec!["/convos/", "/convos", "/CONVOS/", "/convos//", "/", ""]),
            segment(),
            select(vec!["/export", "/export/", "/Export", "/exports", "", "/export/x"]),
            any_query(),
        )
            .prop_map(|(p, a, m, c, s, q)| format!("{p}{a}{m}{c}{s}{q}")),
        1 => (valid_id(), valid_id(), any_query())
            .prop_map(|(a, c, q)| format!("http://gw.example:8080/v3/agents/{a}/convos/{c}/export{q}")),
    ]
}

#[test]
fn route_seeds_hold() {
    let methods = [Method::GET, Method::POST, Method::HEAD];
    each_seed(route_seeds(), |target| {
        for m in &methods {
            check_route(m, target)?;
        }
        Ok(())
    });
    // And what the unit tests say of them: 400, 404 and 200 as listed.
    for target in ROUTE_BAD_REQUESTS {
        let r = route::parse(&Method::GET, &target.parse().unwrap());
        assert!(matches!(r, Err(ApiError::BadRequest(_))), "{target}: {r:?}");
    }
    for target in ROUTE_NOT_FOUND {
        let r = route::parse(&Method::GET, &target.parse().unwrap());
        assert!(matches!(r, Err(ApiError::NotFound)), "{target}: {r:?}");
    }
    for target in ROUTE_OK {
        let r = route::parse(&Method::GET, &target.parse().unwrap());
        assert!(r.is_ok(), "{target}: {r:?}");
    }
}

proptest! {
    #![proptest_config(runner())]

    /// Arbitrary method and target: never a panic, only an outcome the contract allows.
    #[test]
    fn route_never_panics(method in method(), target in route_target()) {
        check_route(&method, &target)?;
    }

    /// A path of valid ids and an accepted query parses to exactly those ids and format.
    #[test]
    fn route_valid_ids_parse_exactly(
        agent in valid_id(),
        convo in valid_id(),
        (query, format) in good_query(),
    ) {
        let target = format!("/v3/agents/{agent}/convos/{convo}/export{query}");
        let export = route::parse(&Method::GET, &target.parse().unwrap())
            .map_err(|e| fail(format!("{target}: {e:?}")))?;
        prop_assert_eq!(export, Export { agent, convo, format });
    }

    /// An id holding anything outside A-Z a-z 0-9 _ - (or empty, or too long) is 400 or 404,
    /// never parsed.
    #[test]
    fn route_bad_ids_are_refused(
        bad_is_agent in any::<bool>(),
        bad in bad_id(),
        good in valid_id(),
        query in any_query(),
    ) {
        let (agent, convo) = if bad_is_agent { (&bad, &good) } else { (&good, &bad) };
        let target = format!("/v3/agents/{agent}/convos/{convo}/export{query}");
        if let Ok(uri) = target.parse::<Uri>() {
            let r = route::parse(&Method::GET, &uri);
            prop_assert!(
                matches!(r, Err(ApiError::BadRequest(_)) | Err(ApiError::NotFound)),
                "{}: {:?}", target, r
            );
        }
    }

    /// Any other method on the route's path is 405 with `Allow: GET, HEAD`, whatever the query.
    #[test]
    fn route_other_methods_are_405(
        method in non_get(),
        agent in valid_id(),
        convo in valid_id(),
        query in any_query(),
    ) {
        let target = format!("/v3/agents/{agent}/convos/{convo}/export{query}");
        if let Ok(uri) = target.parse::<Uri>() {
            let r = route::parse(&method, &uri);
            prop_assert!(matches!(r, Err(ApiError::MethodNotSupported("GET, HEAD"))), "{} {}: {:?}", method, target, r);
        }
    }

    /// On valid ids, the only queries are none, empty, `format=json` and `format=csv`; any other
    /// is 400.
    #[test]
    fn route_query_is_strict(agent in valid_id(), convo in valid_id(), query in any_query()) {
        let target = format!("/v3/agents/{agent}/convos/{convo}/export{query}");
        if let Ok(uri) = target.parse::<Uri>() {
            let accepted = matches!(uri.query(), None | Some("") | Some("format=json") | Some("format=csv"));
            let r = route::parse(&Method::GET, &uri);
            if accepted {
                prop_assert!(r.is_ok(), "{}: {:?}", target, r);
            } else {
                prop_assert!(matches!(r, Err(ApiError::BadRequest(_))), "{}: {:?}", target, r);
            }
        }
    }
}

// =============================================================================================
// The config loader: `Config::parse(text, path)` (and, for a file it accepts, `State::build`,
// which `check-config` and start-up run next)
// =============================================================================================

/// The file name every parsed text claims to come from; errors must name it.
const CONFIG_FILE: &str = "/etc/convocore-gateway/fuzz-config.toml";

/// `src/config.rs`'s tests' minimal valid file.
const MINIMAL: &str = r#"
[upstream]
token_env = "TOKEN"
[[auth.keys]]
algorithm = "HS256"
secret_env = "SECRET"
"#;

/// The harness's config rendered against unreachable regions (nothing here connects).
fn harness_config(config: &TestConfig, token_file: &Path) -> String {
    config.render("http://127.0.0.1:9/v3", "http://127.0.0.1:9/v3", token_file)
}

/// Valid files: the shipped `config.toml`, the harness's rendered config, the minimal one.
fn valid_configs() -> Vec<String> {
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml")).unwrap();
    vec![
        shipped,
        harness_config(
            &TestConfig::default(),
            Path::new("/run/secrets/convocore-token"),
        ),
        MINIMAL.to_string(),
    ]
}

/// Broken files: `tests/cli.rs`'s table of config errors (as text edits of the harness's
/// config) and `src/config.rs`'s tests. Only those `Config::parse` refuses: unreadable or
/// unset key and token sources are `State::build`'s errors, and `tests/cli.rs` checks them.
fn broken_configs() -> Vec<String> {
    let token = Path::new("/run/secrets/convocore-token");
    let with = |edit: &dyn Fn(&mut TestConfig)| {
        let mut c = TestConfig::default();
        edit(&mut c);
        harness_config(&c, token)
    };
    let valid = harness_config(&TestConfig::default(), token);
    vec![
        with(&|c| c.cache = "max_byte = 1\n".into()),
        with(&|c| c.cache = "ttl = \"soon\"\n".into()),
        with(&|c| c.cache = "max_bytes = \"lots\"\n".into()),
        with(&|c| {
            c.upstream
                .push_str("max_response_bytes = \"32 parsecs\"\n")
        }),
        valid.replace(&format!("token_file = \"{}\"", token.display()), ""),
        with(&|c| c.routing = "default_region = \"mars\"\n".into()),
        with(&|c| {
            c.upstream
                .push_str("token = \"misplaced-upstream-token-value-0123456789\"\n")
        }),
        with(&|c| c.keys = "[[auth.keys]]\nkid = \"x\"\nalgorithm = \"RS256\"\n".into()),
        with(&|c| c.keys = String::new()),
        format!("{MINIMAL}\n[cache]\nmax_byte = 3\n"),
        format!("{MINIMAL}\n[bogus]\n"),
        format!("{MINIMAL}\n[cache]\nttl = \"soon\"\n"),
        format!("{MINIMAL}\n[routing]\ndefault_region = \"mars\"\n"),
        format!("{MINIMAL}\n[routing.agents]\n\"a-1\" = \"mars\"\n"),
        format!("{MINIMAL}\n[routing.agents]\n\"a.1\" = \"eu\"\n"),
        format!("{MINIMAL}\n[upstream2]\ntoken = \"s3cr3t-value\"\n"),
        "[upstream]\ntoken = \"s3cr3t-value\"\n".into(),
        "token = \"s3cr3t-value".into(),
        "[[auth.keys]]\nalgorithm = \"HS256\"\nsecret_env = \"S\"\n".into(),
        "[upstream]\ntoken_env = \"T\"\n[[auth.keys]]\nsecret_env = \"S\"\nsecret_file = \"f\"\nalgorithm = \"HS256\"\n".into(),
        String::new(),
    ]
}

/// Every outcome of `Config::parse`: no panic; an error names this file and a key, and
/// prints as `file: key: message`.
fn check_config(text: &str) -> Result<Option<Config>, TestCaseError> {
    match Config::parse(text, Path::new(CONFIG_FILE)) {
        Ok(config) => Ok(Some(config)),
        Err(e) => {
            check_config_error(&e)?;
            Ok(None)
        }
    }
}

fn check_config_error(e: &ConfigError) -> Result<(), TestCaseError> {
    prop_assert_eq!(e.file.as_str(), CONFIG_FILE, "{}", e);
    prop_assert!(!e.key.trim().is_empty(), "no key: {}", e);
    prop_assert!(!e.message.trim().is_empty(), "no message: {}", e);
    // A key of `-` is the file as a whole, for an error TOML itself finds: it then says where.
    if e.key == "-" {
        prop_assert!(e.message.contains("(line "), "no key and no line: {}", e);
    }
    prop_assert!(
        e.to_string()
            .starts_with(&format!("{CONFIG_FILE}: {}: ", e.key)),
        "{}",
        e
    );
    Ok(())
}

/// One edit of a config text.
#[derive(Debug, Clone)]
enum Edit {
    Delete {
        at: Index,
        len: usize,
    },
    Insert {
        at: Index,
        text: String,
    },
    Truncate(Index),
    DropLine(Index),
    DuplicateLine(Index),
    SwapLines(Index, Index),
    /// On a `key = value` line, replaces the value.
    SetValue {
        line: Index,
        value: String,
    },
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut text = text.to_string();
    for edit in edits {
        match edit {
            Edit::Delete { at, len } => {
                let chars: Vec<char> = text.chars().collect();
                let start = at.index(chars.len() + 1);
                let end = (start + len).min(chars.len());
                text = chars[..start].iter().chain(&chars[end..]).collect();
            }
            Edit::Insert { at, text: insert } => {
                let chars: Vec<char> = text.chars().collect();
                let at = at.index(chars.len() + 1);
                text = chars[..at]
                    .iter()
                    .copied()
                    .chain(insert.chars())
                    .chain(chars[at..].iter().copied())
                    .collect();
            }
            Edit::Truncate(at) => {
                let chars: Vec<char> = text.chars().collect();
                text = chars[..at.index(chars.len() + 1)].iter().collect();
            }
            Edit::DropLine(i) | Edit::DuplicateLine(i) | Edit::SetValue { line: i, .. } => {
                let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
                if lines.is_empty() {
                    continue;
                }
                let i = i.index(lines.len());
                match edit {
                    Edit::DropLine(_) => {
                        lines.remove(i);
                    }
                    Edit::DuplicateLine(_) => {
                        let line = lines[i].clone();
                        lines.insert(i, line);
                    }
                    Edit::SetValue { value, .. } => {
                        if let Some((key, _)) = lines[i].split_once('=') {
                            lines[i] = format!("{key}= {value}");
                        }
                    }
                    _ => unreachable!(),
                }
                text = lines.join("\n");
            }
            Edit::SwapLines(a, b) => {
                let mut lines: Vec<&str> = text.lines().collect();
                if lines.is_empty() {
                    continue;
                }
                let (a, b) = (a.index(lines.len()), b.index(lines.len()));
                lines.swap(a, b);
                text = lines.join("\n");
            }
        }
    }
    text
}

/// Units humantime knows, and some it does not.
const DURATION_UNITS: &[&str] = &[
    "ns",
    "us",
    "ms",
    "s",
    "sec",
    "m",
    "min",
    "h",
    "d",
    "w",
    "M",
    "y",
    "years",
    "",
    "fortnight",
];
const SIZE_UNITS: &[&str] = &[
    "", "B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "kB", "GB", "parsecs",
];

/// TOML values for a duration key, most of them strings humantime may or may not take.
fn duration_value() -> impl Strategy<Value = String> {
    prop_oneof![
        select(vec![
            "\"0s\"",
            "\"1ns\"",
            "\"30s\"",
            "\"1000y\"",
            "\"1001y\"",
            "\"584942417355y\"",
            "\"18446744073709551615s\"",
            "\"1h 30m\"",
            "\"soon\"",
            "\"\"",
            "\" 5s \"",
            "\"-1s\"",
            "0",
            "30",
            "-1",
            "1.5",
            "true",
            "[]",
            "{}",
            "\"5 s\"",
            "\"1e3s\"",
        ])
        .prop_map(String::from),
        (any::<u64>(), select(DURATION_UNITS)).prop_map(|(n, u)| format!("\"{n}{u}\"")),
        (0u64..5000, select(DURATION_UNITS)).prop_map(|(n, u)| format!("\"{n}{u}\"")),
    ]
}

/// TOML values for a size key.
fn size_value() -> impl Strategy<Value = String> {
    prop_oneof![
        select(vec![
            "\"64KiB\"",
            "\"0\"",
            "0",
            "1",
            "-1",
            "1e300",
            "\"16EiB\"",
            "\"17EiB\"",
            "\"18446744073709551615\"",
            "\"18446744073709551616\"",
            "\"1 YiB\"",
            "\"lots\"",
            "\"\"",
            "true",
            "[1]",
            "18446744073709551615",
            "9223372036854775807",
        ])
        .prop_map(String::from),
        any::<u64>().prop_map(|n| n.to_string()),
        (any::<u64>(), select(SIZE_UNITS)).prop_map(|(n, u)| format!("\"{n}{u}\"")),
        (0u64..5000, select(SIZE_UNITS)).prop_map(|(n, u)| format!("\"{n} {u}\"")),
    ]
}

/// Any TOML value, and things that are not one.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => select(vec![
            "1", "-1", "0", "1e300", "nan", "inf", "-inf", "0x10", "1_000", "\"x\"", "\"\"", "''",
            "[]", "[1, \"a\"]", "{}", "{ a = 1 }", "true", "false", "1979-05-27T07:32:00Z",
            "07:32:00", "\"127.0.0.1:99999\"", "\"[::1]:0\"", "\"0.0.0.0:8080\"",
            "\"https://eu.example/v3\"", "\"http://\"", "\"file:///etc/passwd\"", "\"*\"",
            "[\"*\"]", "\"JSON\"", "\"trace\"", "\"debug,hyper=off\"", "\"json\"", "\"text\"",
            "\"RS256\"", "\"none\"", "\"HS1\"", "\"\\u0000\"", "\"\\ud800\"", "'''\nx\n'''",
            "\"\"\"\n\"\"\"", "[[1]]", "{ agents = [\"*\"] }", "{ agents = [] }",
        ])
        .prop_map(String::from),
        1 => duration_value(),
        1 => size_value(),
        1 => "\"\\PC{0,16}\"",
        1 => "\\PC{0,16}",
    ]
}

fn config_edit() -> impl Strategy<Value = Edit> {
    let insert = prop_oneof![
        select(vec![
            "[",
            "]",
            "[[",
            "]]",
            "=",
            "\"",
            "'",
            "\n",
            "#",
            "\\",
            "\"\"\"",
            "{",
            "}",
            ",",
            ".",
            "\0",
            "é",
            "\u{feff}",
            "\r",
            "\r\n",
            "\t",
            "[teams]\n",
            "[teams]\nbilling = { agents = [\"*\"] }\n",
            "[cache]\n",
            "[[auth.keys]]\n",
            "[server.tls]\n",
            "[regions.mars]\n",
            "[log]\nlevel = \"x\"\n",
            "\n[routing.agents]\n\"a\" = \"mars\"\n",
            "\nx = 1\n",
            "\n[upstream]\n",
            "a.b.c = 1\n",
        ])
        .prop_map(String::from),
        "\\PC{0,12}",
        any::<String>(),
    ];
    prop_oneof![
        1 => (any::<Index>(), 0usize..40).prop_map(|(at, len)| Edit::Delete { at, len }),
        2 => (any::<Index>(), insert).prop_map(|(at, text)| Edit::Insert { at, text }),
        1 => any::<Index>().prop_map(Edit::Truncate),
        1 => any::<Index>().prop_map(Edit::DropLine),
        1 => any::<Index>().prop_map(Edit::DuplicateLine),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Edit::SwapLines(a, b)),
        3 => (any::<Index>(), toml_value()).prop_map(|(line, value)| Edit::SetValue { line, value }),
    ]
}

/// Lines that look like TOML, mostly.
fn tomlish_text() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        select(vec![
            "listen",
            "admin_listen",
            "token_env",
            "token_file",
            "base_url",
            "default_region",
            "discover",
            "issuers",
            "audiences",
            "leeway",
            "team_claim",
            "kid",
            "algorithm",
            "public_key_file",
            "secret_env",
            "jwks_url",
            "refresh",
            "max_stale",
            "enabled",
            "max_bytes",
            "ttl",
            "level",
            "format",
            "agents",
            "\"a-1\"",
            "\"\"",
            "a.b",
        ])
        .prop_map(String::from),
        "[a-z_]{1,10}",
    ];
    let header = select(vec![
        "[server]",
        "[server.tls]",
        "[upstream]",
        "[regions.eu]",
        "[regions.x]",
        "[regions]",
        "[routing]",
        "[routing.agents]",
        "[auth]",
        "[[auth.keys]]",
        "[auth.keys]",
        "[teams]",
        "[teams.billing]",
        "[cache]",
        "[log]",
        "[[cache]]",
        "[]",
        "[a.b.c]",
    ])
    .prop_map(String::from);
    let line = prop_oneof![
        2 => header,
        5 => (key, toml_value()).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => "\\PC{0,20}",
    ];
    proptest::collection::vec(line, 0..16).prop_map(|lines| lines.join("\n"))
}

/// Keys that exist in no table of the config, under which an operator might paste a secret.
const UNKNOWN_KEYS: &[&str] = &[
    "token",
    "secret",
    "password",
    "api_key",
    "client_secret",
    "bearer",
    "upstream_token",
    "hmac_secret",
    "private_key",
    "Token",
    "TOKEN_VALUE",
];

/// The tables with fixed keys (structs): an unknown key there is an error naming the key.
/// (Tables of names — `[regions]`, `[routing.agents]`, `[teams]` — take any key.)
const FIXED_TABLES: &[&str] = &[
    "[server]",
    "[upstream]",
    "[regions.eu]",
    "[regions.na]",
    "[routing]",
    "[auth]",
    "[[auth.keys]]",
    "[cache]",
    "[log]",
];

/// How a secret is pasted under `{k}`: well-formed, or on a line TOML cannot parse.
const PLANTINGS: &[&str] = &[
    "{k} = \"{s}\"",
    "{k} = '{s}'",
    "{k} = \"\"\"{s}\"\"\"",
    "{k} = '''{s}'''",
    "{k} = {s}",
    "{k} = [\"{s}\"]",
    "{k} = {{ value = \"{s}\" }}",
    "{k}.inner = \"{s}\"",
    "\"{k}\" = \"{s}\"",
    "{k} = \"{s}",
    "{k} = '{s}",
    "{k} = \"{s}\" trailing",
    "{k} = \"{s}\" = 1",
    "{k} \"{s}\"",
    "{k} = \"{s}\"\n{k} = \"{s}\"",
    "{k} = \"{s}\"\n[{k}]",
    "{k} = \"x\"\n{k} = \"{s}\"",
    "{k} = \"{s}\\q\"",
    "{k} = \"{s}\u{0}\"",
    "{k} = \"{s}\n\"",
];

/// Plants `line` after the `which`-th line that opens a fixed table, or at the top level.
fn plant(text: &str, which: usize, at_top: bool, line: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let headers: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| {
            let l = l.split('#').next().unwrap_or("").trim();
            FIXED_TABLES.contains(&l)
        })
        .map(|(i, _)| i)
        .collect();
    if at_top || headers.is_empty() {
        return format!("{line}\n{text}");
    }
    let at = headers[which % headers.len()] + 1;
    let mut out: Vec<&str> = lines[..at].to_vec();
    out.push(line);
    out.extend_from_slice(&lines[at..]);
    out.join("\n")
}

fn check_secret_not_echoed(text: &str, secret: &str) -> Result<(), TestCaseError> {
    match Config::parse(text, Path::new(CONFIG_FILE)) {
        Ok(_) => Err(fail(format!(
            "a file with a secret under an unknown key was accepted:\n{text}"
        ))),
        Err(e) => {
            check_config_error(&e)?;
            prop_assert!(
                !e.to_string().contains(secret),
                "the error echoes the secret: {}",
                e
            );
            prop_assert!(
                !format!("{e:?}").contains(secret),
                "the error echoes the secret: {:?}",
                e
            );
            Ok(())
        }
    }
}

#[test]
fn config_seeds_hold() {
    for text in valid_configs() {
        assert!(
            Config::parse(&text, Path::new(CONFIG_FILE)).is_ok(),
            "a valid seed is refused:\n{text}"
        );
    }
    each_seed(broken_configs(), |text| {
        prop_assert!(
            check_config(text)?.is_none(),
            "a broken seed is accepted:\n{}",
            text
        );
        Ok(())
    });
    // `tests/cli.rs`'s and `src/config.rs`'s misplaced secrets, each way of pasting it.
    let secret = "misplaced-upstream-token-value-0123456789";
    each_seed(valid_configs(), |text| {
        for planting in PLANTINGS {
            for key in &UNKNOWN_KEYS[..2] {
                let line = planting.replace("{k}", key).replace("{s}", secret);
                for which in 0..FIXED_TABLES.len() {
                    check_secret_not_echoed(&plant(text, which, false, &line), secret)?;
                }
                check_secret_not_echoed(&plant(text, 0, true, &line), secret)?;
            }
        }
        Ok(())
    });
}

proptest! {
    #![proptest_config(runner())]

    /// Arbitrary text, TOML-ish text and arbitrary bytes: no panic; errors name file and key.
    #[test]
    fn config_arbitrary_text(text in prop_oneof![
        any::<String>(),
        "\\PC{0,200}",
        tomlish_text(),
        proptest::collection::vec(any::<u8>(), 0..256)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        select(broken_configs()),
    ]) {
        check_config(&text)?;
    }

    /// Valid files, edited at random (bytes deleted or inserted, lines dropped, duplicated or
    /// swapped, values replaced): no panic; errors name file and key.
    #[test]
    fn config_mutations(
        text in select(valid_configs()),
        edits in proptest::collection::vec(config_edit(), 1..6),
    ) {
        check_config(&apply(&text, &edits))?;
    }

    /// A secret pasted under an unknown key of any fixed table, in any form (quoted, bare,
    /// unterminated, duplicated, in a broken line), is refused and never echoed.
    #[test]
    fn config_errors_never_echo_a_secret(
        text in select(valid_configs()),
        which in 0usize..64,
        at_top in prop::bool::weighted(0.15),
        planting in select(PLANTINGS),
        key in select(UNKNOWN_KEYS),
        secret in "(sk_live_|ghp_|xoxb-|eyJ)[A-Za-z0-9]{24,40}",
    ) {
        let line = planting.replace("{k}", key).replace("{s}", &secret);
        check_secret_not_echoed(&plant(&text, which, at_top, &line), &secret)?;
    }

    /// Duration and size values at their limits: a file `Config::parse` accepts must also build
    /// (what `check-config` and start-up do next) and verify a token, without a panic.
    #[test]
    fn config_limits_that_parse_also_build(values in limit_values()) {
        check_limits(&values)?;
    }
}

/// Values (TOML text) of the duration and size keys, by dotted key; `None` leaves it out.
type Limits = Vec<(&'static str, Option<String>)>;

fn limit_values() -> impl Strategy<Value = Limits> {
    use proptest::option::of;
    (
        (
            of(duration_value()),
            of(duration_value()),
            of(duration_value()),
        ),
        (of(size_value()), of(duration_value()), of(duration_value())),
        (of(size_value()), of(duration_value()), of(duration_value())),
    )
        .prop_map(|((a, b, c), (d, e, f), (g, h, i))| {
            vec![
                ("cache.ttl", a),
                ("cache.stale_if_error", b),
                ("cache.stale_while_revalidate", c),
                ("cache.max_bytes", d),
                ("upstream.connect_timeout", e),
                ("upstream.request_timeout", f),
                ("upstream.max_response_bytes", g),
                ("auth.leeway", h),
                ("server.shutdown_grace", i),
            ]
        })
}

/// The harness's config (its HS256 key only) with these values: if `Config::parse` accepts
/// it, `State::build` must not panic, nor verifying a valid token with what it built; a
/// refusal names the file and a key.
fn check_limits(values: &[(&str, Option<String>)]) -> Result<(), TestCaseError> {
    let lines = |section: &str| -> String {
        values
            .iter()
            .filter_map(|(key, value)| {
                let name = key.strip_prefix(section)?.strip_prefix('.')?;
                Some(format!("{name} = {}\n", value.as_ref()?))
            })
            .collect()
    };
    let fx = auth_fixture();
    let config = TestConfig {
        cache: format!("enabled = true\n{}", lines("cache")),
        upstream: lines("upstream"),
        auth: lines("auth"),
        keys: HS256_KEY.replace(
            "{fixtures}",
            fixture("").display().to_string().trim_end_matches('/'),
        ),
        ..TestConfig::default()
    };
    let mut text = harness_config(&config, &fx.token_file);
    let grace = lines("server");
    if !grace.is_empty() {
        text = text.replace("shutdown_grace = \"5s\"\n", &grace);
    }
    let path = fx.dir.path().join("config.toml");
    let config = match Config::parse(&text, &path) {
        Ok(config) => config,
        Err(e) => {
            prop_assert_eq!(Path::new(&e.file), path.as_path());
            prop_assert!(!e.key.is_empty() && e.key != "-", "{}", e);
            return Ok(());
        }
    };
    let _entered = fx.rt.enter();
    match State::build(config) {
        Ok(state) => {
            let token = mint(Algorithm::HS256, Some("hs-1"), &claims("billing"));
            let _ = state.policy().auth.verify_uncached(&bearer_headers(&token));
        }
        Err(e) => prop_assert!(!e.key.is_empty(), "{}", e),
    }
    Ok(())
}

/// Limits that `Config::parse` accepts and that panicked when this file was written: an
/// `auth.leeway` longer than the time since 1970 (jsonwebtoken computes `now - leeway` when it
/// checks `exp`: a panic in debug builds on every token, every token "expired" in release), a
/// cache `keep` window (`ttl` plus the longer stale window) past moka's 1000-year limit, and
/// one that overflows `Duration` (both panic in `State::build`, so `check-config` too). The
/// last seed is just inside every limit.
const LIMIT_SEEDS: &[&[(&str, &str)]] = &[
    &[("auth.leeway", "\"57y\"")],
    &[("cache.ttl", "\"1001y\"")],
    &[
        ("cache.ttl", "\"1y\""),
        ("cache.stale_while_revalidate", "\"1000y\""),
    ],
    &[
        ("cache.ttl", "\"18446744073709551615s\""),
        ("cache.stale_if_error", "\"1s\""),
    ],
    &[("cache.ttl", "\"999y\""), ("auth.leeway", "\"56y\"")],
];

#[test]
fn config_limit_seeds_hold() {
    each_seed(LIMIT_SEEDS, |seed| {
        let values: Vec<(&str, Option<String>)> = seed
            .iter()
            .map(|(k, v)| (*k, Some(v.to_string())))
            .collect();
        check_limits(&values)
    });
}

// =============================================================================================
// JWT verification: `state.policy().auth.verify(&headers)` / `verify_uncached(&headers)`
// =============================================================================================

/// Only the HS256 key of the harness (`hs-1`), for configs built per case.
const HS256_KEY: &str = r#"
[[auth.keys]]
kid = "hs-1"
algorithm = "HS256"
secret_file = "{fixtures}/hmac_secret.txt"
"#;

/// The harness's config (every fixture key, `leeway = 30s`, issuer and audience) built once,
/// on a runtime of its own, for every JWT property.
struct AuthFixture {
    rt: tokio::runtime::Runtime,
    state: Arc<State>,
    dir: tempfile::TempDir,
    token_file: PathBuf,
}

fn auth_fixture() -> &'static AuthFixture {
    static FIXTURE: OnceLock<AuthFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("convocore-token");
        std::fs::write(&token_file, UPSTREAM_TOKEN).unwrap();
        let config = TestConfig {
            keys: DEFAULT_KEYS.into(),
            ..TestConfig::default()
        };
        let path = dir.path().join("config.toml");
        let config = Config::parse(&harness_config(&config, &token_file), &path).unwrap();
        let state = {
            let _entered = rt.enter();
            State::build(config).unwrap()
        };
        AuthFixture {
            rt,
            state,
            dir,
            token_file,
        }
    })
}

/// The fixture HS256 secret (`hs-1`).
fn hmac_secret() -> Vec<u8> {
    fixture_bytes("hmac_secret.txt")
}

const LEEWAY: i64 = 30;

fn bearer_headers(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    h
}

/// What the gateway answered for these headers: the cached and the uncached path agree, and a
/// refusal's response (status, headers, body), `Display` and `Debug` hold none of `secrets`
/// (the token, its longer parts, the HMAC secret).
fn verify(
    headers: &HeaderMap,
    secrets: &[&str],
) -> Result<Result<String, VerifyError>, TestCaseError> {
    let fx = auth_fixture();
    let policy = fx.state.policy();
    let cached = fx.rt.block_on(policy.auth.verify(headers));
    let uncached = policy.auth.verify_uncached(headers);
    let cached = cached.map(|c| c.team.clone());
    let uncached = uncached.map(|c| c.team.clone());
    prop_assert_eq!(
        &cached,
        &uncached,
        "the verified-token cache answers otherwise"
    );
    if let Err(e) = cached {
        let api = ApiError::from(e);
        let mut shown = format!("{api}\n{api:?}\n{e:?}\n");
        let resp = api.into_response();
        shown.push_str(resp.status().as_str());
        for (name, value) in resp.headers() {
            shown.push_str(&format!(
                "\n{name}: {}",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
        let body: Bytes = fx
            .rt
            .block_on(resp.into_body().collect())
            .unwrap()
            .to_bytes();
        shown.push('\n');
        shown.push_str(&String::from_utf8_lossy(&body));
        let secret = String::from_utf8(hmac_secret()).unwrap();
        for s in secrets.iter().copied().chain([secret.as_str()]) {
            if s.len() >= 12 {
                prop_assert!(!shown.contains(s), "the refusal echoes {:?}:\n{}", s, shown);
            }
        }
    }
    Ok(cached)
}

/// The secrets a refusal of `token` must not show: the token and each part of it.
fn token_secrets(token: &str) -> Vec<&str> {
    let token = token.trim();
    std::iter::once(token).chain(token.split('.')).collect()
}

/// A verdict the generator attaches to each choice it makes: the token must then be accepted
/// (every choice `Good`), refused (any choice `Bad`), or either (a choice whose outcome the
/// contract leaves open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum V {
    Good,
    Bad,
    Either,
}

/// A JSON value in a token: seconds relative to now (made when the token is), or raw text.
#[derive(Debug, Clone)]
enum Val {
    Now(i64),
    /// Now plus this many seconds, with a fraction (`NumericDate` may have one).
    NowFrac(i64),
    Raw(String),
}

impl Val {
    fn render(&self, now: i64) -> String {
        match self {
            Val::Now(d) => (now + d).to_string(),
            Val::NowFrac(d) => format!("{}.5", now + d),
            Val::Raw(s) => s.clone(),
        }
    }
}

fn raw(s: &str) -> Val {
    Val::Raw(s.to_string())
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// One field of a header or payload: (name, value, verdict).
type Field = (String, Val, V);

/// Picks one of `choices`: the field, or `None` to leave it out; with the choice's verdict
/// (leaving out `exp` is as `Bad` as a wrong one).
fn field(
    name: &'static str,
    choices: Vec<(Option<Val>, V)>,
) -> impl Strategy<Value = (Option<Field>, V)> {
    select(choices).prop_map(move |(val, v)| (val.map(|val| (name.to_string(), val, v)), v))
}

/// Fields in random order, and the verdict of the fields left out.
fn shuffled(slots: Vec<(Option<Field>, V)>, others: Vec<Field>) -> BoxedStrategy<(Vec<Field>, V)> {
    let absent = combine(slots.iter().filter(|(f, _)| f.is_none()).map(|(_, v)| *v));
    let fields: Vec<Field> = slots
        .into_iter()
        .filter_map(|(f, _)| f)
        .chain(others)
        .collect();
    (Just(fields).prop_shuffle(), Just(absent)).boxed()
}

/// A second field of a name already present, same or other value: parsers disagree on which
/// one counts, so it is refused.
fn duplicate(values: Vec<&'static str>) -> impl Strategy<Value = Option<(Index, Index, String)>> {
    proptest::option::weighted(
        0.15,
        (
            any::<Index>(),
            any::<Index>(),
            select(values).prop_map(String::from),
        ),
    )
}

fn add_duplicate(fields: &mut Vec<Field>, dup: Option<(Index, Index, String)>) {
    if let Some((which, at, value)) = dup {
        if fields.is_empty() {
            return;
        }
        let name = fields[which.index(fields.len())].0.clone();
        let at = at.index(fields.len() + 1);
        fields.insert(at, (name, Val::Raw(value), V::Good));
    }
}

/// Random JSON text (for extra fields and garbage).
fn json_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| f.to_string()),
        "\\PC{0,12}".prop_map(|s| json_str(&s)),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4)
                .prop_map(|v| format!("[{}]", v.join(","))),
            proptest::collection::vec(("[a-z]{1,6}", inner), 0..4).prop_map(|v| {
                let fields: Vec<String> = v
                    .into_iter()
                    .map(|(k, v)| format!("{}:{v}", json_str(&k)))
                    .collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    })
}

/// A header or payload: JSON fields in order (duplicates allowed), or bytes that are not a
/// JSON object.
#[derive(Debug, Clone)]
enum Part {
    /// The fields, and the verdict of those left out.
    Fields(Vec<Field>, V),
    Garbage(Vec<u8>),
}

impl Part {
    fn render(&self, now: i64) -> Vec<u8> {
        match self {
            Part::Fields(fields, _) => {
                let body: Vec<String> = fields
                    .iter()
                    .map(|(k, v, _)| format!("{}:{}", json_str(k), v.render(now)))
                    .collect();
                format!("{{{}}}", body.join(",")).into_bytes()
            }
            Part::Garbage(bytes) => bytes.clone(),
        }
    }

    fn verdict(&self) -> V {
        match self {
            Part::Garbage(_) => V::Bad,
            Part::Fields(fields, absent) => {
                let mut names: Vec<&str> = fields.iter().map(|(k, _, _)| k.as_str()).collect();
                names.sort_unstable();
                let duplicated = names.windows(2).any(|w| w[0] == w[1]);
                let verdicts = fields.iter().map(|(_, _, v)| *v);
                combine(verdicts.chain([*absent, if duplicated { V::Bad } else { V::Good }]))
            }
        }
    }
}

fn combine(verdicts: impl IntoIterator<Item = V>) -> V {
    let mut out = V::Good;
    for v in verdicts {
        match v {
            V::Bad => return V::Bad,
            V::Either => out = V::Either,
            V::Good => {}
        }
    }
    out
}

/// Bytes that are not a JSON object.
fn garbage() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..48),
        select(vec![
            "",
            "[]",
            "1",
            "\"x\"",
            "null",
            "{",
            "{\"alg\":\"HS256\"",
            "{}}"
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        json_value()
            .prop_filter("not an object", |j| !j.starts_with('{'))
            .prop_map(String::into_bytes),
    ]
}

/// Header fields: `alg`, `typ`, `kid`, `crit`, the other registered ones, and extras.
fn header_fields(only_good: bool) -> impl Strategy<Value = Part> {
    use V::{Bad, Good};
    let keep = move |choices: Vec<(Option<Val>, V)>| -> Vec<(Option<Val>, V)> {
        if only_good {
            choices.into_iter().filter(|(_, v)| *v == Good).collect()
        } else {
            choices
        }
    };
    let alg = field(
        "alg",
        keep(vec![
            (Some(raw("\"HS256\"")), Good),
            (Some(raw("\"HS256\"")), Good),
            (Some(raw("\"HS256\"")), Good),
            (Some(raw("\"none\"")), Bad),
            (Some(raw("\"None\"")), Bad),
            (Some(raw("\"NONE\"")), Bad),
            (Some(raw("\"nOnE\"")), Bad),
            (Some(raw("\"HS384\"")), Bad),
            (Some(raw("\"HS512\"")), Bad),
            (Some(raw("\"RS256\"")), Bad),
            (Some(raw("\"PS256\"")), Bad),
            (Some(raw("\"ES256\"")), Bad),
            (Some(raw("\"EdDSA\"")), Bad),
            (Some(raw("\"hs256\"")), Bad),
            (Some(raw("\"HS256 \"")), Bad),
            (Some(raw("\"\"")), Bad),
            (Some(raw("null")), Bad),
            (Some(raw("256")), Bad),
            (Some(raw("[\"HS256\"]")), Bad),
            (Some(raw("{\"HS256\":1}")), Bad),
            (None, Bad),
        ]),
    );
    let typ = field(
        "typ",
        keep(vec![
            (None, Good),
            (None, Good),
            (Some(raw("\"JWT\"")), Good),
            (Some(raw("\"jwt\"")), Good),
            (Some(raw("\"at+jwt\"")), Good),
            (Some(raw("\"AT+JWT\"")), Good),
            (Some(raw("\"application/jwt\"")), Good),
            (Some(raw("\"Application/At+JWT\"")), Good),
            (Some(raw("null")), Good),
            (Some(raw("\"application/\"")), Bad),
            (Some(raw("\"JWS\"")), Bad),
            (Some(raw("\"JWT \"")), Bad),
            (Some(raw("\"\"")), Bad),
            (Some(raw("\"dpop+jwt\"")), Bad),
            (Some(raw("1")), Bad),
            (Some(raw("[\"JWT\"]")), Bad),
        ]),
    );
    let kid = field(
        "kid",
        keep(vec![
            (None, Good),
            (Some(raw("\"hs-1\"")), Good),
            (Some(raw("\"hs-1\"")), Good),
            (Some(raw("null")), Good),
            (Some(raw("\"rsa-1\"")), Bad),
            (Some(raw("\"ed-1\"")), Bad),
            (Some(raw("\"HS-1\"")), Bad),
            (Some(raw("\"hs-1 \"")), Bad),
            (Some(raw("\"hs-2\"")), Bad),
            (Some(raw("\"\"")), Bad),
            (Some(raw("1")), Bad),
            (Some(raw("[\"hs-1\"]")), Bad),
            (Some(raw("\"../../hmac_secret.txt\"")), Bad),
        ]),
    );
    let crit = field(
        "crit",
        keep(vec![
            (None, Good),
            (None, Good),
            (None, Good),
            (Some(raw("null")), Good),
            (Some(raw("[]")), Bad),
            (Some(raw("[\"exp\"]")), Bad),
            (Some(raw("[\"b64\"]")), Bad),
            (Some(raw("\"exp\"")), Bad),
            (Some(raw("1")), Bad),
        ]),
    );
    // Registered header parameters the gateway ignores; a wrong type makes the header invalid.
    let registered = select(vec!["cty", "jku", "x5u", "x5t", "x5t#S256", "url", "nonce"]);
    let other = prop_oneof![
        (registered.clone(), "\\PC{0,12}").prop_map(|(k, s)| (
            k.to_string(),
            Val::Raw(json_str(&s)),
            Good
        )),
        registered
            .clone()
            .prop_map(|k| (k.to_string(), raw("null"), Good)),
        (registered, select(vec!["1", "true", "[]", "{}"])).prop_map(|(k, v)| (
            k.to_string(),
            raw(v),
            Bad
        )),
        ("x-[a-z]{1,6}", json_value()).prop_map(|(k, v)| (k, Val::Raw(v), Good)),
    ]
    .prop_filter("good", move |f| !only_good || f.2 == Good);
    let others = proptest::collection::vec(other, 0..3);
    let dup = if only_good {
        Just(None).boxed()
    } else {
        duplicate(vec![
            "\"none\"",
            "\"HS256\"",
            "\"RS256\"",
            "\"hs-1\"",
            "\"JWT\"",
            "null",
        ])
        .boxed()
    };
    ((alg, typ, kid, crit), others, dup).prop_flat_map(|((alg, typ, kid, crit), others, dup)| {
        shuffled(vec![alg, typ, kid, crit], others).prop_map(move |(mut fields, absent)| {
            add_duplicate(&mut fields, dup.clone());
            Part::Fields(fields, absent)
        })
    })
}

/// Claims: `exp`, `nbf`, `iss`, `aud`, the team (`team`, else `sub`), and others.
fn payload_fields(only_good: bool) -> impl Strategy<Value = Part> {
    use V::{Bad, Either, Good};
    let keep = move |choices: Vec<(Option<Val>, V)>| -> Vec<(Option<Val>, V)> {
        if only_good {
            choices.into_iter().filter(|(_, v)| *v == Good).collect()
        } else {
            choices
        }
    };
    let exp = field(
        "exp",
        keep(vec![
            (Some(Val::Now(3600)), Good),
            (Some(Val::Now(3600)), Good),
            (Some(Val::Now(-10)), Good), // within the leeway
            (Some(Val::NowFrac(3600)), Good),
            (Some(Val::Now(50 * 365 * 86400)), Good),
            (Some(raw("18446744073709551615")), Good),
            (Some(raw("1e10")), Good),
            (Some(Val::Now(-LEEWAY - 60)), Bad),
            (Some(Val::Now(-3600)), Bad),
            (Some(raw("0")), Bad),
            (Some(raw("-1")), Bad),
            (Some(raw("-0")), Either),
            (Some(raw("1e300")), Bad),
            (Some(raw("18446744073709551616")), Bad),
            (Some(raw("null")), Bad),
            (Some(raw("true")), Bad),
            (Some(raw("\"4102444800\"")), Bad),
            (Some(raw("[4102444800]")), Bad),
            (Some(raw("{}")), Bad),
            (None, Bad),
        ]),
    );
    let nbf = field(
        "nbf",
        keep(vec![
            (None, Good),
            (None, Good),
            (Some(raw("null")), Either), // jsonwebtoken refuses it; either is right
            (Some(Val::Now(-100)), Good),
            (Some(Val::Now(10)), Good), // within the leeway
            (Some(Val::NowFrac(-100)), Good),
            (Some(raw("0")), Good),
            (Some(Val::Now(LEEWAY + 60)), Bad),
            (Some(Val::Now(3600)), Bad),
            (Some(raw("\"0\"")), Bad),
            (Some(raw("1e300")), Bad),
            (Some(raw("-5")), Bad),
            (Some(raw("true")), Bad),
            (Some(raw("[0]")), Bad),
        ]),
    );
    let issuer = json_str(ISSUER);
    let iss = field(
        "iss",
        keep(vec![
            (Some(Val::Raw(issuer.clone())), Good),
            (Some(Val::Raw(issuer.clone())), Good),
            (Some(Val::Raw(format!("[{issuer}]"))), Bad),
            (
                Some(Val::Raw(format!("[{issuer}, \"https://evil.example\"]"))),
                Bad,
            ),
            (Some(Val::Raw(json_str(&format!("{ISSUER}/")))), Bad),
            (Some(Val::Raw(json_str(&ISSUER.to_uppercase()))), Bad),
            (Some(raw("\"https://evil.example\"")), Bad),
            (Some(raw("\"\"")), Bad),
            (Some(raw("null")), Bad),
            (Some(raw("1")), Bad),
            (Some(raw("{}")), Bad),
            (None, Bad),
        ]),
    );
    let audience = json_str(AUDIENCE);
    let aud = field(
        "aud",
        keep(vec![
            (Some(Val::Raw(audience.clone())), Good),
            (Some(Val::Raw(format!("[{audience}]"))), Good),
            (Some(Val::Raw(format!("[\"other\", {audience}]"))), Good),
            (Some(Val::Raw(format!("[{audience}, {audience}]"))), Good),
            (Some(raw("\"other\"")), Bad),
            (Some(raw("[]")), Bad),
            (Some(raw("[\"other\"]")), Bad),
            (Some(Val::Raw(format!("[1, {audience}]"))), Bad),
            (Some(Val::Raw(format!("{{\"a\": {audience}}}"))), Bad),
            (Some(raw("null")), Bad),
            (Some(raw("1")), Bad),
            (None, Bad),
        ]),
    );
    // The team: `team` when present (it must then be a string of 1 to 256 bytes), else `sub`;
    // `Forged::team` applies the rule, so both are `Good` here.
    let name = prop_oneof![
        "[a-z][a-z0-9-]{0,15}",
        "\\PC{1,12}".prop_filter("at most 256 bytes", |s| s.len() <= 256),
    ];
    let team = prop_oneof![
        4 => name.clone().prop_map(|t| Some(json_str(&t))),
        1 => Just(None),
        1 => select(vec!["\"\"", "1", "null", "[\"billing\"]", "{}"]).prop_map(|v| Some(v.to_string())),
        1 => Just(Some(json_str(&"t".repeat(257)))),
    ];
    let sub = prop_oneof![
        2 => name.prop_map(|s| Some(json_str(&s))),
        1 => Just(None),
        1 => select(vec!["\"\"", "1", "null"]).prop_map(|v| Some(v.to_string())),
    ];
    let team_and_sub = (team, sub).prop_map(|(team, sub)| {
        [
            team.map(|t| ("team".to_string(), Val::Raw(t), Good)),
            sub.map(|s| ("sub".to_string(), Val::Raw(s), Good)),
        ]
    });
    let other = prop_oneof![
        select(vec![
            ("scope", "\"export convocore-gateway:purge\""),
            ("scope", "[\"export\", 1]"),
            ("scope", "1"),
            ("iat", "0"),
            ("iat", "\"yesterday\""),
            ("jti", "\"abc\""),
            ("azp", "null"),
        ])
        .prop_map(|(k, v)| (k.to_string(), raw(v), Good)),
        ("x_[a-z]{1,6}", json_value()).prop_map(|(k, v)| (k, Val::Raw(v), Good)),
    ];
    let others = proptest::collection::vec(other, 0..3);
    let dup = if only_good {
        Just(None).boxed()
    } else {
        duplicate(vec![
            "4102444800",
            "\"https://idp.example.internal\"",
            "\"convocore-gateway\"",
            "\"billing\"",
            "0",
            "null",
        ])
        .boxed()
    };
    ((exp, nbf, iss, aud), team_and_sub, others, dup).prop_flat_map(
        |((exp, nbf, iss, aud), [team, sub], others, dup)| {
            // The team's verdict is `Forged::team`'s: leaving out `team` or `sub` is no fault.
            let slots = vec![exp, nbf, iss, aud, (team, V::Good), (sub, V::Good)];
            shuffled(slots, others).prop_map(move |(mut fields, absent)| {
                add_duplicate(&mut fields, dup.clone());
                Part::Fields(fields, absent)
            })
        },
    )
}

/// How the signature segment is made.
#[derive(Debug, Clone)]
enum Sig {
    /// HMAC over the signing input with `key` (0: the fixture secret, 1: it with a newline,
    /// 2: the RSA public key PEM (the HS256-with-a-public-key confusion), 3: empty, 4: random),
    /// and SHA-256/384/512.
    Hmac {
        key: u8,
        random_key: Vec<u8>,
        hash: u8,
    },
    Empty,
    Random(Vec<u8>),
    /// The right signature with one bit flipped.
    Flipped(Index),
    /// The right signature less its last byte.
    Truncated,
    /// The right signature of another token (the harness's valid claims).
    Transplanted,
    /// No signature segment at all (`header.payload`).
    Omitted,
    /// A fourth segment after the right signature.
    Extra,
}

fn sig(only_good: bool) -> BoxedStrategy<Sig> {
    let good = Just(Sig::Hmac {
        key: 0,
        random_key: Vec::new(),
        hash: 0,
    });
    if only_good {
        return good.boxed();
    }
    prop_oneof![
        8 => good,
        2 => (0u8..5, proptest::collection::vec(any::<u8>(), 0..64), 0u8..3)
            .prop_map(|(key, random_key, hash)| Sig::Hmac { key, random_key, hash }),
        1 => Just(Sig::Empty),
        1 => proptest::collection::vec(any::<u8>(), 0..80).prop_map(Sig::Random),
        1 => any::<Index>().prop_map(Sig::Flipped),
        1 => Just(Sig::Truncated),
        1 => Just(Sig::Transplanted),
        1 => Just(Sig::Omitted),
        1 => Just(Sig::Extra),
    ]
    .boxed()
}

/// How a segment is base64-encoded: base64url without padding is the only right one.
#[derive(Debug, Clone, Copy)]
enum Enc {
    UrlNoPad,
    UrlPadded,
    Standard,
    /// A space inside.
    Spaced,
}

fn enc(only_good: bool) -> BoxedStrategy<Enc> {
    if only_good {
        return Just(Enc::UrlNoPad).boxed();
    }
    prop_oneof![
        12 => Just(Enc::UrlNoPad),
        1 => Just(Enc::UrlPadded),
        1 => Just(Enc::Standard),
        1 => Just(Enc::Spaced),
    ]
    .boxed()
}

fn encode(bytes: &[u8], enc: Enc) -> String {
    match enc {
        Enc::UrlNoPad => URL_SAFE_NO_PAD.encode(bytes),
        Enc::UrlPadded => URL_SAFE.encode(bytes),
        Enc::Standard => STANDARD_NO_PAD.encode(bytes),
        Enc::Spaced => {
            let s = URL_SAFE_NO_PAD.encode(bytes);
            let mid = s.len() / 2;
            format!("{} {}", &s[..mid], &s[mid..])
        }
    }
}

/// A generated token and what the gateway must do with it.
#[derive(Debug, Clone)]
struct Forged {
    header: Part,
    payload: Part,
    sig: Sig,
    enc: [Enc; 3],
}

fn forged(only_good: bool) -> impl Strategy<Value = Forged> {
    let part = |fields: BoxedStrategy<Part>| -> BoxedStrategy<Part> {
        if only_good {
            fields
        } else {
            prop_oneof![
                12 => fields,
                1 => garbage().prop_map(Part::Garbage),
            ]
            .boxed()
        }
    };
    (
        part(header_fields(only_good).boxed()),
        part(payload_fields(only_good).boxed()),
        sig(only_good),
        [enc(only_good), enc(only_good), enc(only_good)],
    )
        .prop_map(|(header, payload, sig, enc)| Forged {
            header,
            payload,
            sig,
            enc,
        })
        .prop_filter("valid", move |f| {
            !only_good
                || (f.team().is_some()
                    && f.header.verdict() == V::Good
                    && f.payload.verdict() == V::Good)
        })
}

fn hmac_sign(key: &[u8], hash: u8, message: &[u8]) -> Vec<u8> {
    let alg = match hash {
        0 => hmac::HMAC_SHA256,
        1 => hmac::HMAC_SHA384,
        _ => hmac::HMAC_SHA512,
    };
    hmac::sign(&hmac::Key::new(alg, key), message)
        .as_ref()
        .to_vec()
}

impl Forged {
    /// The token, made now, and its verdict.
    fn make(&self) -> (String, V) {
        let now = now() as i64;
        let secret = hmac_secret();
        let header = encode(&self.header.render(now), self.enc[0]);
        let payload = encode(&self.payload.render(now), self.enc[1]);
        let input = format!("{header}.{payload}");
        let right = hmac_sign(&secret, 0, input.as_bytes());
        let (sig, sig_v) = match &self.sig {
            Sig::Hmac {
                key,
                random_key,
                hash,
            } => {
                let key: Vec<u8> = match key {
                    0 => secret.clone(),
                    1 => [secret.as_slice(), b"\n"].concat(),
                    2 => fixture_bytes("rsa_public.pem"),
                    3 => Vec::new(),
                    _ => random_key.clone(),
                };
                let sig = hmac_sign(&key, *hash, input.as_bytes());
                let v = if sig == right { V::Good } else { V::Bad };
                (Some(sig), v)
            }
            Sig::Empty => (Some(Vec::new()), V::Bad),
            Sig::Random(bytes) => (Some(bytes.clone()), V::Bad),
            Sig::Flipped(i) => {
                let mut sig = right.clone();
                let bit = i.index(sig.len() * 8);
                sig[bit / 8] ^= 1 << (bit % 8);
                (Some(sig), V::Bad)
            }
            Sig::Truncated => (Some(right[..right.len() - 1].to_vec()), V::Bad),
            Sig::Transplanted => {
                let other = mint(Algorithm::HS256, Some("hs-1"), &claims("billing"));
                let sig = URL_SAFE_NO_PAD
                    .decode(other.rsplit('.').next().unwrap())
                    .unwrap();
                let v = if sig == right { V::Good } else { V::Bad };
                (Some(sig), v)
            }
            Sig::Omitted => (None, V::Bad),
            Sig::Extra => (Some(right.clone()), V::Bad),
        };
        let mut token = input;
        if let Some(sig) = &sig {
            token.push('.');
            token.push_str(&encode(sig, self.enc[2]));
            if matches!(self.sig, Sig::Extra) {
                token.push('.');
                token.push_str(&URL_SAFE_NO_PAD.encode(sig));
            }
        }
        // Only the canonical encoding of each segment is a JWT; another that happens to give
        // the same text is the same token.
        let canonical = [
            (header.as_str(), self.header.render(now)),
            (payload.as_str(), self.payload.render(now)),
        ]
        .iter()
        .all(|(seg, bytes)| *seg == URL_SAFE_NO_PAD.encode(bytes))
            && sig.as_ref().is_none_or(|s| {
                token.rsplit('.').next() == Some(URL_SAFE_NO_PAD.encode(s).as_str())
            });
        let enc_v = if canonical { V::Good } else { V::Bad };
        let team_v = if self.team().is_some() {
            V::Good
        } else {
            V::Bad
        };
        let v = combine([
            self.header.verdict(),
            self.payload.verdict(),
            sig_v,
            enc_v,
            team_v,
        ]);
        (token, v)
    }

    /// The team the gateway must name when it accepts the token.
    fn team(&self) -> Option<String> {
        let Part::Fields(fields, _) = &self.payload else {
            return None;
        };
        let get = |name: &str| fields.iter().find(|(k, _, _)| k == name).map(|f| &f.1);
        let claim = get("team").or_else(|| get("sub"))?;
        let Val::Raw(json) = claim else { return None };
        serde_json::from_str::<String>(json)
            .ok()
            .filter(|t| !t.is_empty() && t.len() <= 256)
    }
}

/// Checks one generated token against its verdict: a `Bad` one is refused, a `Good` one is
/// accepted naming its team; either way nothing panics and no refusal shows the token or the
/// secret.
fn check_forged(f: &Forged) -> Result<(), TestCaseError> {
    let (token, v) = f.make();
    let Ok(value) = HeaderValue::from_str(&format!("Bearer {token}")) else {
        return Ok(());
    };
    let mut headers = HeaderMap::new();
    headers.insert(AUTHORIZATION, value);
    let got = verify(&headers, &token_secrets(&token))?;
    match (v, &got) {
        (V::Bad, Ok(team)) => Err(fail(format!(
            "a token that must be refused was accepted (team {team:?}): {token}"
        ))),
        (V::Good, Err(e)) => Err(fail(format!("a valid token was refused ({e:?}): {token}"))),
        (V::Good | V::Either, Ok(team)) => {
            let expected = f.team();
            prop_assert_eq!(Some(team), expected.as_ref(), "{}", token);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Authorization values: from `tests/auth.rs` and the unit tests of `src/auth.rs`, and
/// generated. None of them carries a valid token.
fn bearer_seeds() -> Vec<String> {
    let valid = mint(Algorithm::HS256, Some("hs-1"), &claims("billing"));
    let (h, p, s) = {
        let mut parts = valid.split('.');
        (
            parts.next().unwrap().to_string(),
            parts.next().unwrap().to_string(),
            parts.next().unwrap().to_string(),
        )
    };
    let none_h = URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#);
    let none_p = URL_SAFE_NO_PAD.encode(r#"{"exp":1}"#);
    let mut seeds = vec![
        String::new(),
        "Bearer".into(),
        "Bearer ".into(),
        "Bearer  ".into(),
        "Basic YWxhZGRpbjpvcGVuc2VzYW1l".into(),
        format!("Basic {valid}"),
        format!("Token {valid}"),
        valid.clone(),
        format!("Bearer\t{valid}"),
        format!("Bearer{valid}"),
        format!("Bearer {valid}x"),
        format!("Bearer {valid}.{s}"),
        format!("Bearer {h}.{p}"),
        format!("Bearer {h}.{p}."),
        format!("Bearer {h}..{s}"),
        format!("Bearer .{p}.{s}"),
        format!("Bearer {none_h}.{none_p}."),
        format!("Bearer {none_h}.{p}."),
        format!("Bearer {none_h}.{p}.{s}"),
        format!("Bearer {valid} {valid}"),
        format!("Bearer {}", "a".repeat(16 * 1024 + 1)),
        "Bearer a.b.c".into(),
        "Bearer ..".into(),
        "Bearer .".into(),
    ];
    // The PyJWT tokens of every algorithm, their signature spoiled.
    for alg in ["hs256", "rs256", "ps256", "es256", "es384", "eddsa"] {
        let t = String::from_utf8(fixture_bytes(&format!("interop_{alg}.jwt"))).unwrap();
        let (rest, sig) = t.rsplit_once('.').unwrap();
        let mut sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        sig[0] ^= 1;
        seeds.push(format!("Bearer {rest}.{}", URL_SAFE_NO_PAD.encode(sig)));
        seeds.push(format!("Bearer {rest}."));
        seeds.push(format!("Bearer {rest}"));
    }
    seeds
}

/// An Authorization header holding no valid token: refused, without a panic or an echo.
fn check_bearer(values: &[Vec<u8>]) -> Result<(), TestCaseError> {
    let mut headers = HeaderMap::new();
    let mut shown = Vec::new();
    for v in values {
        if let Ok(value) = HeaderValue::from_bytes(v) {
            headers.append(AUTHORIZATION, value);
            shown.push(String::from_utf8_lossy(v).into_owned());
        }
    }
    let mut secrets: Vec<&str> = Vec::new();
    for s in &shown {
        let token = s.split_once(' ').map_or(s.as_str(), |(_, t)| t);
        secrets.extend(token_secrets(token));
    }
    let got = verify(&headers, &secrets)?;
    prop_assert!(got.is_err(), "accepted: {:?}", shown);
    Ok(())
}

fn segment_b64() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9_-]{0,40}",
        json_value().prop_map(|j| URL_SAFE_NO_PAD.encode(j)),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(|b| URL_SAFE_NO_PAD.encode(b)),
        "[A-Za-z0-9+/=_ -]{0,40}",
    ]
}

fn bearer_value() -> impl Strategy<Value = Vec<u8>> {
    let scheme = select(vec![
        "Bearer ", "bearer ", "BEARER ", "Bearer  ", "Basic ", "Bearer\t", "", "Bearer",
    ]);
    prop_oneof![
        1 => select(bearer_seeds()).prop_map(String::into_bytes),
        2 => proptest::collection::vec(any::<u8>(), 0..120),
        2 => (scheme.clone(), "\\PC{0,80}").prop_map(|(s, t)| format!("{s}{t}").into_bytes()),
        4 => (scheme, proptest::collection::vec(segment_b64(), 0..5))
            .prop_map(|(s, parts)| format!("{s}{}", parts.join(".")).into_bytes()),
    ]
}

#[test]
fn jwt_seeds_hold() {
    each_seed(bearer_seeds(), |value| {
        check_bearer(&[value.clone().into_bytes()])
    });
    // Two Authorization headers, the valid token in each: refused ("send one").
    let valid = mint(Algorithm::HS256, Some("hs-1"), &claims("billing"));
    let header = format!("Bearer {valid}").into_bytes();
    check_bearer(&[header.clone(), header]).unwrap();
    // And the tokens of `tests/auth.rs` that are accepted: every fixture key, with and
    // without a kid, and the PyJWT tokens as they are.
    for (alg, kid) in ALG_KIDS {
        for kid in [Some(*kid), None] {
            let t = mint(*alg, kid, &claims("billing"));
            let got = verify(&bearer_headers(&t), &[]).unwrap();
            assert_eq!(got, Ok("billing".to_string()), "{alg:?} {kid:?}");
        }
    }
    for alg in ["hs256", "rs256", "ps256", "es256", "es384", "eddsa"] {
        let t = String::from_utf8(fixture_bytes(&format!("interop_{alg}.jwt"))).unwrap();
        let got = verify(&bearer_headers(&t), &[]).unwrap();
        assert_eq!(got, Ok("interop".to_string()), "{alg}");
    }
}

/// Every fixture key: (alg, kid).
const ALG_KIDS: &[(Algorithm, &str)] = &[
    (Algorithm::RS256, "rsa-1"),
    (Algorithm::PS256, "rsa-ps"),
    (Algorithm::ES256, "ec-1"),
    (Algorithm::ES384, "ec384-1"),
    (Algorithm::EdDSA, "ed-1"),
    (Algorithm::HS256, "hs-1"),
];

proptest! {
    #![proptest_config(runner())]

    /// Arbitrary Authorization headers (bytes, schemes, base64url segments, the seeds): never a
    /// panic, never accepted, never echoed.
    #[test]
    fn jwt_arbitrary_bearer_is_refused(values in proptest::collection::vec(bearer_value(), 1..3)) {
        check_bearer(&values)?;
    }

    /// Tokens with mutated header and claims (random types for alg, typ, kid, crit, exp, nbf,
    /// iss, aud, the team; duplicated fields; extra ones), signed with the fixture HMAC secret
    /// or not (another key, the RSA public key, a flipped bit, a transplanted or missing
    /// signature, alg none), encoded right or not: each is refused or accepted as its parts
    /// say, never with a panic, and a refusal never shows the token or the secret.
    #[test]
    fn jwt_mutated_tokens(f in forged(false)) {
        check_forged(&f)?;
    }

    /// Well-formed HS256 tokens with valid claims (in any order, with extra claims and header
    /// fields, `aud` as a string or an array, fractional dates, `typ` variants) are accepted.
    #[test]
    fn jwt_valid_hs256_tokens_are_accepted(f in forged(true)) {
        let (token, v) = f.make();
        prop_assert_eq!(v, V::Good, "{}", token);
        check_forged(&f)?;
    }

    /// Valid claims signed with any fixture key (with or without its kid), plus random extra
    /// claims and team names: accepted, naming the team.
    #[test]
    fn jwt_every_fixture_key_accepts_valid_claims(
        (alg, kid) in select(ALG_KIDS),
        with_kid in any::<bool>(),
        team in "[a-z][a-z0-9-]{0,15}",
        extra in proptest::collection::vec(("x_[a-z]{1,6}", json_value()), 0..3),
    ) {
        let mut c = claims(&team);
        for (k, v) in extra {
            c[k.as_str()] = serde_json::from_str(&v).unwrap();
        }
        let t = mint(alg, with_kid.then_some(kid), &c);
        let got = verify(&bearer_headers(&t), &[])?;
        prop_assert_eq!(got, Ok(team));
    }
}

// =============================================================================================
// Cache-Control: `cache::Mode::from_headers(&HeaderMap)`
// =============================================================================================

/// Directives: the ones that count, in any case, near misses, and others.
fn directive() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(vec![
            "no-store", "NO-STORE", "No-Store", "no-cache", "NO-CACHE", "No-Cache", "max-age=0",
            "MAX-AGE=0", "Max-Age=0", "max-age=00", "max-age=\"0\"", "max-age=1", "max-age=3600",
            "max-age=-0", "max-age = 0", "max-age=", "max-age", "private", "public",
            "no-transform", "only-if-cached", "max-stale", "max-stale=60", "min-fresh=10",
            "stale-if-error=60", "no-storex", "xno-store", "no-store=1", "no-cache=\"x\"",
            "no_store", "nostore", "no-stor", "\"no-store\"", "no-store;", "", "=", "\"",
        ])
        .prop_map(String::from),
        1 => "[!-~&&[^,]]{0,16}",
    ]
}

/// Optional whitespace around a directive.
fn ows() -> impl Strategy<Value = String> {
    "[ \t]{0,2}"
}

/// A header value of directives, and the directives as written.
fn cc_value() -> impl Strategy<Value = (String, Vec<String>)> {
    proptest::collection::vec((ows(), directive(), ows()), 0..6).prop_map(|ds| {
        let text: Vec<String> = ds.iter().map(|(a, d, b)| format!("{a}{d}{b}")).collect();
        let directives = ds.into_iter().map(|(_, d, _)| d).collect();
        (text.join(","), directives)
    })
}

/// The contract: `no-store` anywhere (any case, as a whole directive) bypasses the cache;
/// otherwise `no-cache` or `max-age=0` anywhere refreshes it.
fn expected_mode(directives: &[String]) -> Mode {
    let any = |d: &str| directives.iter().any(|x| x.eq_ignore_ascii_case(d));
    if any("no-store") {
        Mode::Bypass
    } else if any("no-cache") || any("max-age=0") {
        Mode::Refresh
    } else {
        Mode::Normal
    }
}

/// `tests/cache.rs`'s and `src/cache.rs`'s values, with the mode each means.
const CC_SEEDS: &[(&str, Mode)] = &[
    ("no-cache", Mode::Refresh),
    ("no-store", Mode::Bypass),
    ("No-Store", Mode::Bypass),
    ("no-cache, no-store", Mode::Bypass),
    ("max-age=0", Mode::Refresh),
    ("max-age=60", Mode::Normal),
    ("", Mode::Normal),
];

#[test]
fn cache_control_seeds_hold() {
    each_seed(CC_SEEDS, |(value, mode)| {
        let mut h = HeaderMap::new();
        h.insert(CACHE_CONTROL, HeaderValue::from_str(value).unwrap());
        prop_assert_eq!(Mode::from_headers(&h), *mode);
        Ok(())
    });
    assert_eq!(Mode::from_headers(&HeaderMap::new()), Mode::Normal);
}

proptest! {
    #![proptest_config(runner())]

    /// Arbitrary header values (any bytes a header value may hold, several headers): no panic.
    #[test]
    fn cache_control_arbitrary_values_never_panic(
        values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..4),
    ) {
        let mut h = HeaderMap::new();
        for v in values {
            if let Ok(v) = HeaderValue::from_bytes(&v) {
                h.append(CACHE_CONTROL, v);
            }
        }
        let _ = Mode::from_headers(&h);
    }

    /// Directive lists over one or more headers, with whitespace around directives: the mode is
    /// the contract's.
    #[test]
    fn cache_control_modes(values in proptest::collection::vec(cc_value(), 0..4)) {
        let mut h = HeaderMap::new();
        let mut all = Vec::new();
        for (text, directives) in values {
            h.append(CACHE_CONTROL, HeaderValue::from_str(&text).unwrap());
            all.extend(directives);
        }
        prop_assert_eq!(Mode::from_headers(&h), expected_mode(&all), "{:?}", h);
    }
}

// =============================================================================================
// Accept-Encoding and conditional requests (If-None-Match, If-Modified-Since): no parser yet.
// =============================================================================================
//
// A later issue adds them. Their properties go here, in the same form: seeds from that issue's
// tests, then at least:
// - arbitrary header values (any bytes, several headers, huge q-values, empty lists) never
//   panic;
// - Accept-Encoding: a coding is chosen only if the caller accepts it with q > 0 (`identity`
//   unless refused with `identity;q=0` or `*;q=0`), case-insensitively, whatever the whitespace
//   and parameter order; the choice does not depend on header order among equal q-values;
// - If-None-Match: `*` and any list holding the entity's strong or weak tag (weak comparison)
//   give 304, never for another entity's tag; a malformed list is ignored, not an error;
// - If-Modified-Since: an unparsable date is ignored (RFC 9110 §13.1.3); only a date at or
//   after the entry's Last-Modified gives 304, and If-None-Match, when present, wins.

proptest! {
    /// Any `If-None-Match` / `If-Modified-Since` text: no panic, and a `304` only when the
    /// condition names the response's tag (or `*`) or a date not before its `Last-Modified`.
    #[test]
    fn conditional_headers_never_panic(inm in ".{0,80}", ims in ".{0,40}") {
        use convocore_gateway::http::conditional::not_modified;
        let mut request = http::HeaderMap::new();
        if let Ok(v) = http::HeaderValue::from_str(&inm) {
            request.insert("if-none-match", v);
        }
        if let Ok(v) = http::HeaderValue::from_str(&ims) {
            request.insert("if-modified-since", v);
        }
        let mut response = http::HeaderMap::new();
        response.insert("etag", http::HeaderValue::from_static("\"v1\""));
        response.insert(
            "last-modified",
            http::HeaderValue::from_static("Sun, 01 Dec 2024 10:30:02 GMT"),
        );
        if not_modified(&request, &response) {
            let names_it = inm.contains("\"v1\"") || inm.contains('*');
            let by_date = !request.contains_key("if-none-match") || !names_it;
            prop_assert!(names_it || by_date, "304 for {:?} / {:?}", inm, ims);
        }
    }
}

// Accept-Encoding (RFC 9110 §12.5.3), against the contract's "Accept-Encoding (with q-values)
// selects one of [cache] compress": whatever the caller sends, the choice is an offered
// encoding or the identity (never a refusal), and a coding the caller named with q=0 is never
// chosen.

proptest! {
    #![proptest_config(runner())]

    #[test]
    fn accept_encoding_never_panics_and_chooses_only_what_is_offered(
        value in prop_oneof![
            ".{0,80}",
            proptest::collection::vec(
                (
                    select(vec!["gzip", "br", "zstd", "identity", "*", "x-gzip", "deflate", "GZIP", ""]),
                    select(vec!["", ";q=0", ";q=1", ";q=0.5", ";q=0.001", ";q=1.5", ";q=abc", ";Q=0.2", ";level=9"]),
                ),
                0..6,
            )
            .prop_map(|items| items
                .iter()
                .map(|(t, q)| format!("{t}{q}"))
                .collect::<Vec<_>>()
                .join(", ")),
        ],
        offered in proptest::sample::subsequence(
            vec![
                convocore_gateway::compress::Coding::Zstd,
                convocore_gateway::compress::Coding::Br,
                convocore_gateway::compress::Coding::Gzip,
            ],
            0..=3,
        ),
    ) {
        use convocore_gateway::compress::negotiate;
        let mut headers = http::HeaderMap::new();
        if let Ok(v) = http::HeaderValue::from_str(&value) {
            headers.insert("accept-encoding", v);
        }
        if let Some(chosen) = negotiate(&headers, &offered) {
            prop_assert!(offered.contains(&chosen), "{:?} not offered", chosen);
            let refused = format!("{};q=0", chosen.name());
            let lower = value.to_ascii_lowercase();
            let named_zero = lower.split(',').any(|item| {
                let item = item.trim();
                item == refused || item == format!("{refused}.0") || item == format!("{refused}.00")
            });
            prop_assert!(!named_zero, "{:?} chosen though {:?}", chosen, value);
        }
    }
}
