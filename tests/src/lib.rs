//! Helpers for the end-to-end suites: locating the built binary, temp workspaces, leak checks.

pub mod bin_path;
pub mod e2e;
pub mod faults;
pub mod hostile;
pub mod images;
pub mod pgimage;
pub mod readiness;
pub mod registry;
pub mod rootless;
pub mod sandbox;
