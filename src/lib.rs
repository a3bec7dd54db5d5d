//! convocore-gateway: a caching gateway in front of the Convocore V3 export API.
//!
//! Module map: `config` → `state` (durable [`State`], per-config `Policy`) → `server`
//! (listeners, drain) → `http` (route → verify → authorize → cache → upstream → respond,
//! access line) over `auth`, `cache`, `upstream`; `admin`, `reload`, `tls`, `metrics`, `log`,
//! `error`, `domain`, `clock`, `watch`, `compress` (encodings, negotiation), `traffic` (team buckets, fair queues, pauses, breakers,
//! retries); `demo` and `testing` (the mock Convocore). No cycles:
//! `domain` and `metrics` depend on nothing of the crate's but `domain`.
//!
//! `main`, the demo and the tests all start it the same way: build a [`State`] from a
//! [`Config`], bind [`Listeners`], and call [`run`] with a shutdown future.

pub mod admin;
pub mod auth;
pub mod cache;
pub mod clock;
pub mod compress;
pub mod config;
pub mod demo;
pub mod domain;
pub mod error;
pub mod http;
pub mod log;
pub mod metrics;
pub mod reload;
pub mod server;
pub mod shared;
pub mod state;
pub mod testing;
pub mod tls;
pub mod traffic;
pub mod upstream;
pub mod watch;

pub use config::{Config, ConfigError};
pub use server::{run, run_with, Limits, Listeners};
pub use state::{Policy, State};
