//! The one API route: `GET /v3/agents/{agentId}/convos/{convoId}/export[?format=json|csv]`,
//! parsed strictly. Nothing that fails here is ever sent upstream.

use http::{Method, Uri};

use crate::domain::{valid_id, Export, Format};
use crate::error::ApiError;

const PREFIX: &str = "/v3/agents/";
const MIDDLE: &str = "/convos/";
const SUFFIX: &str = "/export";

/// Method, path and query to an [`Export`]: 404 for other paths, 405 for other methods on the
/// route, 400 for ids or queries outside the contract.
pub fn parse(method: &Method, uri: &Uri) -> Result<Export, ApiError> {
    let path = uri.path();
    let ids = path
        .strip_prefix(PREFIX)
        .and_then(|rest| rest.strip_suffix(SUFFIX))
        .ok_or(ApiError::NotFound)?;
    // A byte-window search: `str::split_once` builds a substring searcher on every call.
    let at = ids
        .as_bytes()
        .windows(MIDDLE.len())
        .position(|w| w == MIDDLE.as_bytes())
        .ok_or(ApiError::NotFound)?;
    let (agent, convo) = (&ids[..at], &ids[at + MIDDLE.len()..]);
    if method != Method::GET && method != Method::HEAD {
        return Err(ApiError::MethodNotSupported("GET, HEAD"));
    }
    if !valid_id(agent) {
        return Err(ApiError::BadRequest(
            "agentId must be 1 to 128 characters of A-Z a-z 0-9 _ -",
        ));
    }
    if !valid_id(convo) {
        return Err(ApiError::BadRequest(
            "convoId must be 1 to 128 characters of A-Z a-z 0-9 _ -",
        ));
    }
    let format = parse_query(uri.query())?;
    Ok(Export {
        agent: agent.to_string(),
        convo: convo.to_string(),
        format,
    })
}

fn parse_query(query: Option<&str>) -> Result<Format, ApiError> {
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return Ok(Format::Json);
    };
    let mut format = None;
    for pair in query.split('&') {
        let value = pair.strip_prefix("format=").ok_or(ApiError::BadRequest(
            "the only query parameter is format=json|csv",
        ))?;
        if format.is_some() {
            return Err(ApiError::BadRequest("format may be given once"));
        }
        format = Some(match value {
            "json" => Format::Json,
            "csv" => Format::Csv,
            _ => return Err(ApiError::BadRequest("format must be json or csv")),
        });
    }
    Ok(format.unwrap_or(Format::Json))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(uri: &str) -> Result<Export, ApiError> {
        parse(&Method::GET, &uri.parse().unwrap())
    }

    #[test]
    fn valid_routes() {
        let e = get("/v3/agents/agent-1/convos/c_2/export").unwrap();
        assert_eq!((e.agent.as_str(), e.convo.as_str()), ("agent-1", "c_2"));
        assert_eq!(e.format, Format::Json);
        assert_eq!(
            get("/v3/agents/a/convos/c/export?format=csv")
                .unwrap()
                .format,
            Format::Csv
        );
        assert_eq!(
            get("/v3/agents/a/convos/c/export?format=json")
                .unwrap()
                .format,
            Format::Json
        );
        assert_eq!(
            get("/v3/agents/a/convos/c/export?").unwrap().format,
            Format::Json
        );
        let long = "a".repeat(128);
        assert!(get(&format!("/v3/agents/{long}/convos/{long}/export")).is_ok());
    }

    #[test]
    fn bad_requests() {
        let long = "a".repeat(129);
        for uri in [
            "/v3/agents/a.b/convos/c/export",
            "/v3/agents/a%2Fb/convos/c/export",
            "/v3/agents/../convos/c/export",
            "/v3/agents/a/b/convos/c/export",
            "/v3/agents/a/convos/c%C3%A9/export",
            "/v3/agents//convos/c/export",
            &format!("/v3/agents/{long}/convos/c/export"),
            &format!("/v3/agents/a/convos/{long}/export"),
            "/v3/agents/a/convos/c/export?format=xml",
            "/v3/agents/a/convos/c/export?format=JSON",
            "/v3/agents/a/convos/c/export?format=",
            "/v3/agents/a/convos/c/export?format=json&x=1",
            "/v3/agents/a/convos/c/export?format=json&format=csv",
            "/v3/agents/a/convos/c/export?x=1",
            "/v3/agents/a/convos/c/export?format=%6Ason",
        ] {
            assert!(matches!(get(uri), Err(ApiError::BadRequest(_))), "{uri}");
        }
    }

    #[test]
    fn not_found_and_method() {
        for uri in [
            "/",
            "/v3/agents/a/convos/c",
            "/v3/agents/a/convos/c/export/",
            "/v3/agents/a/export",
            "/v2/agents/a/convos/c/export",
        ] {
            assert!(matches!(get(uri), Err(ApiError::NotFound)), "{uri}");
        }
        let uri = "/v3/agents/a/convos/c/export".parse().unwrap();
        for m in [
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
            Method::PATCH,
        ] {
            assert!(matches!(
                parse(&m, &uri),
                Err(ApiError::MethodNotSupported("GET, HEAD"))
            ));
        }
        assert!(parse(&Method::HEAD, &uri).is_ok());
    }
}
