//! The export's response: the upstream's status, body and passed headers, plus the gateway's
//! own: `X-Convocore-Region`, `X-Cache`, `Age` and RFC 9211 `Cache-Status`, all built here.

use std::sync::OnceLock;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, AGE};
use http::{HeaderMap, Response};
use http_body_util::Full;

use crate::cache::{Answer, Detail, Fwd};

pub static X_CONVOCORE_REGION: HeaderName = HeaderName::from_static("x-convocore-region");
pub static X_CACHE: HeaderName = HeaderName::from_static("x-cache");
pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// How many seconds of `Age` and hit `Cache-Status` values are made ahead, once, so that a
/// hit formats nothing.
const PRECOMPUTED_SECONDS: u64 = 3600;

pub fn export(answer: Answer) -> Response<Full<Bytes>> {
    let fetched = &answer.response;
    let mut response = Response::new(Full::new(fetched.body.clone()));
    *response.status_mut() = fetched.status;
    // Room for the passed headers, ours, X-Request-Id and the server's Date/Content-Length.
    let mut headers = HeaderMap::with_capacity(16);
    for (name, value) in fetched.headers.iter() {
        headers.insert(name, value.clone());
    }
    headers.insert(&X_CONVOCORE_REGION, fetched.region.clone());
    headers.insert(&X_CACHE, answer.status.header());
    if let Some(age) = answer.age {
        headers.insert(AGE, age_header(age));
    }
    headers.insert(&CACHE_STATUS, cache_status(&answer.detail));
    *response.headers_mut() = headers;
    response
}

/// The `Cache-Status` value (RFC 9211) for how the answer was obtained.
pub fn cache_status(detail: &Detail) -> HeaderValue {
    let text = match *detail {
        Detail::Hit { ttl } => {
            if let Some(v) = precomputed().hits.get(ttl as usize) {
                return v.clone();
            }
            format!("convocore-gateway; hit; ttl={ttl}")
        }
        Detail::SharedHit { ttl } => format!("convocore-gateway; hit; ttl={ttl}; detail=shared"),
        Detail::Disabled => return HeaderValue::from_static("convocore-gateway; fwd=miss"),
        Detail::Bypass => return HeaderValue::from_static("convocore-gateway; fwd=bypass"),
        Detail::StaleWhileRevalidate { past } => {
            format!("convocore-gateway; hit; ttl=-{past}; detail=stale-while-revalidate")
        }
        Detail::Forward {
            fwd,
            fwd_status,
            stored,
            collapsed,
        } => {
            let mut s = format!("convocore-gateway; fwd={}", fwd_name(fwd));
            if let Some(status) = fwd_status {
                s.push_str(&format!("; fwd-status={status}"));
            }
            if stored {
                s.push_str("; stored");
            }
            if collapsed {
                s.push_str("; collapsed");
            }
            s
        }
        Detail::Revalidated { collapsed: false } => {
            return HeaderValue::from_static("convocore-gateway; fwd=stale; fwd-status=304")
        }
        Detail::Revalidated { collapsed: true } => {
            return HeaderValue::from_static(
                "convocore-gateway; fwd=stale; fwd-status=304; collapsed",
            )
        }
        Detail::StaleIfError { fwd_status, past } => {
            let fwd_status = fwd_status
                .map(|s| format!("; fwd-status={s}"))
                .unwrap_or_default();
            format!("convocore-gateway; fwd=stale{fwd_status}; ttl=-{past}; detail=stale-if-error")
        }
    };
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("convocore-gateway"))
}

fn fwd_name(fwd: Fwd) -> &'static str {
    match fwd {
        Fwd::Miss => "miss",
        Fwd::Request => "request",
        Fwd::Stale => "stale",
    }
}

/// The `Age` header for `secs`.
pub fn age_header(secs: u64) -> HeaderValue {
    precomputed()
        .ages
        .get(secs as usize)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from(secs))
}

struct Precomputed {
    hits: Vec<HeaderValue>,
    ages: Vec<HeaderValue>,
}

fn precomputed() -> &'static Precomputed {
    static TABLES: OnceLock<Precomputed> = OnceLock::new();
    TABLES.get_or_init(|| Precomputed {
        hits: (0..=PRECOMPUTED_SECONDS)
            .map(|ttl| {
                HeaderValue::from_str(&format!("convocore-gateway; hit; ttl={ttl}"))
                    .unwrap_or_else(|_| HeaderValue::from_static("convocore-gateway; hit"))
            })
            .collect(),
        ages: (0..=PRECOMPUTED_SECONDS).map(HeaderValue::from).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_status_values() {
        let forward = |fwd, fwd_status, stored, collapsed| Detail::Forward {
            fwd,
            fwd_status,
            stored,
            collapsed,
        };
        for (detail, text) in [
            (Detail::Hit { ttl: 240 }, "convocore-gateway; hit; ttl=240"),
            (
                Detail::Hit { ttl: 9000 },
                "convocore-gateway; hit; ttl=9000",
            ),
            (Detail::Disabled, "convocore-gateway; fwd=miss"),
            (Detail::Bypass, "convocore-gateway; fwd=bypass"),
            (
                forward(Fwd::Miss, None, true, false),
                "convocore-gateway; fwd=miss; stored",
            ),
            (
                forward(Fwd::Miss, None, false, true),
                "convocore-gateway; fwd=miss; collapsed",
            ),
            (
                forward(Fwd::Request, Some(404), false, false),
                "convocore-gateway; fwd=request; fwd-status=404",
            ),
            (
                forward(Fwd::Stale, Some(500), false, true),
                "convocore-gateway; fwd=stale; fwd-status=500; collapsed",
            ),
            (
                Detail::Revalidated { collapsed: false },
                "convocore-gateway; fwd=stale; fwd-status=304",
            ),
            (
                Detail::Revalidated { collapsed: true },
                "convocore-gateway; fwd=stale; fwd-status=304; collapsed",
            ),
            (
                Detail::StaleWhileRevalidate { past: 3 },
                "convocore-gateway; hit; ttl=-3; detail=stale-while-revalidate",
            ),
            (
                Detail::StaleIfError {
                    fwd_status: Some(503),
                    past: 7,
                },
                "convocore-gateway; fwd=stale; fwd-status=503; ttl=-7; detail=stale-if-error",
            ),
            (
                Detail::StaleIfError {
                    fwd_status: None,
                    past: 0,
                },
                "convocore-gateway; fwd=stale; ttl=-0; detail=stale-if-error",
            ),
        ] {
            assert_eq!(cache_status(&detail), text);
        }
        assert_eq!(age_header(12), "12");
        assert_eq!(age_header(86_400), "86400");
    }
}
