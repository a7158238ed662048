//! stagehand: a daemonless runner for Harness-CI-style pipeline stages.
//!
//! This crate is the only one that knows what a pipeline is and the only one that talks to the
//! user. `supervisor` runs processes; `oci` runs containers.

pub mod cli;
pub mod context;
pub mod diag;
pub mod doctor;
pub mod exec;
pub mod expr;
pub mod inputs;
pub mod load;
pub mod model;
pub mod output;
pub mod plan;
pub mod reports;
pub mod schedule;
pub mod sequence;
pub mod units;
pub mod validate;
pub mod yaml;
