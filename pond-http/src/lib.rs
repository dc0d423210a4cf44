//! pond-http: the HTTP face of Pond — the only crate that knows HTTP and JSON wire shapes.
//!
//! - [`agents_api`]: the admin model and harness registry routes;
//! - [`api`]: the axum router (`/v1` consumer and admin routes, health) — [`api::app`];
//! - [`auth`]: bearer tokens (stored hashed) and the [`auth::Principal`] extractor;
//! - [`boundary`]: what every request crosses (body limits, JSON errors, NUL refusal,
//!   lingering close);
//! - [`error`]: [`error::ApiError`], the single error → status mapping;
//! - [`openapi`]: the OpenAPI 3.1 documents, generated from the routers, and the `/docs` page;
//! - [`console`]: the web console at `/` (embedded files, strict CSP; a client of `/v1`);
//! - [`orch`]: pond's side of the pool protocol (`/v1/orch`, admin pool routes);
//! - [`pool_wire`]: the pool protocol's wire shapes;
//! - [`orchestrator`]: the `pond orchestrator` process (worker API, batched long polls to pond);
//! - [`pool_client`]: pool calls on the client, and the worker's HTTP client;
//! - [`worker_process`]: assembly of a `pond worker` (keys, enrollment, executors);
//! - [`wire`]: request and response shapes shared with the client;
//! - [`client`]: the typed blocking client the CLI uses;
//! - [`server`]: assembly of a whole server (store, engine, driver, HTTP) — [`server::start`];
//! - [`broker`]: the key-swapping reverse proxy agents reach their model API through;
//! - [`bench`]: the `pond bench` benchmark program;
//! - [`cli`]: the client-side commands of the `pond` binary (contexts, submit, wait, …).
#![deny(missing_docs)]

pub mod agent_bench;
pub mod agents_api;
pub mod api;
pub mod auth;
pub mod bench;
pub mod boundary;
pub mod broker;
pub mod cli;
pub mod client;
pub mod console;
pub mod console_bench;
pub mod doctor;
pub mod error;
pub mod events_api;
pub mod events_bench;
pub mod events_client;
pub mod keys_api;
pub mod metrics;
pub mod openapi;
pub mod orch;
pub mod orchestrator;
pub mod pool_client;
pub mod pool_wire;
pub mod server;
pub mod state;
pub mod tls;
pub mod usage_api;
pub mod verify;
pub mod webhooks;
pub mod wire;
pub mod worker_process;
