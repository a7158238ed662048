//! stagehand: a daemonless runner for Harness-CI-style pipeline stages.
//!
//! This crate is the only one that knows what a pipeline is and the only one that talks to the
//! user. `supervisor` runs processes; `oci` runs containers.

pub mod yaml;
pub mod units;
pub mod expr;
pub mod diag;
pub mod model;
pub mod inputs;
pub mod load;
pub mod validate;
pub mod plan;
pub mod context;
pub mod exec;
pub mod output;
pub mod schedule;
pub mod cli;
pub mod reports;
