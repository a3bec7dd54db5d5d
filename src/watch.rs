//! Values loaded from files that are read again when the file changes (a rotated Kubernetes
//! Secret, a renewed certificate, the config file itself), without a restart.
//!
//! A background task polls the file's metadata; polling instead of inotify because Kubernetes
//! swaps Secret and ConfigMap volumes through a symlink (`..data`), which inotify on the file
//! itself misses, and because a `stat` a second is nothing. A change that fails to load keeps
//! the old value and logs a warning: a half-written Secret must not take the gateway down.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

/// How often watched files are checked for changes.
pub const POLL: Duration = Duration::from_millis(500);

type Loader<T> = Box<dyn Fn(&[Vec<u8>]) -> Result<T, String> + Send + Sync>;

/// A value loaded from one source: fixed (an environment variable), watched files, or
/// stored by its owner (a fetched JWKS).
pub struct Watched<T> {
    current: ArcSwap<T>,
    /// Bumped on every change, so caches derived from the value can tell they are stale.
    version: AtomicU64,
    files: Option<Files<T>>,
}

/// The files a value is made from, how it is made, and what was last seen of them.
struct Files<T> {
    paths: Vec<PathBuf>,
    load: Loader<T>,
    seen: Mutex<Vec<Stamp>>,
}

impl<T: Send + Sync + 'static> Watched<T> {
    /// A value that never changes.
    pub fn fixed(value: T) -> Arc<Self> {
        Arc::new(Watched {
            current: ArcSwap::from_pointee(value),
            version: AtomicU64::new(0),
            files: None,
        })
    }

    /// Loads `path` now (an error here is a start-up error) and then follows its changes
    /// from a background task that ends when the returned value is dropped.
    pub fn file<F>(path: &Path, load: F) -> Result<Arc<Self>, String>
    where
        F: Fn(&[u8]) -> Result<T, String> + Send + Sync + 'static,
    {
        Self::files(&[path.to_path_buf()], move |contents| load(&contents[0]))
    }

    /// Like [`Watched::file`] for a value made from several files that change together (a
    /// certificate and its key): a change to any of them loads all of them again.
    pub fn files<F>(paths: &[PathBuf], load: F) -> Result<Arc<Self>, String>
    where
        F: Fn(&[Vec<u8>]) -> Result<T, String> + Send + Sync + 'static,
    {
        let seen = stamps(paths)?;
        let value = load(&read_all(paths)?)?;
        let watched = Arc::new(Watched {
            current: ArcSwap::from_pointee(value),
            version: AtomicU64::new(0),
            files: Some(Files {
                paths: paths.to_vec(),
                load: Box::new(load),
                seen: Mutex::new(seen),
            }),
        });
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(follow(Arc::downgrade(&watched)));
        }
        Ok(watched)
    }

    /// The current value.
    pub fn get(&self) -> Arc<T> {
        self.current.load_full()
    }

    /// Borrow the current value without touching its reference count (the hot path).
    pub fn load(&self) -> arc_swap::Guard<Arc<T>> {
        self.current.load()
    }

    /// Replaces the value.
    pub fn store(&self, value: T) {
        self.current.store(Arc::new(value));
        self.version.fetch_add(1, Ordering::Release);
    }

    /// How many times the value has changed.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Looks at the files now instead of at the next poll (`SIGHUP`), and loads them again if
    /// they changed; a value that does not load keeps the last good one. Blocking file I/O:
    /// call it off the async threads. A fixed value has nothing to look at.
    pub fn check_now(&self) -> Result<(), String> {
        let Some(files) = &self.files else {
            return Ok(());
        };
        let now = stamps(&files.paths)?;
        if *lock(&files.seen) == now {
            return Ok(());
        }
        let value = (files.load)(&read_all(&files.paths)?)?;
        *lock(&files.seen) = now;
        self.store(value);
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read_all(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>, String> {
    paths
        .iter()
        .map(|p| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display())))
        .collect()
}

pub(crate) fn stamps(paths: &[PathBuf]) -> Result<Vec<Stamp>, String> {
    paths
        .iter()
        .map(|p| Stamp::of(p).map_err(|e| format!("cannot read {}: {e}", p.display())))
        .collect()
}

async fn follow<T: Send + Sync + 'static>(watched: Weak<Watched<T>>) {
    let mut missing = false;
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(strong) = watched.upgrade() else {
            return;
        };
        let Some(files) = &strong.files else { return };
        let shown = files
            .paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let list = files.paths.clone();
        drop(strong);
        let now = match tokio::task::spawn_blocking(move || stamps(&list)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                // Gone for a moment during a Secret swap, or removed: keep the last good value.
                if !missing {
                    tracing::warn!(file = %shown, error = %e, "watched file unreadable; keeping the last good value");
                    missing = true;
                }
                continue;
            }
            Err(_) => continue,
        };
        missing = false;
        let Some(strong) = watched.upgrade() else {
            return;
        };
        let Some(files) = &strong.files else { return };
        {
            let mut seen = lock(&files.seen);
            if *seen == now {
                continue;
            }
            *seen = now;
        }
        let paths = files.paths.clone();
        let contents = match tokio::task::spawn_blocking(move || read_all(&paths)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::warn!(file = %shown, error = %e, "changed file unreadable; keeping the last good value");
                continue;
            }
            Err(_) => continue,
        };
        match (files.load)(&contents) {
            Ok(value) => {
                strong.store(value);
                tracing::info!(file = %shown, "reloaded changed file");
            }
            Err(e) => {
                // Often the first of two files of a pair: the next change loads both again.
                tracing::warn!(file = %shown, error = %e, "changed file does not load; keeping the last good value");
            }
        }
    }
}

/// What tells one version of a file from the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Stamp {
    pub(crate) fn of(path: &Path) -> std::io::Result<Stamp> {
        // `metadata` follows symlinks, so a Kubernetes `..data` swap shows as a new inode.
        let meta = std::fs::metadata(path)?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&meta);
        #[cfg(not(unix))]
        let inode = 0;
        Ok(Stamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode,
        })
    }
}
