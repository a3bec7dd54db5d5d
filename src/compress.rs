//! Compression of exports (`[cache] compress`): the encodings and their levels, the caller's
//! `Accept-Encoding` negotiation (RFC 9110 §12.5.3), and the encoded bodies of an entry, each
//! made once, off the async threads, and kept with it (so a hit never compresses).
//!
//! Levels were chosen by measurement (`cargo run --release --example compression_levels`,
//! tables in BENCHMARKS.md): each is the level past which a better ratio costs more than it
//! saves on exports like Convocore's, not the library's default (brotli's 11 takes seconds on
//! a 5 MiB export).

use std::io::Write;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, ACCEPT_ENCODING};
use tokio::sync::OnceCell;

/// Encodings made at once: one per core.
static ENCODERS: std::sync::LazyLock<tokio::sync::Semaphore> = std::sync::LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    tokio::sync::Semaphore::new(cores)
});

/// Bodies smaller than this are sent as they are: the framing would eat the saving.
pub const MIN_BYTES: usize = 1024;

/// zstd level 3: as fast as 1 and 2 on exports (~670 MB/s on 5 MiB of JSON) and 3–5 % smaller;
/// 5 costs 3.5× the time for under 1 %.
pub const ZSTD_LEVEL: i32 = 3;
/// brotli quality 5: 12–14 % smaller than 3 for 3× its time (80 ms for 5 MiB of JSON); 6 buys
/// 5 % more for +20 %, 7 and up double it, and the default 11 takes 185 ms for 100 KiB.
pub const BROTLI_QUALITY: u32 = 5;
/// gzip level 5 (zlib-rs): 12 % smaller than 3 for twice its time; zlib's default 6 costs
/// 2–2.5× more for 5–7 %.
pub const GZIP_LEVEL: u32 = 5;

/// An encoding the gateway can offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Coding {
    Zstd,
    Br,
    Gzip,
}

impl Coding {
    pub const ALL: [Coding; 3] = [Coding::Zstd, Coding::Br, Coding::Gzip];

    /// Its `Content-Encoding` token.
    pub fn name(self) -> &'static str {
        match self {
            Coding::Zstd => "zstd",
            Coding::Br => "br",
            Coding::Gzip => "gzip",
        }
    }

    pub fn header(self) -> HeaderValue {
        HeaderValue::from_static(self.name())
    }

    fn index(self) -> usize {
        match self {
            Coding::Zstd => 0,
            Coding::Br => 1,
            Coding::Gzip => 2,
        }
    }

    /// `body` in this encoding at the gateway's level. CPU-bound: call it off the async threads.
    pub fn encode(self, body: &[u8]) -> std::io::Result<Vec<u8>> {
        let level = match self {
            Coding::Zstd => ZSTD_LEVEL as u32,
            Coding::Br => BROTLI_QUALITY,
            Coding::Gzip => GZIP_LEVEL,
        };
        self.encode_at(body, level)
    }

    /// `body` in this encoding at `level` (zstd 1–22, brotli quality 0–11, gzip 0–9).
    pub fn encode_at(self, body: &[u8], level: u32) -> std::io::Result<Vec<u8>> {
        match self {
            Coding::Zstd => zstd::bulk::compress(body, i32::try_from(level).unwrap_or(3)),
            Coding::Br => {
                let params = brotli::enc::BrotliEncoderParams {
                    quality: i32::try_from(level).unwrap_or(5),
                    size_hint: body.len(),
                    ..Default::default()
                };
                let mut out = Vec::with_capacity(body.len() / 4);
                brotli::BrotliCompress(&mut &body[..], &mut out, &params)?;
                Ok(out)
            }
            Coding::Gzip => {
                let out = Vec::with_capacity(body.len() / 4);
                let mut encoder =
                    flate2::write::GzEncoder::new(out, flate2::Compression::new(level));
                encoder.write_all(body)?;
                encoder.finish()
            }
        }
    }
}

