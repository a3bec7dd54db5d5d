//! The Convocore client: the regions with their tokens and connection pools (HTTP/1.1, and
//! HTTP/2 by ALPN over rustls; see [`crate::pool`]), and one exchange per export with the
//! whole-exchange timeout and the response-size cap.
//!
//! The upstream request is built from the parsed [`Export`], never by forwarding the caller's
//! request, so no caller header can reach Convocore by accident.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, CACHE_CONTROL, CONTENT_DISPOSITION,
    CONTENT_LENGTH, CONTENT_TYPE, ETAG, LAST_MODIFIED, USER_AGENT,
};
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use tokio::time::Instant;

use crate::config::{Config, ConfigError};
use crate::pool::{tls_config, Connector, Origin, PoolError};
use crate::route::{Export, Format};
use crate::watch::Watched;

pub use crate::pool::SharedError;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Response headers passed from Convocore to the caller; nothing else is.
pub const PASSED_HEADERS: [HeaderName; 4] =
    [CONTENT_TYPE, CONTENT_DISPOSITION, ETAG, LAST_MODIFIED];

/// A failed exchange; cheap to clone, so one failure can answer every coalesced waiter.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect: {0}")]
    Unreachable(#[source] SharedError),
    #[error("timed out")]
    Timeout,
    #[error("response body over max_response_bytes")]
    TooLarge,
    #[error("protocol: {0}")]
    Protocol(#[source] SharedError),
    #[error("token: {0}")]
    Token(String),
}

impl UpstreamError {
    /// The `status` label of `convocore_gateway_upstream_requests_total` for a failed exchange.
    pub fn label(&self) -> &'static str {
        match self {
            UpstreamError::Timeout => "timeout",
            _ => "error",
        }
    }
}

/// One Convocore region.
pub struct Region {
    pub name: String,
    /// `X-Convocore-Region`, built once.
    pub header: HeaderValue,
    /// The path of `base_url` (`/v3`), without a trailing slash.
    path: String,
    /// Connections to `base_url`'s origin.
    origin: Origin,
    /// `Bearer <shared token>`, marked sensitive; follows `token_file`.
    authorization: Arc<Watched<HeaderValue>>,
}

/// What Convocore answered.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub status: StatusCode,
    /// Only [`PASSED_HEADERS`].
    pub headers: HeaderMap,
    pub body: Bytes,
    /// False when Convocore said `Cache-Control: no-store` or `private`.
    pub storable: bool,
    /// Time spent upstream (all discovery attempts included).
    pub elapsed: Duration,
    /// When the response arrived: the cache's age is counted from here.
    pub received: Instant,
    /// The region that answered (an index into `Upstream::regions`).
    pub region: usize,
}

pub struct Upstream {
    connector: Connector,
    pub regions: Vec<Region>,
    request_timeout: Duration,
    max_response_bytes: u64,
    user_agent: HeaderValue,
}

impl Upstream {
    pub fn from_config(config: &Config) -> Result<Upstream, ConfigError> {
        let up = &config.upstream;
        let tls = match &up.ca_file {
            Some(file) => {
                let path = config.resolve(file);
                Watched::file(&path, |pem| tls_config(Some(pem)))
                    .map_err(|m| ConfigError::new(&config.path, "upstream.ca_file", m))?
            }
            None => Watched::fixed(
                tls_config(None).map_err(|m| ConfigError::new(&config.path, "upstream", m))?,
            ),
        };
        let connector = Connector {
            tls,
            connect_timeout: up.connect_timeout,
        };

        let shared = token_source(
            config,
            "upstream",
            up.token_env.as_deref(),
            up.token_file.as_deref(),
        )?;
        let mut regions = Vec::with_capacity(config.regions.len());
        for (name, region) in &config.regions {
            let own = token_source(
                config,
                &format!("regions.{name}"),
                region.token_env.as_deref(),
                region.token_file.as_deref(),
            )?;
            let authorization = own.or_else(|| shared.clone()).ok_or_else(|| {
                ConfigError::new(
                    &config.path,
                    "upstream.token_env",
                    "no Convocore token source",
                )
            })?;
            let base_err =
                |m: String| ConfigError::new(&config.path, format!("regions.{name}.base_url"), m);
            let base: Uri = region
                .base_url
                .parse()
                .map_err(|e| base_err(format!("not a URL: {e}")))?;
            let origin = Origin::new(&base, connector.clone()).map_err(base_err)?;
            regions.push(Region {
                header: HeaderValue::from_str(name).map_err(|_| {
                    ConfigError::new(
                        &config.path,
                        format!("regions.{name}"),
                        "not a header value",
                    )
                })?,
                name: name.clone(),
                path: base.path().trim_end_matches('/').to_string(),
                origin,
                authorization,
            });
        }
        Ok(Upstream {
            connector,
            regions,
            request_timeout: up.request_timeout,
            max_response_bytes: up.max_response_bytes,
            user_agent: HeaderValue::from_static(concat!(
                "convocore-gateway/",
                env!("CARGO_PKG_VERSION")
            )),
        })
    }

    /// How to connect (TLS following `upstream.ca_file`, `connect_timeout`), for other
    /// outbound HTTPS calls.
    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    pub fn region_index(&self, name: &str) -> Option<usize> {
        self.regions.iter().position(|r| r.name == name)
    }

