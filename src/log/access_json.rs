//! The access line's own JSON formatter: a tenth of tracing-subscriber's JSON formatter's
//! cost for the few known fields of the one line per request.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

use super::ACCESS;

/// Writes `access` events as JSON lines shaped like the standard formatter's:
/// `{"timestamp":"…","level":"INFO","request_id":"…",…,"message":"request","target":"access"}`.
pub struct AccessJson<W> {
    pub writer: W,
}

impl<S, W> Layer<S> for AccessJson<W>
where
    S: Subscriber,
    W: for<'w> MakeWriter<'w> + 'static,
{
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != ACCESS {
            return;
        }
        LINE.with(|line| {
            let Ok(mut line) = line.try_borrow_mut() else {
                return;
            };
            line.clear();
            line.push_str("{\"timestamp\":\"");
            timestamp(&mut line, SystemTime::now());
            line.push_str("\",\"level\":\"");
            line.push_str(event.metadata().level().as_str());
            line.push('"');
            let mut fields = Fields {
                line: &mut line,
                message: None,
            };
            event.record(&mut fields);
            if let Some(message) = fields.message.take() {
                line.push_str(",\"message\":");
                json_string(&mut line, &message);
            }
            line.push_str(",\"target\":\"access\"}\n");
            let _ = self.writer.make_writer().write_all(line.as_bytes());
        });
    }
}

thread_local! {
    static LINE: RefCell<String> = RefCell::new(String::with_capacity(512));
    /// The formatted date and time of the last whole second seen on this thread.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

struct Fields<'a> {
    line: &'a mut String,
    message: Option<String>,
}

impl Fields<'_> {
    fn key(&mut self, field: &Field) {
        self.line.push_str(",\"");
        self.line.push_str(field.name());
        self.line.push_str("\":");
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = Some(value.to_string());
            return;
        }
        self.key(field);
        json_string(self.line, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        self.line.push_str(itoa::Buffer::new().format(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        self.line.push_str(itoa::Buffer::new().format(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        if value.is_finite() && value.abs() < 1e15 {
            // Durations in ms: three decimals (microseconds) are all they need, and integer
            // formatting is several times cheaper than float formatting.
            let micros = (value * 1000.0).round() as i64;
            if micros < 0 {
                self.line.push('-');
            }
            let micros = micros.unsigned_abs();
            self.line
                .push_str(itoa::Buffer::new().format(micros / 1000));
            let frac = micros % 1000;
            if frac != 0 {
                self.line.push('.');
                let digits = [
                    b'0' + (frac / 100) as u8,
                    b'0' + (frac / 10 % 10) as u8,
                    b'0' + (frac % 10) as u8,
                ];
                let end = if digits[2] != b'0' {
                    3
                } else if digits[1] != b'0' {
                    2
                } else {
                    1
                };
                for d in &digits[..end] {
                    self.line.push(char::from(*d));
                }
            }
        } else if value.is_finite() {
            let _ = write!(self.line, "{value}");
        } else {
            self.line.push_str("null");
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        self.line.push_str(if value { "true" } else { "false" });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.message = Some(text);
            return;
        }
        self.key(field);
        json_string(self.line, &text);
    }
}

/// Appends `s` as a JSON string literal.
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push_str(s);
    } else {
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c => out.push(c),
            }
        }
    }
    out.push('"');
}

/// RFC 3339 UTC with microseconds, like the standard formatter: `2026-11-27T14:52:52.223658Z`.
fn timestamp(out: &mut String, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.0 != secs {
            let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
            let rem = secs % 86_400;
            cell.1.clear();
            let _ = write!(
                cell.1,
                "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}",
                rem / 3600,
                rem % 3600 / 60,
                rem % 60
            );
            cell.0 = secs;
        }
        out.push_str(&cell.1);
    });
    let micros = since.subsec_micros();
    out.push('.');
    for shift in [100_000, 10_000, 1_000, 100, 10, 1] {
        out.push(char::from(b'0' + (micros / shift % 10) as u8));
    }
    out.push('Z');
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::testing::Captured;
    use std::time::Duration;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_784), (2026, 11, 27));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        let mut s = String::new();
        timestamp(
            &mut s,
            UNIX_EPOCH + Duration::from_micros(1_795_791_172_223_658),
        );
        assert_eq!(s, "2026-11-27T14:52:52.223658Z");
    }

    #[test]
    fn escaping() {
        let mut s = String::new();
        json_string(&mut s, "a\"b\\c\nd\u{1}é");
        assert_eq!(s, r#""a\"b\\c\nd\u0001é""#);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v, "a\"b\\c\nd\u{1}é");
    }

    #[test]
    fn access_lines_are_json_with_typed_fields() {
        let out = Captured::default();
        let subscriber = tracing_subscriber::registry().with(AccessJson {
            writer: out.clone(),
        });
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(
                target: "access",
                request_id = "r-1",
                team = "we \"quote\"",
                status = 200u16,
                duration_ms = 0.041_234_5,
                other_ms = 12.5,
                big = -3.0005,
                upstream_ms = 0.0,
                "request"
            );
            tracing::info!(target: "other", "not an access line");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["request_id"], "r-1");
        assert_eq!(v["team"], "we \"quote\"");
        assert_eq!(v["status"], 200);
        assert_eq!(v["duration_ms"], 0.041);
        assert!(lines[0].contains("\"upstream_ms\":0,"), "{}", lines[0]);
        assert_eq!(v["upstream_ms"], 0.0);
        assert_eq!(v["other_ms"], 12.5);
        assert_eq!(v["big"], -3.001);
        assert_eq!(v["message"], "request");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "access");
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
    }
}
