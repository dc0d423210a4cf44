//! pond-http: the HTTP face of Pond — the only crate that knows HTTP and JSON wire shapes.
//!
//! - [`api`]: the axum router (`/v1` consumer and admin routes, health) — [`api::app`];
//! - [`auth`]: bearer tokens (stored hashed) and the [`auth::Principal`] extractor;
//! - [`error`]: [`error::ApiError`], the single error → status mapping;
//! - [`wire`]: request and response shapes shared with the client;
//! - [`client`]: the typed blocking client the CLI uses;
//! - [`server`]: assembly of a whole server (store, engine, driver, HTTP) — [`server::start`];
//! - [`bench`]: the `pond bench` benchmark program;
//! - [`cli`]: the client-side commands of the `pond` binary (contexts, submit, wait, …).
#![deny(missing_docs)]

pub mod api;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod client;
pub mod error;
pub mod server;
pub mod state;
pub mod wire;
