//! [`Expr`] → [`Val`], and [`Template`] → text.
//!
//! Owns: the semantics of operators and methods (JEXL-like coercions), truthiness, and how
//! values print.
//! Does not own: parsing, or looking references up (the caller's [`Resolver`]).
//!
//! Coercion rules, chosen so the conditions people write behave as they read:
//! - `==`/`!=`: two strings compare as text (`"1.10" != "1.1"`, a version is not a number); a
//!   string against a number compares numerically when the string is a number; a string
//!   against a boolean compares `"true"`/`"false"` case-insensitively (JEXL does, and Harness
//!   variables are always strings); `null` equals only `null`.
//! - `< <= > >=`: numerically when both sides are numbers or numeric strings, else two
//!   strings compare as text; anything else is an error rather than a silent `false`.
//! - `+`: numbers add; anything else concatenates as text. `-`: numbers only.
//! - `&&`, `||`, `!`, `?:` use [`truthy`] and short-circuit, so `<+a> != null &&
//!   <+a>.contains("x")` never calls a method on null.

use std::fmt::Write as _;

use super::{BinOp, Expr, ExprError, ExprErrorKind, Path, Piece, Resolver, Seg, Template, Val};

/// Evaluates an expression. References are looked up through `r`; call arguments and indexes
/// inside a path are evaluated first, so the resolver sees them as [`Expr::Lit`].
///
/// Errors carry offset 0: a tree has no source positions ([`render`] fills in the offset of
/// the failing `<+`).
pub fn eval(e: &Expr, r: &dyn Resolver) -> Result<Val, ExprError> {
    // This function recurses once per tree level, so it keeps its own frame small: everything
    // that formats or allocates lives in helpers that are never inlined. (In a debug build the
    // inlined version needed ~3 KiB per level.)
    match e {
        Expr::Lit(v) => Ok(v.clone()),
        Expr::Ref(p) => resolve(p, r),
        Expr::Not(x) => Ok(Val::Bool(!eval_truthy(x, r)?)),
        Expr::Bin(BinOp::And, a, b) => Ok(Val::Bool(eval_truthy(a, r)? && eval_truthy(b, r)?)),
        Expr::Bin(BinOp::Or, a, b) => Ok(Val::Bool(eval_truthy(a, r)? || eval_truthy(b, r)?)),
        Expr::Bin(op, a, b) => eval_binary(*op, a, b, r),
        Expr::Method(recv, name, args) => eval_method(recv, name, args, r),
        Expr::Cond(c, a, b) => {
            if eval_truthy(c, r)? {
                eval(a, r)
            } else {
                eval(b, r)
            }
        }
    }
}

fn eval_truthy(e: &Expr, r: &dyn Resolver) -> Result<bool, ExprError> {
    Ok(truthy(&eval(e, r)?))
}

#[inline(never)]
fn eval_binary(op: BinOp, a: &Expr, b: &Expr, r: &dyn Resolver) -> Result<Val, ExprError> {
    let a = eval(a, r)?;
    let b = eval(b, r)?;
    binary(op, &a, &b)
}

#[inline(never)]
fn eval_method(recv: &Expr, name: &str, args: &[Expr], r: &dyn Resolver) -> Result<Val, ExprError> {
    let v = eval(recv, r)?;
    let args = args
        .iter()
        .map(|a| eval(a, r))
        .collect::<Result<Vec<_>, _>>()?;
    call(name, &v, &args)
}

#[inline(never)]
fn resolve(p: &Path, r: &dyn Resolver) -> Result<Val, ExprError> {
    let plain = p.segs.iter().all(|s| match s {
        Seg::Name(_) => true,
        Seg::Call(_, args) => args.iter().all(|a| matches!(a, Expr::Lit(_))),
        Seg::Index(i) => matches!(**i, Expr::Lit(_)),
    });
    let evaluated;
    let path = if plain {
        p
    } else {
        let segs = p
            .segs
            .iter()
            .map(|s| {
                Ok(match s {
                    Seg::Name(n) => Seg::Name(n.clone()),
                    Seg::Call(n, args) => Seg::Call(
                        n.clone(),
                        args.iter()
                            .map(|a| eval(a, r).map(Expr::Lit))
                            .collect::<Result<_, _>>()?,
                    ),
                    Seg::Index(i) => Seg::Index(Box::new(Expr::Lit(eval(i, r)?))),
                })
            })
            .collect::<Result<_, ExprError>>()?;
        evaluated = Path { segs };
        &evaluated
    };
    r.resolve(path).map_err(|message| ExprError {
        offset: 0,
        kind: ExprErrorKind::Unresolved,
        message,
    })
}

