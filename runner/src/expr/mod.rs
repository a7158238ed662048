//! Harness expressions: `<+pipeline.variables.host>` inside strings, and `when.condition`s.
//!
//! Owns: the syntax tree ([`Expr`], [`Path`], [`Template`]), parsing text into it
//! ([`parse_template`], [`parse_condition`], [`parse_input`] for `<+input>` runtime-input
//! markers), and evaluating it against a [`Resolver`] ([`eval`], [`render`], [`truthy`]).
//! Does not own: what a reference *means* (which variables, steps, secrets exist and what
//! they hold): that is the caller's [`Resolver`], which also writes the "unknown variable"
//! message. Nor does it know line and column: errors carry a byte offset into the text they
//! were given, and the caller maps it into the YAML file.
//!
//! The language is the practical subset of Harness's JEXL that pipelines use:
//!
//! - literals: `"text"`, `'text'` (backslash escapes), `12`, `1.5`, `true`, `false`, `null`;
//!   a string literal may itself contain `<+...>`, as in
//!   `<+secrets.getValue("vault<+pipeline.variables.env>/key")>`: it parses as a concatenation;
//! - references `<+a.b.c>`, with calls (`secrets.getValue('id')`) and indexes (`a["k"]`) as
//!   path segments; inside `<+ >` a path may be written bare, nested `<+ >` work too;
//! - operators, loosest first: `?:`, `||`, `&&`, `== !=`, `< <= > >=`, `+ -`, unary `! -`,
//!   then postfix method calls;
//! - the methods in [`METHODS`].
//!
//! Out of scope (parse errors): JEXL scripts (`var`, `for`, `return`), lambdas, collection
//! literals, regex operators `=~`.
//!
//! `>` closes `<+` and is also greater-than. Inside `<+ >` a `>` is read as greater-than only
//! when it has whitespace on both sides and another `>` follows to close the expression
//! (`<+ <+a>.length() > 3 >`); otherwise it closes. Parentheses always work: `<+(a > 3)>`.

mod eval;
mod parse;

use std::fmt;

pub use eval::{eval, render, truthy};
pub use parse::{parse_condition, parse_input, parse_template, template_errors};

/// A value: what a reference resolves to and what an expression evaluates to.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Str(String),
    Num(f64),
    Bool(bool),
    Null,
}

impl fmt::Display for Val {
    /// The text a value renders as inside a string: strings as is, integral numbers without
    /// `.0`, `true`/`false`, `null`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Val::Str(s) => f.write_str(s),
            Val::Num(n) => write!(f, "{}", eval::number_text(*n)),
            Val::Bool(b) => write!(f, "{b}"),
            Val::Null => f.write_str("null"),
        }
    }
}

/// A binary operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
    /// Numeric addition when both sides are numbers, otherwise string concatenation.
    Add,
    /// Numeric subtraction.
    Sub,
}

impl BinOp {
    /// The operator as written.
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::And => "&&",
            BinOp::Or => "||",
            BinOp::Add => "+",
            BinOp::Sub => "-",
        }
    }
}

/// One segment of a reference path.
#[derive(Debug, Clone, PartialEq)]
pub enum Seg {
    /// `variables` in `pipeline.variables.x`.
    Name(String),
    /// `getValue('id')` in `secrets.getValue('id')`: a call that is part of the path, as opposed
    /// to a string method applied to the resolved value (those are [`Expr::Method`]).
    Call(String, Vec<Expr>),
    /// `["key"]` in `pipeline.stages["build"]`.
    Index(Box<Expr>),
}

/// A reference path: `pipeline.variables.x` is `[Name("pipeline"), Name("variables"),
/// Name("x")]`; `secrets.getValue('id')` is `[Name("secrets"), Call("getValue",
/// [Lit(Str("id"))])]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Path {
    pub segs: Vec<Seg>,
}

impl Path {
    /// A path of plain names: `Path::of(&["pipeline", "variables", "x"])`.
    pub fn of(names: &[&str]) -> Path {
        Path {
            segs: names.iter().map(|n| Seg::Name((*n).to_string())).collect(),
        }
    }

    /// The name of segment `i`, if it is a plain name.
    pub fn name(&self, i: usize) -> Option<&str> {
        match self.segs.get(i)? {
            Seg::Name(n) => Some(n),
            _ => None,
        }
    }

