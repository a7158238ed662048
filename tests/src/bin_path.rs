//! Where the built `stagehand` binary is, for suites that run it as a user would.
//!
//! Owns: the path of the debug binary in the workspace's target directory. Does not own:
//! building it (`cargo build -p stagehand` first; a test cannot depend on another package's
//! binary through Cargo).

use std::path::{Path, PathBuf};

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The debug `stagehand` binary. Honours `CARGO_TARGET_DIR` when set.
///
/// # Panics
/// When the binary is missing, with the command that builds it.
pub fn stagehand_bin() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let target = if target.is_absolute() {
        target
    } else {
        workspace_root().join(target)
    };
    let bin = target.join("debug").join("stagehand");
    assert!(
        bin.is_file(),
        "{} is missing: build it first: cargo build -p stagehand",
        bin.display()
    );
    bin
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_root_holds_the_workspace_manifest() {
        let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
        assert!(manifest.contains("[workspace]"), "{manifest}");
    }
}
