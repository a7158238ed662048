//! Fuzz target `expression`: bytes → the expression parsers (`<+...>` templates, conditions,
//! runtime-input helpers) and, for what parses, the evaluator against a resolver that knows
//! every name.
//!
//! Checks: nothing panics or hangs, error offsets lie inside the text, and evaluation of a
//! parsed expression returns (a value or an error). Does not check the values themselves
//! (the unit tests in `runner/src/expr/` do).
#![no_main]

use libfuzzer_sys::fuzz_target;
use stagehand::expr::{self, Path, Val};

fn resolver(p: &Path) -> Result<Val, String> {
    // Different kinds by name, so comparisons and methods see strings, numbers and booleans.
    let depth = p.names().map_or(0, |n| n.len());
    Ok(match depth % 4 {
        0 => Val::Str("main".into()),
        1 => Val::Num(42.0),
        2 => Val::Bool(true),
        _ => Val::Null,
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match expr::parse_template(text) {
        Ok(t) => {
            let _ = expr::render(&t, &resolver);
            let _ = t.references();
        }
        Err(e) => {
            assert!(e.offset <= text.len(), "offset {} past {}", e.offset, text.len());
            // Every error, not only the first: the first is the same, all lie in the text.
            let all = expr::template_errors(text);
            assert_eq!(all.first().map(|f| f.offset), Some(e.offset));
            for f in &all {
                assert!(f.offset <= text.len(), "offset {} past {}", f.offset, text.len());
            }
        }
    }
    match expr::parse_condition(text) {
        Ok(e) => {
            if let Ok(v) = expr::eval(&e, &resolver) {
                let _ = expr::truthy(&v);
            }
            let _ = expr::references(&e);
        }
        Err(e) => assert!(e.offset <= text.len(), "offset {} past {}", e.offset, text.len()),
    }
    let _ = expr::parse_input(text);
});