    /// Whether the path begins with these plain names.
    pub fn starts_with(&self, names: &[&str]) -> bool {
        names.len() <= self.segs.len()
            && names
                .iter()
                .enumerate()
                .all(|(i, n)| self.name(i) == Some(n))
    }

    /// `Some(["pipeline", "variables", "x"])` when every segment is a plain name.
    pub fn names(&self) -> Option<Vec<&str>> {
        self.segs
            .iter()
            .map(|s| match s {
                Seg::Name(n) => Some(n.as_str()),
                _ => None,
            })
            .collect()
    }
}

impl fmt::Display for Path {
    /// The path as written inside `<+ >`: `pipeline.variables.x`, `secrets.getValue("id")`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.segs.iter().enumerate() {
            match seg {
                Seg::Name(n) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    f.write_str(n)?;
                }
                Seg::Call(n, args) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    write!(f, "{n}(")?;
                    write_args(f, args)?;
                    f.write_str(")")?;
                }
                Seg::Index(e) => write!(f, "[{e}]")?,
            }
        }
        Ok(())
    }
}

fn write_args(f: &mut fmt::Formatter<'_>, args: &[Expr]) -> fmt::Result {
    for (i, a) in args.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{a}")?;
    }
    Ok(())
}

/// An expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// `"str"`, `'str'`, `12`, `1.5`, `true`, `false`, `null`.
    Lit(Val),
    /// A `<+...>` reference.
    Ref(Path),
    /// `!e`.
    Not(Box<Expr>),
    /// `a op b`.
    Bin(BinOp, Box<Expr>, Box<Expr>),
    /// `e.name(args)`, one of [`METHODS`].
    Method(Box<Expr>, String, Vec<Expr>),
    /// `c ? a : b`.
    Cond(Box<Expr>, Box<Expr>, Box<Expr>),
}

impl fmt::Display for Expr {
    /// Canonical source text (references wrapped in `<+ >`, binary operations parenthesized),
    /// for messages and tests. Parsing it as a condition gives the same tree back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Lit(Val::Str(s)) => {
                f.write_str("\"")?;
                for c in s.chars() {
                    match c {
                        '"' => f.write_str("\\\"")?,
                        '\\' => f.write_str("\\\\")?,
                        '\n' => f.write_str("\\n")?,
                        '\t' => f.write_str("\\t")?,
                        '\r' => f.write_str("\\r")?,
                        // `<+` inside a literal would be re-parsed as a reference.
                        '<' => f.write_str("\\<")?,
                        c => write!(f, "{c}")?,
                    }
                }
                f.write_str("\"")
            }
            Expr::Lit(v) => write!(f, "{v}"),
            Expr::Ref(p) => write!(f, "<+{p}>"),
            Expr::Not(e) => write!(f, "!{e}"),
            Expr::Bin(op, a, b) => write!(f, "({a} {} {b})", op.symbol()),
            Expr::Method(recv, name, args) => {
                // `!a.m()` and `-1.m()` would read back as `!(a.m())` and `-(1.m())`.
                match **recv {
                    Expr::Not(_) | Expr::Lit(Val::Num(_)) => write!(f, "({recv}).{name}(")?,
                    _ => write!(f, "{recv}.{name}(")?,
                }
                write_args(f, args)?;
                f.write_str(")")
            }
            Expr::Cond(c, a, b) => write!(f, "({c} ? {a} : {b})"),
        }
    }
}

/// One piece of a [`Template`].
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Text outside any `<+...>`.
    Lit(String),
    /// One `<+...>`: the parsed expression, its source text (from `<+` to the closing `>`, or
    /// to the end of the string for a `<+input>.default(...)` tail), and the byte offset of
    /// its `<+` in the template.
    Expr {
        expr: Expr,
        src: String,
        offset: usize,
    },
}

/// A string with embedded expressions: `psql -h <+pipeline.variables.host> -p 5433`.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub pieces: Vec<Piece>,
}

impl Template {
    /// Every reference in the template, in source order (see [`references`]).
    pub fn references(&self) -> Vec<&Path> {
        let mut out = Vec::new();
        for piece in &self.pieces {
            if let Piece::Expr { expr, .. } = piece {
                collect_refs(expr, &mut out);
            }
        }
        out
    }

