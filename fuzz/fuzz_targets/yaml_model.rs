//! Fuzz target `yaml_model`: bytes → stagehand's YAML parse, runtime-input resolution, load,
//! validation and rendering, as `stagehand validate` runs them.
//!
//! Checks: nothing panics or hangs, and every diagnostic's `line:col` is inside the text
//! (1:1 for an empty one). Does not check which diagnostics appear (the validation corpus does).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use stagehand::diag::Diagnostics;

fuzz_target!(|data: &[u8]| {
    // The CLI refuses non-UTF-8 before parsing; the replacement characters still reach the parser.
    let text = String::from_utf8_lossy(data);
    let mut diags = Diagnostics::new(Path::new("fuzz.yaml"));
    match stagehand::yaml::parse(&text) {
        Err(e) => diags.error(e.pos, e.message),
        Ok(mut root) => {
            let outcome = stagehand::inputs::resolve(
                &mut root,
                &stagehand::inputs::InputValues::default(),
                false,
            );
            for b in &outcome.bad {
                diags.error(b.pos, b.message.clone());
            }
            if let Some(p) = stagehand::load::load(&root, &mut diags) {
                stagehand::validate::validate(&p, &text, &mut diags);
            }
        }
    }
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
