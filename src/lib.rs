//! Tollgate: an LLM gateway for Anthropic-format traffic, built on Pingora.
//!
//! The request path lives in [`proxy`]; the pure pieces it calls (wire formats, routing,
//! pricing) are in their own modules so they can be tested and benchmarked without I/O.

pub mod admin;
pub mod alerts;
pub mod audit;
pub mod auth;
pub mod background;
pub mod blocking;
pub mod cli;
pub mod config;
pub mod connections;
pub mod glob;
pub mod limits;
pub mod login;
pub mod metering;
pub mod metrics;
pub mod mock;
pub mod protocol;
pub mod providers;
pub mod proxy;
pub mod refresh;
pub mod routing;
pub mod runtime;
pub mod server;
pub mod sso;
pub mod store;
pub mod telemetry;
pub mod tls;