    /// True when the template has no `<+...>` at all.
    pub fn is_plain(&self) -> bool {
        self.pieces.iter().all(|p| matches!(p, Piece::Lit(_)))
    }
}

/// A runtime input marker: `<+input>.default(dev).allowedValues(dev,prod)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InputSpec {
    /// `.default(v)`.
    pub default: Option<String>,
    /// `.allowedValues(a,b)`, `.selectOneFrom(...)`, `.selectManyFrom(...)`.
    pub allowed: Vec<String>,
    /// `.regex(re)`, the pattern text as written.
    pub regex: Option<String>,
    /// `.executionInput()`: asked for when the step runs, not when the pipeline starts.
    pub execution_input: bool,
}

/// Every reference inside `e`, in source order, including those nested in path segments
/// (the `<+b>` in `<+a[<+b>]>`). For validation: the caller checks each one is known.
pub fn references(e: &Expr) -> Vec<&Path> {
    let mut out = Vec::new();
    collect_refs(e, &mut out);
    out
}

fn collect_refs<'a>(e: &'a Expr, out: &mut Vec<&'a Path>) {
    match e {
        Expr::Lit(_) => {}
        Expr::Ref(p) => {
            out.push(p);
            for seg in &p.segs {
                match seg {
                    Seg::Name(_) => {}
                    Seg::Call(_, args) => args.iter().for_each(|a| collect_refs(a, out)),
                    Seg::Index(i) => collect_refs(i, out),
                }
            }
        }
        Expr::Not(x) => collect_refs(x, out),
        Expr::Bin(_, a, b) => {
            collect_refs(a, out);
            collect_refs(b, out);
        }
        Expr::Method(recv, _, args) => {
            collect_refs(recv, out);
            args.iter().for_each(|a| collect_refs(a, out));
        }
        Expr::Cond(c, a, b) => {
            collect_refs(c, out);
            collect_refs(a, out);
            collect_refs(b, out);
        }
    }
}

/// Looks references up. Implemented by the scheduler over its expression context.
pub trait Resolver {
    /// Look a reference up. `Err(message)` for unknown names: the message is user-facing
    /// ("unknown stage variable 'x'").
    fn resolve(&self, path: &Path) -> Result<Val, String>;
}

/// Any `Fn(&Path) -> Result<Val, String>` is a resolver; handy for tests and small callers.
impl<F> Resolver for F
where
    F: Fn(&Path) -> Result<Val, String>,
{
    fn resolve(&self, path: &Path) -> Result<Val, String> {
        self(path)
    }
}

/// A method callable on a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodSpec {
    pub name: &'static str,
    pub min_args: usize,
    pub max_args: usize,
    /// One line for error messages and docs.
    pub doc: &'static str,
}

const fn method(
    name: &'static str,
    min_args: usize,
    max_args: usize,
    doc: &'static str,
) -> MethodSpec {
    MethodSpec {
        name,
        min_args,
        max_args,
        doc,
    }
}

/// The methods expressions may call, Java `String` semantics (indexes count characters).
/// The receiver is converted to its text first; `isEmpty()` is also true for `null`.
pub const METHODS: &[MethodSpec] = &[
    method("contains", 1, 1, "s.contains(x): true when x occurs in s"),
    method("startsWith", 1, 1, "s.startsWith(x)"),
    method("endsWith", 1, 1, "s.endsWith(x)"),
    method("isEmpty", 0, 0, "s.isEmpty(): true for \"\" and null"),
    method("length", 0, 0, "s.length(): number of characters"),
    method("toLowerCase", 0, 0, "s.toLowerCase()"),
    method("toUpperCase", 0, 0, "s.toUpperCase()"),
    method(
        "trim",
        0,
        0,
        "s.trim(): without leading and trailing whitespace",
    ),
    method("substring", 1, 2, "s.substring(begin[, end])"),
    method("indexOf", 1, 1, "s.indexOf(x): first position of x, or -1"),
    method(
        "lastIndexOf",
        1,
        1,
        "s.lastIndexOf(x): last position of x, or -1",
    ),
    method("replace", 2, 2, "s.replace(a, b): every a replaced by b"),
    method("equals", 1, 1, "s.equals(x): same text"),
    method("equalsIgnoreCase", 1, 1, "s.equalsIgnoreCase(x)"),
    method("toString", 0, 0, "v.toString(): the value as text"),
];

