//! Logging: `tracing` to stdout through a non-blocking, batching writer, JSON by default.
//!
//! The access line (target `access`, one per request) has a formatter of its own in JSON mode:
//! tracing-subscriber's JSON formatter costs about 2 µs a line, a fifth of a cache hit, while
//! writing the few known fields by hand costs a tenth of that. Other lines keep the standard
//! formatter, and the access line is still an ordinary `tracing` event, so filters and other
//! subscribers see it as usual.

mod access_json;
mod writer;

use std::sync::OnceLock;

use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{filter, reload, EnvFilter, Layer, Registry};

pub use self::access_json::AccessJson;
use self::writer::stdout_file;
pub use self::writer::{BatchWriter, LogGuard};
use crate::config::LogFormat;

/// The `tracing` target of the one-line-per-request access log.
pub const ACCESS: &str = "access";

/// Changes the level of the installed subscriber (a reload); `RUST_LOG`, when set, still wins.
static SET_LEVEL: OnceLock<SetLevel> = OnceLock::new();

type SetLevel = Box<dyn Fn(&str) + Send + Sync>;

/// Sets the log level to `level` (a level or filter directive, validated by the config), unless
/// `RUST_LOG` is set; nothing before [`init`].
pub fn set_level(level: &str) {
    if let Some(set) = SET_LEVEL.get() {
        set(level);
    }
}

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `level`. Keep the guard
/// alive until exit so buffered lines are flushed.
pub fn init(format: LogFormat, level: &str) -> LogGuard {
    let (writer, guard) = BatchWriter::start(stdout_file());
    let (filter, handle) = reload::Layer::new(env_filter(level));
    let _ = SET_LEVEL.set(Box::new(move |level: &str| {
        if rust_log().is_none() {
            let _ = handle.reload(EnvFilter::new(level));
        }
    }));
    let result = match format {
        LogFormat::Json => json_subscriber(filter, writer).try_init(),
        LogFormat::Text => tracing_subscriber::registry()
            .with(filter)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(writer),
            )
            .try_init(),
    };
    if let Err(e) = result {
        eprintln!("logging already initialised: {e}");
    }
    guard
}

/// The JSON-mode subscriber: tracing-subscriber's JSON formatter for every line but the access
/// line, which [`AccessJson`] writes. [`init`] installs it; the benchmarks build it over a sink.
pub fn json_subscriber<F, W>(filter: F, writer: W) -> impl Subscriber + Send + Sync
where
    F: Layer<Registry> + Send + Sync + 'static,
    W: for<'w> MakeWriter<'w> + Clone + Send + Sync + 'static,
{
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .with_writer(writer.clone())
                .with_filter(filter::filter_fn(|m| m.target() != ACCESS)),
        )
        .with(AccessJson { writer })
}

fn rust_log() -> Option<String> {
    std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty())
}

/// The filter for `level`, or `RUST_LOG` when it is set.
pub fn env_filter(level: &str) -> EnvFilter {
    match rust_log() {
        Some(v) => EnvFilter::try_new(v).unwrap_or_else(|_| EnvFilter::new(level)),
        None => EnvFilter::new(level),
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    /// A writer into memory, for the log tests.
    #[derive(Clone, Default)]
    pub struct Captured(pub Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }
}