    /// One exchange with a region: `GET {base}/agents/{a}/convos/{c}/export?format=…` with the
    /// shared token. The whole exchange, body included, is bounded by `request_timeout`; a body
    /// over `max_response_bytes` is an error, never truncated.
    pub async fn fetch(
        &self,
        region_index: usize,
        export: &Export,
        request_id: &HeaderValue,
    ) -> Result<Fetched, UpstreamError> {
        let region = self.regions.get(region_index).ok_or_else(|| {
            UpstreamError::Protocol(Arc::new(std::io::Error::other("no such region")))
        })?;
        let uri = format!(
            "{}/agents/{}/convos/{}/export?format={}",
            region.path,
            export.agent,
            export.convo,
            export.format.as_str()
        );
        let accept = match export.format {
            Format::Json => HeaderValue::from_static("application/json"),
            Format::Csv => HeaderValue::from_static("text/csv, application/json;q=0.5"),
        };
        let request = Request::get(uri)
            .header(AUTHORIZATION, region.authorization.get().as_ref().clone())
            .header(ACCEPT, accept)
            .header(&X_REQUEST_ID, request_id.clone())
            .header(USER_AGENT, self.user_agent.clone())
            .body(Empty::new())
            .map_err(|e| UpstreamError::Protocol(Arc::new(e)))?;

        let started = Instant::now();
        let max = self.max_response_bytes;
        let origin = &region.origin;
        let exchange = async move {
            let (response, conn) = origin.send(request).await.map_err(|e| match e {
                PoolError::Connect(e) => UpstreamError::Unreachable(e),
                PoolError::Http(e) => UpstreamError::Protocol(Arc::new(e)),
            })?;
            let (parts, body) = response.into_parts();
            let declared = parts
                .headers
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > max) {
                return Err(UpstreamError::TooLarge);
            }
            let limit = usize::try_from(max).unwrap_or(usize::MAX);
            let body = read_body(body, limit, declared).await?;
            origin.release(conn);
            Ok((parts, body))
        };
        let (parts, body) = tokio::time::timeout(self.request_timeout, exchange)
            .await
            .map_err(|_| UpstreamError::Timeout)??;

        let mut headers = HeaderMap::with_capacity(PASSED_HEADERS.len());
        for name in &PASSED_HEADERS {
            if let Some(v) = parts.headers.get(name) {
                headers.insert(name.clone(), v.clone());
            }
        }
        let storable = !parts.headers.get_all(CACHE_CONTROL).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',').any(|d| {
                    let d = d.trim();
                    d.eq_ignore_ascii_case("no-store")
                        || d.eq_ignore_ascii_case("private")
                        || d.to_ascii_lowercase().starts_with("private=")
                })
            })
        });
        Ok(Fetched {
            status: parts.status,
            headers,
            body,
            storable,
            elapsed: started.elapsed(),
            received: Instant::now(),
            region: region_index,
        })
    }
}

/// Reads a whole body of at most `limit` bytes into one buffer of its own. With a declared
/// length the buffer is allocated once at its final size, so a large export costs one
/// allocation and one copy (collecting chunks and joining them would hold it twice), and a
/// cached body never pins the connection's read buffer it arrived in.
async fn read_body(
    mut body: hyper::body::Incoming,
    limit: usize,
    declared: Option<u64>,
) -> Result<Bytes, UpstreamError> {
    let capacity = declared
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0)
        .min(limit);
    let mut buf = bytes::BytesMut::with_capacity(capacity);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| UpstreamError::Protocol(Arc::new(e)))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if buf.len() + data.len() > limit {
            return Err(UpstreamError::TooLarge);
        }
        buf.extend_from_slice(&data);
    }
    Ok(buf.freeze())
}

/// `token_env` / `token_file` to a watched `Authorization` value; `None` when neither is set.
fn token_source(
    config: &Config,
    at: &str,
    env: Option<&str>,
    file: Option<&Path>,
) -> Result<Option<Arc<Watched<HeaderValue>>>, ConfigError> {
    if let Some(var) = env {
        let value = std::env::var(var).map_err(|_| {
            ConfigError::new(
                &config.path,
                format!("{at}.token_env"),
                format!("environment variable {var} is not set"),
            )
        })?;
        let header = bearer_header(value.as_bytes())
            .map_err(|m| ConfigError::new(&config.path, format!("{at}.token_env"), m))?;
        return Ok(Some(Watched::fixed(header)));
    }
    if let Some(file) = file {
        let path = config.resolve(file);
        let watched = Watched::file(&path, bearer_header)
            .map_err(|m| ConfigError::new(&config.path, format!("{at}.token_file"), m))?;
        return Ok(Some(watched));
    }
    Ok(None)
}

/// A token to `Bearer <token>`; errors never include the token.
fn bearer_header(raw: &[u8]) -> Result<HeaderValue, String> {
    let token = std::str::from_utf8(raw)
        .map_err(|_| "the token is not UTF-8".to_string())?
        .trim();
    if token.is_empty() {
        return Err("the token is empty".to_string());
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| "the token has characters not allowed in a header".to_string())?;
    value.set_sensitive(true);
    Ok(value)
}