/// The method called `name`, if there is one.
pub fn method_spec(name: &str) -> Option<&'static MethodSpec> {
    METHODS.iter().find(|m| m.name == name)
}

/// What went wrong, broadly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExprErrorKind {
    /// The text is not a valid expression.
    Syntax,
    /// The resolver did not know a reference; the message is the resolver's.
    Unresolved,
    /// Evaluation failed: a type mismatch or a bad method argument.
    Eval,
}

/// A parse or evaluation error. `offset` is the byte offset in the text given to the parser
/// (or, from [`render`], the offset of the failing `<+` in the template); [`eval`] has no
/// source text, so its errors carry offset 0 and the caller points at the whole expression.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ExprError {
    pub offset: usize,
    pub kind: ExprErrorKind,
    pub message: String,
}

impl ExprError {
    pub(crate) fn syntax(offset: usize, message: impl Into<String>) -> Self {
        ExprError {
            offset,
            kind: ExprErrorKind::Syntax,
            message: message.into(),
        }
    }

    pub(crate) fn eval(message: impl Into<String>) -> Self {
        ExprError {
            offset: 0,
            kind: ExprErrorKind::Eval,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};
    use std::path::PathBuf;

    use super::*;

    fn vars(pairs: &[(&str, Val)]) -> impl Fn(&Path) -> Result<Val, String> + use<> {
        let map: HashMap<String, Val> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), v.clone()))
            .collect();
        move |p: &Path| {
            map.get(&p.to_string())
                .cloned()
                .ok_or_else(|| format!("unknown reference '{p}'"))
        }
    }

    #[test]
    fn path_helpers() {
        let p = Path::of(&["pipeline", "variables", "x"]);
        assert_eq!(p.to_string(), "pipeline.variables.x");
        assert!(p.starts_with(&["pipeline", "variables"]));
        assert!(!p.starts_with(&["stage"]));
        assert!(!p.starts_with(&["pipeline", "variables", "x", "y"]));
        assert_eq!(p.name(2), Some("x"));
        assert_eq!(p.names(), Some(vec!["pipeline", "variables", "x"]));
        let s = Path {
            segs: vec![
                Seg::Name("secrets".into()),
                Seg::Call("getValue".into(), vec![Expr::Lit(Val::Str("id".into()))]),
            ],
        };
        assert_eq!(s.to_string(), "secrets.getValue(\"id\")");
        assert_eq!(s.names(), None);
        assert_eq!(s.name(1), None);
    }

    #[test]
    fn display_round_trips_through_the_parser() {
        for src in [
            r#"<+a.b> == "x" && !<+c>.isEmpty()"#,
            r#"<+a> ? 'y' : <+b>.substring(1, 2)"#,
            r#"<+secrets.getValue("id")> != null || 1.5 >= -2"#,
            r#"<+pipeline.stages["s" + <+strategy.iteration>].status> + "\"<q>\n""#,
        ] {
            let e = parse_condition(src).unwrap();
            let shown = e.to_string();
            assert_eq!(parse_condition(&shown).unwrap(), e, "{src} -> {shown}");
        }
    }

    #[test]
    fn references_are_collected_in_source_order() {
        let e = parse_condition(
            r#"<+a> == "x" || <+b>.contains(<+c>) ? <+d[<+e>]> : <+secrets.getValue("k<+f>")>"#,
        )
        .unwrap();
        let names: Vec<String> = references(&e).iter().map(|p| p.to_string()).collect();
        assert_eq!(
            names,
            [
                "a",
                "b",
                "c",
                "d[<+e>]",
                "e",
                "secrets.getValue((\"k\" + <+f>))",
                "f"
            ]
        );
        let t = parse_template("x <+a> y <+b.c> <+input>").unwrap();
        let names: Vec<String> = t.references().iter().map(|p| p.to_string()).collect();
        assert_eq!(names, ["a", "b.c", "input"]);
        assert!(!t.is_plain());
        assert!(
            parse_template("no expressions > here <")
                .unwrap()
                .is_plain()
        );
    }

    #[test]
    fn closure_resolver_and_render() {
        let r = vars(&[
            ("pipeline.variables.host", Val::Str("db".into())),
            ("pipeline.sequenceId", Val::Num(42.0)),
        ]);
        let t =
            parse_template("psql -h <+pipeline.variables.host> -p 5433 #<+pipeline.sequenceId>")
                .unwrap();
        assert_eq!(render(&t, &r).unwrap(), "psql -h db -p 5433 #42");
        let err = render(&parse_template("x <+nope>").unwrap(), &r).unwrap_err();
        assert_eq!(err.kind, ExprErrorKind::Unresolved);
        assert_eq!(err.offset, 2);
        assert_eq!(err.message, "unknown reference 'nope'");
    }

    #[test]
    fn val_display() {
        assert_eq!(Val::Num(3.0).to_string(), "3");
        assert_eq!(Val::Num(-0.0).to_string(), "0");
        assert_eq!(Val::Num(1.5).to_string(), "1.5");
        assert_eq!(Val::Bool(true).to_string(), "true");
        assert_eq!(Val::Null.to_string(), "null");
        assert_eq!(Val::Str("a b".into()).to_string(), "a b");
    }

    #[test]
    fn method_table_is_consistent() {
        let mut seen = BTreeSet::new();
        for m in METHODS {
            assert!(seen.insert(m.name), "duplicate {}", m.name);
            assert!(m.min_args <= m.max_args);
            assert_eq!(method_spec(m.name), Some(m));
        }
        assert_eq!(method_spec("getValue"), None);
    }

    // ---- the corpus of real pipelines ----

    /// Strings in the corpus that use JEXL scripting (`var`, `for`, set literals), which this
    /// module deliberately does not support. Each must fail to parse rather than half-parse.
    fn uses_jexl_scripting(s: &str) -> bool {
        s.contains("<+var ") || s.contains("<+ var ") || s.contains("[{")
    }

    fn corpus_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/harness-pipelines")
    }

    /// Every string scalar in a YAML document, with the key it sits under.
    fn strings(v: &serde_json::Value, key: &str, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::String(s) => out.push((key.to_string(), s.clone())),
            serde_json::Value::Bool(b) if key == "condition" => {
                out.push((key.to_string(), b.to_string()))
            }
            serde_json::Value::Array(items) => items.iter().for_each(|i| strings(i, key, out)),
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    strings(v, k, out);
                }
            }
            _ => {}
        }
    }

    fn corpus_strings() -> Vec<(String, String)> {
        let dir = corpus_dir();
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
            panic!(
                "the pipeline corpus is missing at {}: {e}; it is needed to test the expression parser",
                dir.display()
            )
        });
        let mut out = Vec::new();
        let mut files = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                continue;
            }
            files += 1;
            let text = std::fs::read_to_string(&path).unwrap();
            let doc: serde_json::Value =
                serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            strings(&doc, "", &mut out);
        }
        assert!(files >= 40, "only {files} yaml files in {}", dir.display());
        out
    }

    #[test]
    fn every_corpus_template_and_condition_parses() {
        let any = |_: &Path| -> Result<Val, String> { Ok(Val::Str("x/y".into())) };
        let mut templates = BTreeSet::new();
        let mut conditions = BTreeSet::new();
        for (key, s) in corpus_strings() {
            if key == "condition" {
                conditions.insert(s.clone());
            }
            if s.contains("<+") {
                templates.insert(s);
            }
        }
        assert!(templates.len() >= 200, "only {} templates", templates.len());
        assert!(
            conditions.len() >= 15,
            "only {} conditions",
            conditions.len()
        );

        let mut failures = Vec::new();
        let mut scripting = 0;
        for t in &templates {
            let parsed = parse_template(t);
            if uses_jexl_scripting(t) {
                assert!(parsed.is_err(), "JEXL script unexpectedly parsed: {t}");
                scripting += 1;
                continue;
            }
            match parsed {
                Ok(tpl) => {
                    assert!(!tpl.is_plain());
                    if let Err(e) = render(&tpl, &any) {
                        failures.push(format!("render {t:?}: {e}"));
                    }
                }
                Err(e) => failures.push(format!("template {t:?} at {}: {e}", e.offset)),
            }
            if t.trim_start().starts_with("<+input>") {
                match parse_input(t) {
                    Some(Ok(_)) => {}
                    other => failures.push(format!("input {t:?}: {other:?}")),
                }
            }
        }
        for c in &conditions {
            match parse_condition(c) {
                Ok(e) => {
                    if let Err(err) = eval(&e, &any) {
                        failures.push(format!("eval {c:?}: {err}"));
                    }
                }
                Err(e) => failures.push(format!("condition {c:?} at {}: {e}", e.offset)),
            }
        }
        assert!(scripting >= 1, "the corpus JEXL scripts were not found");
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn corpus_input_markers() {
        let inputs: BTreeSet<String> = corpus_strings()
            .into_iter()
            .map(|(_, s)| s)
            .filter(|s| s.trim_start().starts_with("<+input>"))
            .collect();
        assert!(inputs.len() >= 5, "only {} inputs", inputs.len());
        let spec = |s: &str| parse_input(s).unwrap().unwrap();
        assert!(inputs.contains("<+input>.default(qa).allowedValues(qa,dev,prod)"));
        assert_eq!(
            spec("<+input>.default(qa).allowedValues(qa,dev,prod)"),
            InputSpec {
                default: Some("qa".into()),
                allowed: vec!["qa".into(), "dev".into(), "prod".into()],
                ..InputSpec::default()
            }
        );
        assert!(inputs.contains("<+input>.regex([a-z0-9-]+(/[a-z0-9-]+)+)"));
        assert_eq!(
            spec("<+input>.regex([a-z0-9-]+(/[a-z0-9-]+)+)")
                .regex
                .as_deref(),
            Some("[a-z0-9-]+(/[a-z0-9-]+)+")
        );
        assert!(inputs.contains(r#"<+input>.default(["us-east-1","us-west-2"])"#));
        assert_eq!(
            spec(r#"<+input>.default(["us-east-1","us-west-2"])"#)
                .default
                .as_deref(),
            Some(r#"["us-east-1","us-west-2"]"#)
        );
    }

    #[test]
    fn corpus_specific_shapes() {
        let r = vars(&[
            (
                "codebase.repoUrl",
                Val::Str("https://github.com/o/repo".into()),
            ),
            ("strategy.iteration", Val::Num(1.0)),
            (
                "pipeline.stages[\"ExecuteMatrix1\"].status",
                Val::Str("SUCCESS".into()),
            ),
            (
                "pipeline.stages.build.variables.ENV",
                Val::Str("prod".into()),
            ),
            ("trigger.branch", Val::Str("feature".into())),
            ("trigger.prLabels", Val::Str("[load-test, x]".into())),
        ]);
        let t = parse_template(
            "repo: gcr.io/x/<+<+codebase.repoUrl>.substring(<+codebase.repoUrl>.lastIndexOf('/') + 1)>",
        )
        .unwrap();
        assert_eq!(render(&t, &r).unwrap(), "repo: gcr.io/x/repo");

        let t = parse_template(
            r#"echo <+pipeline.stages["ExecuteMatrix"+ <+strategy.iteration>].status>"#,
        )
        .unwrap();
        let refs: Vec<String> = t.references().iter().map(|p| p.to_string()).collect();
        assert_eq!(refs[1], "strategy.iteration");
        assert_eq!(render(&t, &r).unwrap(), "echo SUCCESS");

        let t = parse_template(
            r#"<+secrets.getValue("org.hashicorpvault://vault<+pipeline.stages.build.variables.ENV>/a#b")>"#,
        )
        .unwrap();
        let secret_path = match &t.pieces[0] {
            Piece::Expr {
                expr: Expr::Ref(p), ..
            } => p.clone(),
            other => panic!("{other:?}"),
        };
        assert!(secret_path.starts_with(&["secrets"]));
        let arg = match &secret_path.segs[1] {
            Seg::Call(name, args) if name == "getValue" => args[0].clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            eval(&arg, &r).unwrap(),
            Val::Str("org.hashicorpvault://vaultprod/a#b".into())
        );

        let c = parse_condition(
            r#"(<+trigger.branch> == "main" || (<+trigger.prLabels> != null && <+trigger.prLabels>.contains("load-test")))"#,
        )
        .unwrap();
        assert!(truthy(&eval(&c, &r).unwrap()));
    }
}
