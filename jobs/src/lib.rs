//! Hive's domain: the node model and its intent, the workflows (declared in `workflows`, their
//! steps in `steps/`, run by `engine` as `policy` decides), the store, the job queue and the
//! cloud clients the worker drives.

pub mod billing;
pub mod cloud;
pub mod conditions;
pub mod config;
pub mod connections;
pub mod engine;
pub mod metrics;
pub mod model;
pub mod operator;
pub mod policy;
pub mod queue;
pub mod reconcile;
pub mod requests;
pub mod steps;
pub mod store;
pub mod stripe_events;
pub mod telemetry;
pub mod usage;
pub mod user_data;
pub mod workflows;
