//! stagehand: a daemonless runner for Harness-CI-style pipeline stages.
//!
//! This crate is the only one that knows what a pipeline is and the only one that talks to the
//! user. `supervisor` runs processes; `oci` runs containers.

pub mod yaml;
