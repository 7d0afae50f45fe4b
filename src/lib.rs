//! switchyard: an L7 reverse-proxy load balancer for zero-downtime deployments.
//!
//! The per-request path starts in [`proxy`]; listeners and lifecycle live in [`server`];
//! every traffic change goes through [`control`]. Imports point one way, from
//! [`server`] down to [`config`], which is data only ([`setup`] loads the files it
//! names); the README's layout table lists the layers and `.ci/import-cycles` holds
//! the code to them. Stand-in app servers and load clients live outside the library, in
//! the `switchyard-standins` crate.

pub mod accesslog;
pub mod admin;
pub mod backend;
pub mod balancer;
pub mod body;
pub mod client;
pub mod client_io;
pub mod cluster;
pub mod config;
pub mod control;
pub mod ctl;
pub mod error;
pub mod gather;
pub mod headers;
pub mod health;
pub mod idle_timer;
pub mod metrics;
pub mod mirror;
pub mod proxy;
pub mod random;
pub mod resolve;
pub mod rollout;
pub mod routing;
pub mod server;
pub mod setup;
pub mod split;
pub mod state;
pub mod stats;
pub mod tls;
pub mod upstream_h1;
pub mod webhook;
pub mod worker;