/// The encoding to send, of `offered` (in preference order), for a request's
/// `Accept-Encoding`: the acceptable one of highest q, ties to the earlier in `offered`; `None`
/// (identity) without the header, when none is acceptable, or when the caller prefers identity
/// by a higher q. Never a refusal: identity is always the fallback.
pub fn negotiate(headers: &HeaderMap, offered: &[Coding]) -> Option<Coding> {
    if offered.is_empty() {
        return None;
    }
    let mut q = [None::<u16>; 3];
    let mut star = None;
    let mut identity = None;
    let mut seen = false;
    for value in headers.get_all(ACCEPT_ENCODING) {
        seen = true;
        for item in value.as_bytes().split(|b| *b == b',') {
            let mut parts = item.split(|b| *b == b';');
            let token = parts.next().unwrap_or_default().trim_ascii();
            let Some(weight) = weight(parts) else {
                continue; // a malformed q: the item is ignored
            };
            let is = |name: &[u8]| token.eq_ignore_ascii_case(name);
            let slot = if is(b"zstd") {
                &mut q[Coding::Zstd.index()]
            } else if is(b"br") {
                &mut q[Coding::Br.index()]
            } else if is(b"gzip") || is(b"x-gzip") {
                &mut q[Coding::Gzip.index()]
            } else if is(b"identity") {
                &mut identity
            } else if token == b"*" {
                &mut star
            } else {
                continue;
            };
            // Listed twice: the lower weight counts (a `q=0` refusal is never overridden).
            *slot = Some(slot.map_or(weight, |w: u16| w.min(weight)));
        }
    }
    if !seen {
        return None;
    }
    let mut best: Option<(Coding, u16)> = None;
    for &coding in offered {
        let w = q[coding.index()].or(star).unwrap_or(0);
        if w > 0 && best.is_none_or(|(_, b)| w > b) {
            best = Some((coding, w));
        }
    }
    let (coding, w) = best?;
    // Identity named with a higher q is preferred; unnamed, it never outranks a coding.
    match identity {
        Some(i) if i > w => None,
        _ => Some(coding),
    }
}

