//! Helpers for the end-to-end suites: locating the built binary, temp workspaces, leak checks.

pub mod bin_path;
pub mod e2e;
pub mod sandbox;
pub mod images;
pub mod readiness;
pub mod pgimage;
pub mod registry;
pub mod faults;
