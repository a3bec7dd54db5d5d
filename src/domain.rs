//! The gateway's nouns, shared by every layer and depending on none: the export a caller asks
//! for and its format (the route parses one, the cache keys by it, the upstream request is
//! built from it), a region's id, and how the cache answered.

use http::HeaderValue;

/// The export's format (`?format=json|csv`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Json,
    Csv,
}

impl Format {
    pub const ALL: [Format; 2] = [Format::Json, Format::Csv];

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Csv => "csv",
        }
    }
}

/// One conversation export: what a caller asked for (validated), and the cache's key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Export {
    pub agent: String,
    pub convo: String,
    pub format: Format,
}

/// A region of one policy: an index into its `upstream::Regions`, meaningful only with that policy
/// (a reload may add, remove or reorder regions). What outlives a policy, such as a cache
/// entry or a learned agent, names its region instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegionId(u16);

impl RegionId {
    pub fn new(index: u16) -> RegionId {
        RegionId(index)
    }

    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// `X-Cache`, and the `cache` label of the request metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    Miss,
    Stale,
    Bypass,
    /// An expired entry the upstream confirmed unchanged (`304`), renewed and served.
    Revalidated,
}

impl CacheStatus {
    pub fn header(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Stale => "STALE",
            CacheStatus::Bypass => "BYPASS",
            CacheStatus::Revalidated => "REVALIDATED",
        })
    }

    pub fn label(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Stale => "stale",
            CacheStatus::Bypass => "bypass",
            CacheStatus::Revalidated => "revalidated",
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