/// The q of an item's parameters, in thousandths (1000 when absent); `None` when malformed.
fn weight<'a>(params: impl Iterator<Item = &'a [u8]>) -> Option<u16> {
    let mut weight = 1000;
    for param in params {
        let Some(at) = param.iter().position(|b| *b == b'=') else {
            continue;
        };
        let (name, value) = (param[..at].trim_ascii(), param[at + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"q") {
            weight = qvalue(value)?;
        }
    }
    Some(weight)
}

/// `0`, `0.5`, `1.000`: RFC 9110 §12.4.2's qvalue, in thousandths.
fn qvalue(v: &[u8]) -> Option<u16> {
    let (int, frac) = match v.iter().position(|b| *b == b'.') {
        Some(at) => (&v[..at], &v[at + 1..]),
        None => (v, &b""[..]),
    };
    if frac.len() > 3 || !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut thousandths = 0u16;
    for i in 0..3 {
        thousandths = thousandths * 10 + frac.get(i).map_or(0, |d| u16::from(d - b'0'));
    }
    match int {
        b"0" => Some(thousandths),
        b"1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// An entry's encoded bodies: each made once, by the first request that wants it (others
/// asking meanwhile wait for that one), then kept for the entry's life, with the weak form of
/// its `ETag`. The slots are allocated with the first encoding, so an entry never encoded (most
/// small ones) pays 16 bytes for them.
#[derive(Debug, Clone, Default)]
pub struct Encoded(std::sync::OnceLock<Box<Slots>>);

#[derive(Debug, Clone, Default)]
struct Slots {
    bodies: [OnceCell<Bytes>; 3],
    /// The entry's `ETag` and its weak form, made once (a hit formats nothing).
    weak_etag: std::sync::OnceLock<(HeaderValue, HeaderValue)>,
}

impl Encoded {
    /// The encoded bodies made so far, with their encodings.
    pub fn made(&self) -> impl Iterator<Item = (Coding, &Bytes)> {
        let slots = self.0.get();
        Coding::ALL
            .into_iter()
            .filter_map(move |c| Some((c, slots?.bodies[c.index()].get()?)))
    }

    /// Heap bytes of the slots themselves (once allocated), beyond the encoded bodies.
    pub fn slots_bytes(&self) -> usize {
        self.0.get().map_or(0, |slots| {
            std::mem::size_of::<Slots>()
                + slots
                    .weak_etag
                    .get()
                    .map_or(0, |(strong, weak)| strong.len() + weak.len())
        })
    }

    /// `W/` + `etag` (a weak tag as it is), kept after the first time for this tag.
    pub fn weak_etag(&self, etag: &HeaderValue) -> HeaderValue {
        if etag.as_bytes().starts_with(b"W/") {
            return etag.clone();
        }
        let slots = self.0.get_or_init(Box::default);
        if let Some((strong, weak)) = slots.weak_etag.get() {
            if strong == etag {
                return weak.clone();
            }
        }
        let mut bytes = Vec::with_capacity(etag.len() + 2);
        bytes.extend_from_slice(b"W/");
        bytes.extend_from_slice(etag.as_bytes());
        let weak =
            HeaderValue::from_maybe_shared(Bytes::from(bytes)).unwrap_or_else(|_| etag.clone());
        // A renewed entry with another tag keeps the first pair: it is recomputed then.
        let _ = slots.weak_etag.set((etag.clone(), weak.clone()));
        weak
    }

    /// `body` in `coding`: kept, or made now off the async threads (`true`: made by this call,
    /// so the entry's weight grew). `None` if the encoder failed (the identity is sent).
    pub async fn get_or_make(&self, coding: Coding, body: &Bytes) -> Option<(Bytes, bool)> {
        let cell = &self.0.get_or_init(Box::default).bodies[coding.index()];
        if let Some(kept) = cell.get() {
            return Some((kept.clone(), false));
        }
        let mut made = false;
        let encoded = cell
            .get_or_try_init(|| async {
                // At most one encoding per core at a time: a burst of first requests for
                // large exports (or the uncached answers of a cache that is off) waits its turn
                // instead of filling tokio's blocking pool with CPU-bound work.
                let _turn = ENCODERS.acquire().await.map_err(|_| ())?;
                let body = body.clone();
                let encoded = tokio::task::spawn_blocking(move || coding.encode(&body))
                    .await
                    .map_err(|_| ())?
                    .map_err(|_| ())?;
                made = true;
                Ok::<_, ()>(Bytes::from(encoded))
            })
            .await
            .ok()?;
        Some((encoded.clone(), made))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    const ALL: &[Coding] = &[Coding::Zstd, Coding::Br, Coding::Gzip];

    fn ae(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn negotiation_follows_q_then_the_configured_order() {
        use Coding::*;
        let cases: &[(&[&str], &[Coding], Option<Coding>)] = &[
            (&[], ALL, None),
            (&[""], ALL, None),
            (&["gzip"], ALL, Some(Gzip)),
            (&["gzip, br"], ALL, Some(Br)),
            (&["gzip, br, zstd"], ALL, Some(Zstd)),
            (&["gzip, br, zstd"], &[Gzip, Br], Some(Gzip)),
            (&["gzip;q=1.0, br;q=0.9"], ALL, Some(Gzip)),
            (&["br;q=0.5, gzip;q=0.8, zstd;q=0.1"], ALL, Some(Gzip)),
            (&["*"], ALL, Some(Zstd)),
            (&["*"], &[Br, Gzip], Some(Br)),
            (&["*;q=0.5, gzip"], ALL, Some(Gzip)),
            (&["*, zstd;q=0"], ALL, Some(Br)),
            (&["*;q=0"], ALL, None),
            (&["gzip;q=0"], ALL, None),
            (&["identity;q=0"], ALL, None),
            (&["identity;q=0, gzip;q=0"], ALL, None),
            (&["gzip;q=0.5, identity"], ALL, None),
            (&["gzip, identity"], ALL, Some(Gzip)),
            (&["gzip;q=0.5, identity;q=0.2"], ALL, Some(Gzip)),
            (&["deflate, compress"], ALL, None),
            (&["x-gzip"], ALL, Some(Gzip)),
            (&["GZip ; Q=0.7 , BR;q=0.3"], ALL, Some(Gzip)),
            (&["gzip"], &[], None),
            (&["gzip"], &[Zstd], None),
            (&["br"], &[Zstd], None),
            // Two field lines are one list.
            (&["gzip;q=0.2", "br;q=0.4"], ALL, Some(Br)),
            // Malformed weights: the item is ignored, the others count.
            (&["br;q=2, gzip"], ALL, Some(Gzip)),
            (&["br;q=0.5555, gzip;q=0.1"], ALL, Some(Gzip)),
            (&["br;q=abc"], ALL, None),
            (&["br;q=1.5"], ALL, None),
            (&["br;q=-1"], ALL, None),
            (&["br;level=3"], ALL, Some(Br)),
            (&[";;,,,"], ALL, None),
            (&["gzip, gzip;q=0"], ALL, None),
            (&["x-gzip;q=0", "gzip"], ALL, None),
        ];
        for (values, offered, want) in cases {
            assert_eq!(
                negotiate(&ae(values), offered),
                *want,
                "{values:?} {offered:?}"
            );
        }
    }

    #[test]
    fn qvalues() {
        assert_eq!(qvalue(b"1"), Some(1000));
        assert_eq!(qvalue(b"1.000"), Some(1000));
        assert_eq!(qvalue(b"0.125"), Some(125));
        assert_eq!(qvalue(b"0."), Some(0));
        assert_eq!(qvalue(b"0"), Some(0));
        for bad in [&b"1.001"[..], b"2", b"0.1234", b"", b".5", b"0.a", b"01"] {
            assert_eq!(qvalue(bad), None, "{bad:?}");
        }
    }

    pub fn decode(coding: Coding, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        match coding {
            Coding::Zstd => out = zstd::decode_all(data).unwrap(),
            Coding::Br => {
                brotli::Decompressor::new(data, 4096)
                    .read_to_end(&mut out)
                    .unwrap();
            }
            Coding::Gzip => {
                flate2::read::GzDecoder::new(data)
                    .read_to_end(&mut out)
                    .unwrap();
            }
        }
        out
    }

    #[tokio::test]
    async fn each_encoding_round_trips_and_is_made_once() {
        let body = Bytes::from(crate::testing::samples::json("eu", "a", "c", 1, 40));
        let encoded = Encoded::default();
        for coding in Coding::ALL {
            let (first, made) = encoded.get_or_make(coding, &body).await.unwrap();
            assert!(made);
            assert!(first.len() < body.len() / 2, "{coding:?}: {}", first.len());
            assert_eq!(decode(coding, &first), body);
            let (again, made) = encoded.get_or_make(coding, &body).await.unwrap();
            assert!(!made);
            assert_eq!(again.as_ptr(), first.as_ptr(), "the kept bytes, not a copy");
        }
        assert_eq!(encoded.made().count(), 3);
    }

    #[test]
    fn weak_etags_are_made_once_per_tag() {
        let encoded = Encoded::default();
        let v1 = HeaderValue::from_static("\"v1\"");
        let weak = encoded.weak_etag(&v1);
        assert_eq!(weak, "W/\"v1\"");
        assert_eq!(
            encoded.weak_etag(&v1).as_bytes().as_ptr(),
            weak.as_bytes().as_ptr()
        );
        // Another tag (a renewal's): still right.
        assert_eq!(
            encoded.weak_etag(&HeaderValue::from_static("\"v2\"")),
            "W/\"v2\""
        );
        let already = HeaderValue::from_static("W/\"w\"");
        assert_eq!(encoded.weak_etag(&already), already);
    }
}
