//! convocore-gateway: a caching gateway in front of the Convocore V3 export API.
//!
//! `main`, the demo and the tests all start it the same way: build an [`App`] from a
//! [`Config`], bind [`Listeners`], and call [`run`] with a shutdown future.

pub mod admin;
pub mod api;
pub mod app;
pub mod auth;
pub mod cache;
pub mod config;
pub mod demo;
pub mod error;
pub mod jwks;
pub mod keys;
pub mod log;
pub mod metrics;
pub mod mock;
pub mod pool;
pub mod route;
pub mod routing;
pub mod server;
pub mod upstream;
pub mod watch;

pub use app::App;
pub use config::{Config, ConfigError};
pub use server::{run, Listeners};
