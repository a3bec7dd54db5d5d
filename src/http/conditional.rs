//! Conditional requests from callers (RFC 9110 §13): `If-None-Match` (weak comparison, lists,
//! `*`) and, without it, `If-Modified-Since`, evaluated against the `200` the gateway would
//! send. A match is answered `304 Not Modified` with the validators and the gateway's own
//! headers and no body. A malformed condition is ignored (as if absent), never a `400`.

use http::header::{
    HeaderMap, CONTENT_DISPOSITION, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, ETAG,
    IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED,
};
use http::{Response, StatusCode};

/// Whether the caller already has the representation these response headers describe.
pub fn not_modified(request: &HeaderMap, response: &HeaderMap) -> bool {
    if let Some(inm) = if_none_match(request) {
        let Some(etag) = response.get(ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        return match inm {
            Condition::Any => true,
            Condition::Tags(tags) => tags.iter().any(|t| opaque(t) == opaque(etag)),
        };
    }
    let Some(since) = request
        .get(IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v.trim()).ok())
    else {
        return false;
    };
    let Some(modified) = response
        .get(LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v.trim()).ok())
    else {
        return false;
    };
    modified <= since
}

enum Condition {
    Any,
    Tags(Vec<String>),
}

/// `If-None-Match`, all its field lines together; `None` when absent or malformed.
fn if_none_match(request: &HeaderMap) -> Option<Condition> {
    let mut tags = Vec::new();
    let mut any = false;
    let mut seen = false;
    for value in request.get_all(IF_NONE_MATCH) {
        seen = true;
        let text = value.to_str().ok()?;
        for item in split_tags(text)? {
            if item == "*" {
                any = true;
            } else {
                tags.push(item);
            }
        }
    }
    if !seen || (!any && tags.is_empty()) {
        return None;
    }
    if any {
        // `*` alone, or a malformed mix: only `*` by itself is meaningful.
        return tags.is_empty().then_some(Condition::Any);
    }
    Some(Condition::Tags(tags))
}

/// Splits a list of entity tags (`W/"a", "b"` or `*`); `None` when it is not one.
fn split_tags(text: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('*') {
            out.push("*".to_string());
            rest = after;
        } else {
            let (weak, body) = match rest.strip_prefix("W/") {
                Some(b) => (true, b),
                None => (false, rest),
            };
            let body = body.strip_prefix('"')?;
            let end = body.find('"')?;
            let tag = &body[..end];
            if tag.bytes().any(|b| b < 0x21 || b == 0x7f) {
                return None;
            }
            out.push(format!("{}\"{tag}\"", if weak { "W/" } else { "" }));
            rest = &body[end + 1..];
        }
        rest = rest.trim_start();
        match rest.strip_prefix(',') {
            Some(after) => rest = after.trim_start(),
            None if rest.is_empty() => {}
            None => return None,
        }
    }
    Some(out)
}

/// The opaque part of an entity tag, for the weak comparison.
fn opaque(tag: &str) -> &str {
    tag.trim().strip_prefix("W/").unwrap_or(tag.trim())
}

/// Turns the `200` the gateway would send into its `304`: the validators and the gateway's
/// own headers stay, the body and its description go.
pub fn into_not_modified<B: Default>(mut response: Response<B>) -> Response<B> {
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    let headers = response.headers_mut();
    for name in [
        CONTENT_TYPE,
        CONTENT_DISPOSITION,
        CONTENT_LENGTH,
        CONTENT_ENCODING,
    ] {
        headers.remove(name);
    }
    *response.body_mut() = B::default();
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn req(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn resp() -> HeaderMap {
        req(&[
            ("etag", "\"v1\""),
            ("last-modified", "Sun, 01 Dec 2024 10:30:02 GMT"),
        ])
    }

    #[test]
    fn if_none_match_compares_weakly_with_lists_and_star() {
        for (inm, want) in [
            ("\"v1\"", true),
            ("W/\"v1\"", true),
            ("\"v0\", \"v1\"", true),
            ("\"v0\",W/\"v1\"", true),
            ("*", true),
            ("\"v2\"", false),
            ("\"v0\", \"v2\"", false),
        ] {
            assert_eq!(
                not_modified(&req(&[("if-none-match", inm)]), &resp()),
                want,
                "{inm}"
            );
        }
        // Across field lines.
        let h = req(&[("if-none-match", "\"v0\""), ("if-none-match", "\"v1\"")]);
        assert!(not_modified(&h, &resp()));
    }

    #[test]
    fn if_modified_since_only_without_if_none_match() {
        let h = |pairs: &[(&'static str, &str)]| not_modified(&req(pairs), &resp());
        assert!(h(&[("if-modified-since", "Sun, 01 Dec 2024 10:30:02 GMT")]));
        assert!(h(&[("if-modified-since", "Mon, 02 Dec 2024 00:00:00 GMT")]));
        assert!(!h(&[(
            "if-modified-since",
            "Sat, 30 Nov 2024 00:00:00 GMT"
        )]));
        // If-None-Match wins, even when If-Modified-Since would match.
        assert!(!h(&[
            ("if-none-match", "\"v2\""),
            ("if-modified-since", "Mon, 02 Dec 2024 00:00:00 GMT")
        ]));
    }

    #[test]
    fn malformed_conditions_are_ignored() {
        for (name, value) in [
            ("if-none-match", "v1"),
            ("if-none-match", "\"v1"),
            ("if-none-match", "\"v1\" junk"),
            ("if-none-match", ""),
            ("if-modified-since", "yesterday"),
            ("if-modified-since", ""),
        ] {
            assert!(
                !not_modified(&req(&[(name, value)]), &resp()),
                "{name}: {value}"
            );
        }
        // A malformed If-None-Match leaves If-Modified-Since to decide.
        assert!(not_modified(
            &req(&[
                ("if-none-match", "garbage"),
                ("if-modified-since", "Mon, 02 Dec 2024 00:00:00 GMT")
            ]),
            &resp()
        ));
        // No validators on the response: never 304.
        assert!(!not_modified(
            &req(&[("if-none-match", "*")]),
            &HeaderMap::new()
        ));
    }
}