/// Renders a template: text as is, each expression's value as text ([`Val`]'s `Display`:
/// strings as is, `3` not `3.0`, `true`, `null`). An error carries the offset of its `<+`.
pub fn render(t: &Template, r: &dyn Resolver) -> Result<String, ExprError> {
    let mut out = String::new();
    for piece in &t.pieces {
        match piece {
            Piece::Lit(s) => out.push_str(s),
            Piece::Expr { expr, offset, .. } => {
                let v = eval(expr, r).map_err(|mut e| {
                    e.offset = *offset;
                    e
                })?;
                // Writing to a String cannot fail.
                let _ = write!(out, "{v}");
            }
        }
    }
    Ok(out)
}

/// JEXL-ish truthiness: booleans as is; strings `"true"` (any case) true, `"false"` and `""`
/// false, any other text true; numbers when non-zero; `null` false.
pub fn truthy(v: &Val) -> bool {
    match v {
        Val::Bool(b) => *b,
        Val::Str(s) => match bool_text(s) {
            Some(b) => b,
            None => !s.is_empty(),
        },
        Val::Num(n) => *n != 0.0,
        Val::Null => false,
    }
}

/// `"true"`/`"false"` in any case, ignoring surrounding whitespace.
fn bool_text(s: &str) -> Option<bool> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("true") {
        Some(true)
    } else if t.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

