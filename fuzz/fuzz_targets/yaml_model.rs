//! Fuzz target `yaml_model`: bytes → stagehand's YAML parse, runtime-input resolution, load,
//! validation and rendering, as `stagehand validate` runs them.
//!
//! Checks: nothing panics or hangs, and every diagnostic's `line:col` is inside the text
//! (1:1 for an empty one). Does not check which diagnostics appear (the validation corpus does).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The CLI refuses non-UTF-8 before parsing; the replacement characters still reach the parser.
    let text = String::from_utf8_lossy(data);
    let (mut diags, _) = stagehand::validate::check_source(
        Path::new("fuzz.yaml"),
        &text,
        &stagehand::inputs::InputValues::default(),
        false,
    );
    diags.finish();
    let _ = diags.render(&text, false);
    let lines: Vec<&str> = text.lines().collect();
    for d in &diags.items {
        let (l, c) = (d.pos.line as usize, d.pos.col as usize);
        let inside = (l, c) == (1, 1)
            || (l >= 1
                && c >= 1
                && lines
                    .get(l - 1)
                    .is_some_and(|line| c <= line.chars().count() + 1));
        assert!(
            inside,
            "{:?} at {l}:{c} is outside the text ({} lines): {}",
            d.severity,
            lines.len(),
            d.message
        );
    }
});
