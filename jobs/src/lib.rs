//! Hive's domain, in layers that import downward only (README, "Layout"):
//!
//! - top: `engine` (runs a node's steps), `requests` and `billing` (what the app and Stripe ask),
//!   `stripe_events`, `reconcile`, `operator`, `usage`, `conditions`;
//! - `policy`: what a step's result means (pure);
//! - `steps/`: one file per resource, on the cloud clients; `store/`: all SQL;
//! - `cloud/`: the providers' clients, taking calls from a budget ledger the store implements;
//! - `metrics`, `connections`, `user_data`, `telemetry`; `config/`;
//! - bottom: `model/`, the node, its states and the workflow table, importing nothing.

// Layer by layer, bottom first.
pub mod model;

pub mod config;
pub mod connections;
pub mod metrics;
pub mod telemetry;
pub mod user_data;

pub mod cloud;

pub mod store;

pub mod steps;

pub mod policy;

pub mod billing;
pub mod conditions;
pub mod engine;
pub mod operator;
pub mod reconcile;
pub mod requests;
pub mod stripe_events;
pub mod usage;
