//! Sealed values: every value written to Redis is encrypted and authenticated with AES-256-GCM
//! (aws-lc-rs), a random 96-bit nonce each, and the Redis key as associated data, so a value
//! moved to another key does not open. The first key of `encryption_key_file` seals; every key
//! in it opens, so keys rotate by adding the new one first and dropping the old one later.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use base64::Engine as _;

/// A value's layout: a format byte, the nonce, the ciphertext and its tag.
const FORMAT: u8 = 1;

/// The keys of `encryption_key_file`, first to last.
pub struct Keys(Vec<LessSafeKey>);

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys({} keys)", self.0.len())
    }
}

impl Keys {
    /// Parses the file: base64 32-byte keys, one a line; blank lines and `#` comments are
    /// skipped. Errors name the line, never its content.
    pub fn parse(text: &[u8]) -> Result<Keys, String> {
        let text =
            std::str::from_utf8(text).map_err(|_| "the key file is not UTF-8".to_string())?;
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(line)
                .map_err(|_| format!("line {}: not base64", i + 1))?;
            if bytes.len() != 32 {
                return Err(format!(
                    "line {}: a key is 32 bytes (base64 of 32 random bytes), this one is {}",
                    i + 1,
                    bytes.len()
                ));
            }
            let key = UnboundKey::new(&AES_256_GCM, &bytes)
                .map_err(|_| format!("line {}: not an AES-256 key", i + 1))?;
            keys.push(LessSafeKey::new(key));
        }
        if keys.is_empty() {
            return Err("no key in the file (base64 of 32 random bytes, one a line)".to_string());
        }
        Ok(Keys(keys))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Seals `plain` for the Redis key `key`.
    pub fn seal(&self, key: &[u8], plain: &[u8]) -> Option<Vec<u8>> {
        let sealing = self.0.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + plain.len() + AES_256_GCM.tag_len());
        out.push(FORMAT);
        out.extend_from_slice(&nonce);
        let start = out.len();
        out.extend_from_slice(plain);
        let mut body = out.split_off(start);
        sealing
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(key),
                &mut body,
            )
            .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    /// Opens a value read from the Redis key `key`; `None` when no key opens it (tampered,
    /// moved from another key, or sealed under a key no longer listed).
    pub fn open(&self, key: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let (&format, rest) = sealed.split_first()?;
        if format != FORMAT || rest.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return None;
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
        for k in &self.0 {
            let mut buf = body.to_vec();
            if let Ok(plain) = k.open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(key),
                &mut buf,
            ) {
                let n = plain.len();
                buf.truncate(n);
                return Some(buf);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_line(byte: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([byte; 32])
    }

    #[test]
    fn sealed_values_open_only_under_their_key_and_redis_key() {
        let keys = Keys::parse(format!("# current\n{}\n\n", key_line(1)).as_bytes()).unwrap();
        let sealed = keys.seal(b"p:e:a:c:json", b"the export").unwrap();
        assert!(
            !sealed.windows(10).any(|w| w == b"the export"),
            "no plaintext"
        );
        assert_eq!(keys.open(b"p:e:a:c:json", &sealed).unwrap(), b"the export");
        // Moved to another key, or tampered with: does not open.
        assert!(keys.open(b"p:e:a:c:csv", &sealed).is_none());
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(keys.open(b"p:e:a:c:json", &tampered).is_none());
        assert!(keys.open(b"p:e:a:c:json", b"").is_none());
        // Two seals of one value differ (fresh nonce).
        assert_ne!(sealed, keys.seal(b"p:e:a:c:json", b"the export").unwrap());
    }

    #[test]
    fn rotation_seals_with_the_first_key_and_opens_with_any() {
        let old = Keys::parse(key_line(1).as_bytes()).unwrap();
        let sealed_old = old.seal(b"k", b"v").unwrap();
        let rotated =
            Keys::parse(format!("{}\n{}\n", key_line(2), key_line(1)).as_bytes()).unwrap();
        assert_eq!(rotated.open(b"k", &sealed_old).unwrap(), b"v");
        let sealed_new = rotated.seal(b"k", b"v").unwrap();
        assert!(
            old.open(b"k", &sealed_new).is_none(),
            "sealed with the new key"
        );
        let dropped = Keys::parse(key_line(2).as_bytes()).unwrap();
        assert!(dropped.open(b"k", &sealed_old).is_none());
    }

    #[test]
    fn bad_key_files_name_the_line_not_the_key() {
        for (text, want) in [
            ("", "no key"),
            ("not base64!", "line 1: not base64"),
            ("\n\nc2hvcnQ=", "line 3: a key is 32 bytes"),
        ] {
            let e = Keys::parse(text.as_bytes()).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains("c2hvcnQ"), "{e}");
        }
    }
}
