//! Fuzz target `layer_unpack`: bytes as an image layer (a tar, or a gzip or zstd of one) →
//! stagehand-oci's layer unpacker, into a fresh directory.
//!
//! Checks: nothing panics or hangs, and nothing is written outside the target directory: the
//! target sits three levels below a scratch directory that must hold nothing else afterwards
//! (so `../` escapes and symlinks that point up are caught). Unprivileged mode: no chown,
//! no device nodes. Does not check what a valid layer unpacks to (the oci unit tests do).
#![no_main]

use std::io::Cursor;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use stagehand_oci::unpack::{UnpackOptions, WhiteoutFormat, unpack};

/// Every path under `dir`, without following symlinks.
fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        out.push(p.clone());
        if is_dir {
            walk(&p, out);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let scratch = tempfile::Builder::new()
        .prefix("stagehand-fuzz-unpack")
        .tempdir()
        .expect("a scratch directory");
    let outer = scratch.path().join("a/b/c");
    let target = outer.join("root");
    std::fs::create_dir_all(&target).expect("create the target");
    for whiteouts in [WhiteoutFormat::Overlay, WhiteoutFormat::Oci] {
        let opts = UnpackOptions {
            whiteouts,
            privileged: false,
        };
        let _ = unpack(&mut Cursor::new(data), &target, opts, "fuzz-layer");
        let mut all = Vec::new();
        walk(scratch.path(), &mut all);
        let outside: Vec<_> = all
            .iter()
            .filter(|p| !p.starts_with(&target) && !outer.starts_with(p.as_path()) && **p != target)
            .collect();
        assert!(outside.is_empty(), "written outside the target: {outside:?}");
        // The next format starts from an empty target again.
        let _ = std::fs::remove_dir_all(&target);
        std::fs::create_dir_all(&target).expect("recreate the target");
    }
});