/// A number as text: integral values without `.0`.
pub(super) fn number_text(n: f64) -> String {
    if n.is_finite() && n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

/// A decimal number written as text (`12`, `-1.5`, `1e3`, ` 7 `); not `inf`, `NaN` or hex,
/// which Rust's float parser would take but no pipeline author means as a number.
fn numeric_text(s: &str) -> Option<f64> {
    let t = s.trim();
    let body = t.strip_prefix(['+', '-']).unwrap_or(t);
    let (mantissa, exponent) = match body.find(['e', 'E']) {
        Some(i) => (&body[..i], Some(&body[i + 1..])),
        None => (body, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |s: &str| s.bytes().all(|c| c.is_ascii_digit());
    if int.len() + frac.len() == 0 || !digits(int) || !digits(frac) {
        return None;
    }
    if let Some(exp) = exponent {
        let exp = exp.strip_prefix(['+', '-']).unwrap_or(exp);
        if exp.is_empty() || !digits(exp) {
            return None;
        }
    }
    t.parse::<f64>().ok().filter(|n| n.is_finite())
}

fn as_number(v: &Val) -> Option<f64> {
    match v {
        Val::Num(n) => Some(*n),
        Val::Str(s) => numeric_text(s),
        Val::Bool(_) | Val::Null => None,
    }
}

/// A value as a message shows it: strings quoted (and shortened), others as text.
fn describe(v: &Val) -> String {
    match v {
        Val::Str(s) => {
            let short: String = s.chars().take(40).collect();
            if short.len() < s.len() {
                format!("{short:?}...")
            } else {
                format!("{s:?}")
            }
        }
        other => other.to_string(),
    }
}

fn equals(a: &Val, b: &Val) -> bool {
    match (a, b) {
        (Val::Null, Val::Null) => true,
        (Val::Null, _) | (_, Val::Null) => false,
        (Val::Str(x), Val::Str(y)) => x == y,
        (Val::Bool(x), Val::Bool(y)) => x == y,
        (Val::Bool(x), Val::Str(s)) | (Val::Str(s), Val::Bool(x)) => bool_text(s) == Some(*x),
        (Val::Bool(x), Val::Num(n)) | (Val::Num(n), Val::Bool(x)) => *x == (*n != 0.0),
        (Val::Num(x), Val::Num(y)) => x == y,
        (Val::Num(n), Val::Str(s)) | (Val::Str(s), Val::Num(n)) => match numeric_text(s) {
            Some(m) => m == *n,
            None => number_text(*n) == *s,
        },
    }
}

#[inline(never)]
fn binary(op: BinOp, a: &Val, b: &Val) -> Result<Val, ExprError> {
    use std::cmp::Ordering;
    let ordering = || -> Result<Ordering, ExprError> {
        if let (Some(x), Some(y)) = (as_number(a), as_number(b)) {
            // Both finite (literals and numeric_text reject the rest), except after
            // arithmetic overflow; treat NaN as unordered-equal rather than panic.
            return Ok(x.partial_cmp(&y).unwrap_or(Ordering::Equal));
        }
        match (a, b) {
            (Val::Str(x), Val::Str(y)) => Ok(x.cmp(y)),
            _ => Err(ExprError::eval(format!(
                "cannot compare {} with {} using '{}'",
                describe(a),
                describe(b),
                op.symbol()
            ))),
        }
    };
    Ok(match op {
        BinOp::Eq => Val::Bool(equals(a, b)),
        BinOp::Ne => Val::Bool(!equals(a, b)),
        BinOp::Lt => Val::Bool(ordering()?.is_lt()),
        BinOp::Le => Val::Bool(ordering()?.is_le()),
        BinOp::Gt => Val::Bool(ordering()?.is_gt()),
        BinOp::Ge => Val::Bool(ordering()?.is_ge()),
        BinOp::And => Val::Bool(truthy(a) && truthy(b)),
        BinOp::Or => Val::Bool(truthy(a) || truthy(b)),
        BinOp::Add => match (a, b) {
            (Val::Num(x), Val::Num(y)) => Val::Num(x + y),
            _ => Val::Str(format!("{a}{b}")),
        },
        BinOp::Sub => match (as_number(a), as_number(b)) {
            (Some(x), Some(y)) => Val::Num(x - y),
            _ => {
                return Err(ExprError::eval(format!(
                    "cannot subtract {} from {}: both must be numbers",
                    describe(b),
                    describe(a)
                )));
            }
        },
    })
}

/// A method argument used as a character index.
fn index_arg(method: &str, v: &Val) -> Result<usize, ExprError> {
    match as_number(v) {
        Some(n) if n.fract() == 0.0 && n >= 0.0 && n <= usize::MAX as f64 => Ok(n as usize),
        _ => Err(ExprError::eval(format!(
            "{method}(): index must be a whole number of 0 or more, got {}",
            describe(v)
        ))),
    }
}

/// The character position of byte offset `byte` in `s`.
fn char_pos(s: &str, byte: usize) -> f64 {
    s[..byte].chars().count() as f64
}

#[inline(never)]
fn call(name: &str, recv: &Val, args: &[Val]) -> Result<Val, ExprError> {
    let Some(spec) = super::method_spec(name) else {
        return Err(ExprError::eval(format!("unknown method '{name}()'")));
    };
    if args.len() < spec.min_args || args.len() > spec.max_args {
        return Err(ExprError::eval(super::parse::arity_message(
            name,
            spec.min_args,
            spec.max_args,
            args.len(),
        )));
    }
    if name == "isEmpty" {
        return Ok(Val::Bool(match recv {
            Val::Null => true,
            Val::Str(s) => s.is_empty(),
            Val::Num(_) | Val::Bool(_) => false,
        }));
    }
    if *recv == Val::Null {
        return Err(ExprError::eval(format!(
            "cannot call {name}() on null (check the value with != null first)"
        )));
    }
    let s = recv.to_string();
    let arg = |i: usize| args.get(i).map(Val::to_string).unwrap_or_default();
    Ok(match name {
        "contains" => Val::Bool(s.contains(&arg(0))),
        "startsWith" => Val::Bool(s.starts_with(&arg(0))),
        "endsWith" => Val::Bool(s.ends_with(&arg(0))),
        "length" => Val::Num(s.chars().count() as f64),
        "toLowerCase" => Val::Str(s.to_lowercase()),
        "toUpperCase" => Val::Str(s.to_uppercase()),
        "trim" => Val::Str(s.trim().to_string()),
        "substring" => {
            let chars: Vec<char> = s.chars().collect();
            let begin = index_arg(name, &args[0])?;
            let end = match args.get(1) {
                Some(v) => index_arg(name, v)?,
                None => chars.len(),
            };
            if begin > end || end > chars.len() {
                return Err(ExprError::eval(format!(
                    "substring({begin}, {end}) is out of range for {}, which has {} characters",
                    describe(recv),
                    chars.len()
                )));
            }
            Val::Str(chars[begin..end].iter().collect())
        }
        "indexOf" => Val::Num(s.find(&arg(0)).map_or(-1.0, |b| char_pos(&s, b))),
        "lastIndexOf" => Val::Num(s.rfind(&arg(0)).map_or(-1.0, |b| char_pos(&s, b))),
        "replace" => Val::Str(s.replace(&arg(0), &arg(1))),
        "equals" => Val::Bool(s == arg(0)),
        "equalsIgnoreCase" => Val::Bool(s.to_lowercase() == arg(0).to_lowercase()),
        "toString" => Val::Str(s),
        other => return Err(ExprError::eval(format!("unknown method '{other}()'"))),
    })
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::HashMap;

    use super::*;
    use crate::expr::{parse_condition, parse_template};

    /// A resolver over `dotted.path → value` that records what it was asked.
    struct Vars {
        map: HashMap<String, Val>,
        asked: RefCell<Vec<String>>,
    }

    impl Vars {
        fn new(pairs: &[(&str, Val)]) -> Self {
            Vars {
                map: pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_string(), v.clone()))
                    .collect(),
                asked: RefCell::new(Vec::new()),
            }
        }
    }

    impl Resolver for Vars {
        fn resolve(&self, path: &Path) -> Result<Val, String> {
            let key = path.to_string();
            self.asked.borrow_mut().push(key.clone());
            self.map
                .get(&key)
                .cloned()
                .ok_or_else(|| format!("unknown variable '{key}'"))
        }
    }

    fn str(s: &str) -> Val {
        Val::Str(s.into())
    }

    fn ev(src: &str, vars: &Vars) -> Val {
        let e = parse_condition(src).unwrap_or_else(|e| panic!("{src}: {e}"));
        eval(&e, vars).unwrap_or_else(|e| panic!("{src}: {e}"))
    }

    fn ev_err(src: &str, vars: &Vars) -> ExprError {
        eval(&parse_condition(src).unwrap(), vars).unwrap_err()
    }

    fn is(src: &str, vars: &Vars) -> bool {
        truthy(&ev(src, vars))
    }

    fn sample() -> Vars {
        Vars::new(&[
            ("codebase.branch", str("main")),
            ("pipeline.variables.deploy", str("true")),
            ("pipeline.variables.flag", str("False")),
            ("pipeline.variables.count", str("10")),
            ("pipeline.variables.version", str("1.10")),
            ("pipeline.variables.empty", str("")),
            ("pipeline.variables.name", str("  Hello World  ")),
            ("pipeline.sequenceId", Val::Num(42.0)),
            ("trigger.prLabels", Val::Null),
            ("stage.variables.x", str("a")),
            ("codebase.repoUrl", str("https://github.com/org/my-repo")),
            ("strategy.iteration", Val::Num(0.0)),
            ("u", str("日本語テキスト")),
        ])
    }

    #[test]
    fn truthiness() {
        assert!(truthy(&Val::Bool(true)));
        assert!(!truthy(&Val::Bool(false)));
        assert!(truthy(&str("true")));
        assert!(truthy(&str("TRUE")));
        assert!(truthy(&str(" True ")));
        assert!(!truthy(&str("false")));
        assert!(!truthy(&str("FALSE")));
        assert!(!truthy(&str("")));
        assert!(truthy(&str("yes")));
        assert!(truthy(&str("0")));
        assert!(truthy(&Val::Num(1.0)));
        assert!(truthy(&Val::Num(-0.5)));
        assert!(!truthy(&Val::Num(0.0)));
        assert!(!truthy(&Val::Null));
    }

    #[test]
    fn equality_coercions() {
        let v = sample();
        assert!(is(r#"<+codebase.branch> == "main""#, &v));
        assert!(!is(r#"<+codebase.branch> != 'main'"#, &v));
        assert!(is(r#"<+pipeline.variables.deploy> == true"#, &v));
        assert!(is(r#"true == <+pipeline.variables.deploy>"#, &v));
        assert!(is(r#"<+pipeline.variables.flag> == false"#, &v));
        assert!(is(r#"<+pipeline.variables.deploy> != "false""#, &v));
        assert!(is("<+pipeline.variables.count> == 10", &v));
        assert!(is("<+pipeline.variables.count> == 10.0", &v));
        assert!(is("<+pipeline.sequenceId> == '42'", &v));
        assert!(is("<+pipeline.sequenceId> == 42", &v));
        // Two strings compare as text: versions are not numbers.
        assert!(is(r#"<+pipeline.variables.version> != "1.1""#, &v));
        assert!(is(r#""01" != "1""#, &v));
        assert!(is("<+trigger.prLabels> == null", &v));
        assert!(!is("<+trigger.prLabels> != null", &v));
        assert!(!is(r#"<+trigger.prLabels> == """#, &v));
        assert!(!is(r#"<+trigger.prLabels> == "null""#, &v));
        assert!(is("null == null", &v));
        assert!(is("true == 1", &v));
        assert!(is("false == 0", &v));
        assert!(!is(r#""yes" == true"#, &v));
        assert!(!is(r#""yes" == false"#, &v));
        assert!(is(r#"1 == 1"#, &v));
        assert!(is(r#""abc" != 3"#, &v));
    }

    #[test]
    fn ordering() {
        let v = sample();
        assert!(is("<+pipeline.variables.count> > 9", &v));
        // Numeric strings order numerically, not as text ("10" < "9" as text).
        assert!(is(r#"<+pipeline.variables.count> > "9""#, &v));
        assert!(is("<+pipeline.variables.count> >= 10", &v));
        assert!(is("<+pipeline.variables.count> <= 10", &v));
        assert!(!is("<+pipeline.variables.count> < 10", &v));
        assert!(is(r#""apple" < "banana""#, &v));
        assert!(is("1.5 < 2", &v));
        assert!(is("-1 < 0", &v));
        let e = ev_err(r#""abc" < 3"#, &v);
        assert_eq!(e.message, "cannot compare \"abc\" with 3 using '<'");
        assert_eq!(e.kind, ExprErrorKind::Eval);
        let e = ev_err("<+trigger.prLabels> > 1", &v);
        assert_eq!(e.message, "cannot compare null with 1 using '>'");
        assert!(
            ev_err("true < false", &v)
                .message
                .starts_with("cannot compare")
        );
    }

    #[test]
    fn logic_short_circuits() {
        let v = sample();
        // The right side would be an error (method on null, unknown name) if evaluated.
        assert!(!is(
            r#"<+trigger.prLabels> != null && <+trigger.prLabels>.contains("x")"#,
            &v
        ));
        assert!(is(r#"<+codebase.branch> == "main" || <+nope>"#, &v));
        assert!(!is(r#"false && <+nope>"#, &v));
        assert_eq!(*v.asked.borrow(), ["trigger.prLabels", "codebase.branch"]);
        assert_eq!(ev("1 && 'x'", &v), Val::Bool(true));
        assert_eq!(ev("'' || 0", &v), Val::Bool(false));
        assert_eq!(ev("!''", &v), Val::Bool(true));
        assert_eq!(ev("!<+pipeline.variables.flag>", &v), Val::Bool(true));
    }

    #[test]
    fn brief_conditions() {
        let v = sample();
        assert!(is(
            r#"<+codebase.branch> == "main" && <+pipeline.variables.deploy> != "false""#,
            &v
        ));
        assert!(is(
            "<+stage.variables.x> == 'a' || !<+pipeline.variables.empty>.isEmpty()",
            &v
        ));
        // The corpus idiom `== "tag" || "branch"` is always true: "branch" is truthy.
        assert!(is(r#"<+codebase.branch> == "tag" || "branch""#, &v));
        assert!(!is("\"false\"", &v));
        assert!(!is("false", &v));
    }

    #[test]
    fn ternary() {
        let v = sample();
        assert_eq!(
            ev(r#"<+codebase.branch> == "main" ? "prod" : "dev""#, &v),
            str("prod")
        );
        assert_eq!(ev("0 ? 1 : 2", &v), Val::Num(2.0));
        assert_eq!(ev("true ? false ? 1 : 2 : 3", &v), Val::Num(2.0));
        // Only the chosen branch is evaluated.
        assert_eq!(ev("true ? 1 : <+nope>", &v), Val::Num(1.0));
    }

    #[test]
    fn arithmetic_and_concatenation() {
        let v = sample();
        assert_eq!(ev("1 + 2", &v), Val::Num(3.0));
        assert_eq!(ev("5 - 7", &v), Val::Num(-2.0));
        assert_eq!(ev("'10' - 1", &v), Val::Num(9.0));
        assert_eq!(ev("'a' + 1", &v), str("a1"));
        assert_eq!(ev("'a' + 1.5 + true + null", &v), str("a1.5truenull"));
        assert_eq!(ev("<+pipeline.sequenceId> + 1", &v), Val::Num(43.0));
        assert_eq!(ev("'v' + <+pipeline.sequenceId>", &v), str("v42"));
        // A nested expression in a string stays a concatenation even for numbers.
        assert_eq!(
            ev(r#""<+pipeline.sequenceId><+pipeline.sequenceId>""#, &v),
            str("4242")
        );
        let e = ev_err("'a' - 1", &v);
        assert_eq!(
            e.message,
            "cannot subtract 1 from \"a\": both must be numbers"
        );
    }

    #[test]
    fn methods() {
        let v = sample();
        assert_eq!(ev("<+codebase.branch>.contains('ai')", &v), Val::Bool(true));
        assert_eq!(
            ev("<+codebase.branch>.startsWith('ma')", &v),
            Val::Bool(true)
        );
        assert_eq!(ev("<+codebase.branch>.endsWith('x')", &v), Val::Bool(false));
        assert_eq!(
            ev("<+pipeline.variables.empty>.isEmpty()", &v),
            Val::Bool(true)
        );
        assert_eq!(ev("<+trigger.prLabels>.isEmpty()", &v), Val::Bool(true));
        assert_eq!(ev("<+pipeline.sequenceId>.isEmpty()", &v), Val::Bool(false));
        assert_eq!(ev("<+codebase.branch>.length()", &v), Val::Num(4.0));
        assert_eq!(ev("<+u>.length()", &v), Val::Num(7.0));
        assert_eq!(
            ev("<+pipeline.variables.name>.trim()", &v),
            str("Hello World")
        );
        assert_eq!(
            ev("<+pipeline.variables.name>.trim().toLowerCase()", &v),
            str("hello world")
        );
        assert_eq!(ev("'aB'.toUpperCase()", &v), str("AB"));
        assert_eq!(ev("'hello'.substring(1)", &v), str("ello"));
        assert_eq!(ev("'hello'.substring(1, 3)", &v), str("el"));
        assert_eq!(ev("'hello'.substring(5)", &v), str(""));
        assert_eq!(ev("'hello'.substring('2')", &v), str("llo"));
        assert_eq!(ev("<+u>.substring(2, 3)", &v), str("語"));
        assert_eq!(ev("'a/b/c'.indexOf('/')", &v), Val::Num(1.0));
        assert_eq!(ev("'a/b/c'.lastIndexOf('/')", &v), Val::Num(3.0));
        assert_eq!(ev("'abc'.indexOf('x')", &v), Val::Num(-1.0));
        assert_eq!(ev("<+u>.indexOf('テ')", &v), Val::Num(3.0));
        assert_eq!(ev("'a-b-c'.replace('-', '_')", &v), str("a_b_c"));
        assert_eq!(ev("'abc'.equals('abc')", &v), Val::Bool(true));
        assert_eq!(ev("'ABC'.equalsIgnoreCase('abc')", &v), Val::Bool(true));
        assert_eq!(ev("<+pipeline.sequenceId>.toString()", &v), str("42"));
        assert_eq!(
            ev("<+pipeline.sequenceId>.toString().length()", &v),
            Val::Num(2.0)
        );
        assert_eq!(ev("1.5.toString()", &v), str("1.5"));
    }

    #[test]
    fn method_errors() {
        let v = sample();
        let e = ev_err("'abc'.substring(2, 1)", &v);
        assert_eq!(
            e.message,
            "substring(2, 1) is out of range for \"abc\", which has 3 characters"
        );
        let e = ev_err("'abc'.substring(4)", &v);
        assert!(e.message.starts_with("substring(4, 3) is out of range"));
        let e = ev_err("'abc'.substring(-1)", &v);
        assert_eq!(
            e.message,
            "substring(): index must be a whole number of 0 or more, got -1"
        );
        let e = ev_err("'abc'.substring(1.5)", &v);
        assert!(e.message.contains("whole number"));
        let e = ev_err("<+trigger.prLabels>.contains('x')", &v);
        assert!(e.message.starts_with("cannot call contains() on null"));
        // Hand-built trees are checked too.
        let e = eval(
            &Expr::Method(Box::new(Expr::Lit(str("a"))), "nope".into(), vec![]),
            &v,
        )
        .unwrap_err();
        assert_eq!(e.message, "unknown method 'nope()'");
        let e = eval(
            &Expr::Method(Box::new(Expr::Lit(str("a"))), "substring".into(), vec![]),
            &v,
        )
        .unwrap_err();
        assert_eq!(e.message, "substring() takes 1 to 2 arguments, got 0");
    }

    #[test]
    fn unresolved_references_carry_the_resolver_message() {
        let v = sample();
        let e = ev_err("<+stage.variables.nope> == 'x'", &v);
        assert_eq!(e.kind, ExprErrorKind::Unresolved);
        assert_eq!(e.message, "unknown variable 'stage.variables.nope'");
        assert_eq!(e.offset, 0);
    }

    #[test]
    fn path_arguments_are_evaluated_before_resolving() {
        let v = Vars::new(&[
            ("pipeline.variables.env", str("prod")),
            ("strategy.iteration", Val::Num(1.0)),
            ("secrets.getValue(\"vault/prod#k\")", str("s3cret")),
            ("pipeline.stages[\"m1\"].status", str("SUCCESS")),
        ]);
        let t = parse_template(
            r#"<+secrets.getValue("vault/<+pipeline.variables.env>#k")> <+pipeline.stages["m" + <+strategy.iteration>].status>"#,
        )
        .unwrap();
        assert_eq!(render(&t, &v).unwrap(), "s3cret SUCCESS");
        assert_eq!(
            *v.asked.borrow(),
            [
                "pipeline.variables.env",
                "secrets.getValue(\"vault/prod#k\")",
                "strategy.iteration",
                "pipeline.stages[\"m1\"].status"
            ]
        );
    }

    #[test]
    fn render_values_as_text() {
        let v = Vars::new(&[
            ("s", str("text")),
            ("i", Val::Num(3.0)),
            ("f", Val::Num(2.5)),
            ("big", Val::Num(1e20)),
            ("b", Val::Bool(false)),
            ("n", Val::Null),
        ]);
        let t = parse_template("<+s>|<+i>|<+f>|<+b>|<+n>|<+big>").unwrap();
        assert_eq!(
            render(&t, &v).unwrap(),
            "text|3|2.5|false|null|100000000000000000000"
        );
        let t = parse_template("no refs").unwrap();
        assert_eq!(render(&t, &v).unwrap(), "no refs");
        let t = parse_template("a <+s> b <+missing>").unwrap();
        let e = render(&t, &v).unwrap_err();
        assert_eq!((e.offset, e.kind), (9, ExprErrorKind::Unresolved));
        let t = parse_template("x <+ 'a' < 3 >").unwrap();
        let e = render(&t, &v).unwrap_err();
        assert_eq!((e.offset, e.kind), (2, ExprErrorKind::Eval));
    }

    #[test]
    fn corpus_repo_name_expression() {
        let v = sample();
        let t = parse_template(
            "gcr.io/itd-microsvcs/<+<+codebase.repoUrl>.substring(<+codebase.repoUrl>.lastIndexOf('/') + 1)>",
        )
        .unwrap();
        assert_eq!(render(&t, &v).unwrap(), "gcr.io/itd-microsvcs/my-repo");
    }

    #[test]
    fn numeric_text_is_strict() {
        for (s, n) in [
            ("12", 12.0),
            (" -1.5 ", -1.5),
            ("1e3", 1000.0),
            ("+2", 2.0),
            (".5", 0.5),
            ("5.", 5.0),
        ] {
            assert_eq!(numeric_text(s), Some(n), "{s}");
        }
        for s in [
            "", "-", ".", "inf", "NaN", "infinity", "0x10", "1e", "1e+", "1.2.3", "1 2", "v1",
        ] {
            assert_eq!(numeric_text(s), None, "{s}");
        }
    }

    #[test]
    fn number_text_forms() {
        assert_eq!(number_text(3.0), "3");
        assert_eq!(number_text(-3.0), "-3");
        assert_eq!(number_text(0.1 + 0.2), "0.30000000000000004");
        assert_eq!(number_text(1e15), "1000000000000000");
    }
}
