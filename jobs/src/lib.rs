//! Hive's domain: the node model, its provisioning state machine, the store, the job queue and
//! the cloud clients the worker drives.

pub mod cloud;
pub mod config;
pub mod model;
pub mod operator;
pub mod provision;
pub mod queue;
pub mod reconcile;
pub mod store;
pub mod telemetry;
pub mod user_data;
