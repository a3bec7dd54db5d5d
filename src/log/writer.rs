//! The log writer: lines are batched in memory and written by a thread of its own, so a
//! request never waits on stdout.

use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// Unwritten log bytes held at most; past this, lines are dropped (and counted) rather than
/// making a request wait on a slow stdout.
const MAX_PENDING: usize = 8 << 20;
/// The writer thread writes when this much is pending, or every [`FLUSH_EVERY`].
const FLUSH_AT: usize = 64 << 10;
const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// A log writer that never makes the caller wait on stdout, and does not wake another thread
/// per line either: a line is appended to a shared buffer (a copy under a short lock), and a
/// writer thread writes the buffer out in one call when it passes [`FLUSH_AT`] or every
/// [`FLUSH_EVERY`], whichever comes first. (A channel per line would wake the writer thread for
/// nearly every request, which costs more than the request itself on a busy core.)
#[derive(Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
}

#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    dropped: u64,
    closed: bool,
}

/// Flushes what is pending and stops the writer thread when dropped (waiting at most 2 s).
pub struct LogGuard {
    shared: Arc<Shared>,
    done: mpsc::Receiver<()>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        lock(&self.shared.pending).closed = true;
        self.shared.wake.notify_one();
        let _ = self.done.recv_timeout(Duration::from_secs(2));
    }
}

fn lock(m: &Mutex<Pending>) -> MutexGuard<'_, Pending> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BatchWriter {
    /// Starts the writer thread over `out`.
    pub fn start(mut out: Box<dyn std::io::Write + Send>) -> (BatchWriter, LogGuard) {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
        });
        let (done_tx, done) = mpsc::channel();
        let writer_side = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || {
                let mut spare = Vec::with_capacity(FLUSH_AT * 2);
                loop {
                    let mut pending = lock(&writer_side.pending);
                    if pending.buf.len() < FLUSH_AT && !pending.closed {
                        pending = writer_side
                            .wake
                            .wait_timeout(pending, FLUSH_EVERY)
                            .map(|(g, _)| g)
                            .unwrap_or_else(|p| p.into_inner().0);
                    }
                    std::mem::swap(&mut pending.buf, &mut spare);
                    let dropped = std::mem::take(&mut pending.dropped);
                    let closed = pending.closed;
                    drop(pending);
                    if !spare.is_empty() {
                        let _ = out.write_all(&spare);
                        let _ = out.flush();
                        spare.clear();
                        if spare.capacity() > FLUSH_AT * 4 {
                            spare.shrink_to(FLUSH_AT * 2);
                        }
                    }
                    if dropped > 0 {
                        eprintln!(
                            "convocore-gateway: stdout too slow, {dropped} log lines dropped"
                        );
                    }
                    if closed {
                        let _ = done_tx.send(());
                        return;
                    }
                }
            });
        if spawned.is_err() {
            eprintln!("convocore-gateway: cannot start the log writer thread; logs go nowhere");
        }
        (
            BatchWriter {
                shared: shared.clone(),
            },
            LogGuard { shared, done },
        )
    }
}

impl std::io::Write for BatchWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut pending = lock(&self.shared.pending);
        if pending.buf.len() + line.len() > MAX_PENDING {
            pending.dropped += 1;
            return Ok(line.len());
        }
        let before = pending.buf.len();
        pending.buf.extend_from_slice(line);
        let crossed = before < FLUSH_AT && pending.buf.len() >= FLUSH_AT;
        drop(pending);
        if crossed {
            self.shared.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = BatchWriter;

    fn make_writer(&'a self) -> BatchWriter {
        self.clone()
    }
}

/// stdout without std's line buffering (the batching writer flushes after each batch).
#[cfg(unix)]
pub(super) fn stdout_file() -> Box<dyn std::io::Write + Send> {
    use std::os::fd::AsFd;
    match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => Box::new(std::fs::File::from(fd)),
        Err(_) => Box::new(std::io::stdout()),
    }
}

#[cfg(not(unix))]
pub(super) fn stdout_file() -> Box<dyn std::io::Write + Send> {
    Box::new(std::io::stdout())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::testing::Captured;

    #[test]
    fn batch_writer_keeps_order_and_flushes_on_drop() {
        use std::io::Write as _;
        let out = Captured::default();
        let (writer, guard) = BatchWriter::start(Box::new(out.clone()));
        let mut w = writer.clone();
        for i in 0..10_000 {
            w.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        drop(guard);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 10_000);
        assert_eq!(lines[0], "line 0");
        assert_eq!(lines[9_999], "line 9999");
    }
}
