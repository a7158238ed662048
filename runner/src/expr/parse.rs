//! Text → [`Template`] / [`Expr`] / [`InputSpec`].
//!
//! Owns: the grammar (see the parent module), byte offsets in errors, and the nesting and size
//! limits that keep hostile input from exhausting the stack.
//! Does not own: evaluation (`eval.rs`) or what any reference means.
//!
//! A hand-written recursive-descent parser working on the source string directly, without a
//! separate lexer: whether `-` continues a name (`my-var`) or subtracts, and whether `>` closes
//! `<+` or compares, depends on where the parser is, which a context-free lexer cannot know.

use super::method_spec;
use super::{BinOp, Expr, ExprError, InputSpec, METHODS, Path, Piece, Seg, Template, Val};

/// Deepest nesting of parentheses, `<+ >`, calls and unary operators. Each level costs a few
/// stack frames; 48 is far beyond any real pipeline and far below any stack limit.
const MAX_DEPTH: usize = 48;
/// Most operators and segments in one expression. Long `a + b + c ...` chains do not nest in
/// the parser but do in the tree, and evaluating it recurses once per level (about 2 KiB a
/// level in a debug build). Real conditions have a handful of operators.
const MAX_NODES: usize = 200;

/// Every error of the expressions in `s`, not only the first: after an error, parsing starts
/// again at the next `<+` past it. At most `MAX_TEMPLATE_ERRORS`, so a string of broken
/// expressions is not reported a hundred times. Empty when [`parse_template`] succeeds.
pub fn template_errors(s: &str) -> Vec<ExprError> {
    const MAX_TEMPLATE_ERRORS: usize = 10;
    let mut out = Vec::new();
    let mut base = 0;
    while out.len() < MAX_TEMPLATE_ERRORS {
        let Err(mut e) = parse_template(&s[base..]) else {
            break;
        };
        e.offset += base;
        // Past the error, on a character boundary.
        let mut resume = (e.offset + 1).min(s.len());
        while !s.is_char_boundary(resume) {
            resume += 1;
        }
        out.push(e);
        match s[resume..].find("<+") {
            Some(next) => base = resume + next,
            None => break,
        }
    }
    out
}

/// Parses text with embedded `<+...>` expressions. Text between them is kept as is.
///
/// `<+input>` (a runtime-input marker) becomes a reference to `input`; when it is followed by
/// methods (`<+input>.default(dev).allowedValues(dev,prod)`), the rest of the string belongs to
/// it: one [`Piece::Expr`] whose `src` is the whole tail, which must be a valid input spec
/// (see [`parse_input`]).
pub fn parse_template(s: &str) -> Result<Template, ExprError> {
    let mut pieces = Vec::new();
    let mut lit = String::new();
    let mut i = 0;
    while let Some(rel) = s[i..].find("<+") {
        let at = i + rel;
        lit.push_str(&s[i..at]);
        if !lit.is_empty() {
            pieces.push(Piece::Lit(std::mem::take(&mut lit)));
        }
        if s[at..].starts_with(INPUT) {
            let after = at + INPUT.len();
            let input = Expr::Ref(Path::of(&["input"]));
            // `.default(...)` and friends; a bare `.` is the end of a sentence.
            let methods_follow = s[after..].starts_with('.')
                && s.as_bytes()
                    .get(after + 1)
                    .is_some_and(u8::is_ascii_alphabetic);
            if methods_follow {
                parse_input_tail(s, after, s.len())?;
                pieces.push(Piece::Expr {
                    expr: input,
                    src: s[at..].to_string(),
                    offset: at,
                });
                i = s.len();
                break;
            }
            pieces.push(Piece::Expr {
                expr: input,
                src: INPUT.to_string(),
                offset: at,
            });
            i = after;
            continue;
        }
        let mut p = Parser::new(s, at);
        let expr = p.parse_wrapped()?;
        pieces.push(Piece::Expr {
            expr,
            src: s[at..p.pos].to_string(),
            offset: at,
        });
        i = p.pos;
    }
    lit.push_str(&s[i..]);
    if !lit.is_empty() {
        pieces.push(Piece::Lit(lit));
    }
    Ok(Template { pieces })
}

/// Parses a whole `when.condition`: `<+codebase.branch> == "main" && !<+x>.isEmpty()`.
/// References must be wrapped in `<+ >` here; a bare name is an error that says so.
pub fn parse_condition(s: &str) -> Result<Expr, ExprError> {
    let mut p = Parser::new(s, 0);
    p.skip_ws();
    if p.at_end() {
        return Err(ExprError::syntax(0, "empty condition"));
    }
    let e = p.parse_ternary()?;
    p.skip_ws();
    if !p.at_end() {
        return Err(p.unexpected());
    }
    Ok(e)
}

const INPUT: &str = "<+input>";

/// Reads a runtime-input marker: `<+input>`, optionally followed (in any order) by
/// `.default(v)`, `.allowedValues(a, b)` (also `.selectOneFrom`, `.selectManyFrom`),
/// `.regex(re)` and `.executionInput()`. Values may be quoted or not; Harness writes them bare.
///
/// `None` when `s` (trimmed) does not start with `<+input>`; `Some(Err)` when the tail is
/// malformed, including a default that is not one of the allowed values.
pub fn parse_input(s: &str) -> Option<Result<InputSpec, ExprError>> {
    let lead = s.len() - s.trim_start().len();
    let trimmed = s.trim();
    if !trimmed.starts_with(INPUT) {
        return None;
    }
    Some(parse_input_tail(
        s,
        lead + INPUT.len(),
        lead + trimmed.len(),
    ))
}

/// Parses the methods after `<+input>`, from byte `start` to `end` of `src`; offsets in errors
/// are into `src`.
fn parse_input_tail(src: &str, start: usize, end: usize) -> Result<InputSpec, ExprError> {
    let b = src.as_bytes();
    let mut spec = InputSpec::default();
    let mut has_allowed = false;
    let mut select_many = false;
    let mut i = start;
    while i < end {
        if src[i..end].trim().is_empty() {
            break;
        }
        if b[i] != b'.' {
            let at = end - src[i..end].trim_start().len();
            return Err(ExprError::syntax(
                at,
                format!(
                    "unexpected text after <+input>: {:?}; runtime inputs take methods such as .default(v) or .allowedValues(a, b)",
                    snippet(&src[at..end])
                ),
            ));
        }
        let name_start = i + 1;
        let mut j = name_start;
        while j < end && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
            j += 1;
        }
        let name = &src[name_start..j];
        if name.is_empty() {
            return Err(ExprError::syntax(i, "expected a method name after '.'"));
        }
        if j >= end || b[j] != b'(' {
            return Err(ExprError::syntax(
                j,
                format!("expected '(' after '.{name}'"),
            ));
        }
        let Some(close) = find_close_paren(src, j, end) else {
            return Err(ExprError::syntax(
                j,
                format!("missing ')' to close '.{name}('"),
            ));
        };
        let raw = &src[j + 1..close];
        let duplicate = || ExprError::syntax(i, format!(".{name}(...) is given twice"));
        match name {
            "default" => {
                if spec.default.is_some() {
                    return Err(duplicate());
                }
                spec.default = Some(unquote(raw.trim()));
            }
            "allowedValues" | "selectOneFrom" | "selectManyFrom" => {
                if has_allowed {
                    return Err(ExprError::syntax(
                        i,
                        "allowed values are given twice (allowedValues, selectOneFrom, selectManyFrom)",
                    ));
                }
                has_allowed = true;
                select_many = name == "selectManyFrom";
                spec.allowed = split_values(raw);
                if spec.allowed.is_empty() {
                    return Err(ExprError::syntax(
                        j,
                        format!(".{name}() needs at least one value"),
                    ));
                }
            }
            "regex" => {
                if spec.regex.is_some() {
                    return Err(duplicate());
                }
                let re = unquote(raw.trim());
                if re.is_empty() {
                    return Err(ExprError::syntax(j, ".regex() needs a pattern"));
                }
                spec.regex = Some(re);
            }
            "executionInput" => {
                if !raw.trim().is_empty() {
                    return Err(ExprError::syntax(
                        j + 1,
                        ".executionInput() takes no arguments",
                    ));
                }
                spec.execution_input = true;
            }
            _ => {
                return Err(ExprError::syntax(
                    name_start,
                    format!(
                        "unknown runtime input method '.{name}()': use .default, .allowedValues, .selectOneFrom, .selectManyFrom, .regex or .executionInput"
                    ),
                ));
            }
        }
        i = close + 1;
    }
    // Harness refuses a default outside the allowed list; catching it here puts the error on
    // the pipeline line instead of at run time. A multi-select default is a list, so skip it.
    if let Some(default) = &spec.default
        && !spec.allowed.is_empty()
        && !select_many
        && !spec.allowed.contains(default)
    {
        return Err(ExprError::syntax(
            start,
            format!(
                "default {default:?} is not one of the allowed values {}",
                spec.allowed.join(", ")
            ),
        ));
    }
    Ok(spec)
}

/// The `)` matching the `(` at `open`, skipping quoted text and backslash escapes. An
/// unmatched quote counts as a plain character: `.default(it's)` is fine.
fn find_close_paren(src: &str, open: usize, end: usize) -> Option<usize> {
    let b = src.as_bytes();
    let mut depth = 0usize;
    let mut k = open;
    while k < end {
        match b[k] {
            b'\\' => k += 1,
            q @ (b'"' | b'\'') => {
                if let Some(rel) = src[k + 1..end].find(q as char) {
                    k += rel + 1;
                }
            }
            b'(' => depth += 1,
            b')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(k);
                }
            }
            _ => {}
        }
        k += 1;
    }
    None
}

/// Splits `a, "b,c", d` on commas outside quotes and brackets; trims and unquotes each value
/// and drops empty unquoted ones (a trailing comma).
fn split_values(raw: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    let mut start = 0;
    for (k, c) in raw.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match (quote, c) {
            (_, '\\') => escaped = true,
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '[' | '(' | '{') => depth += 1,
            (None, ']' | ')' | '}') => depth = depth.saturating_sub(1),
            (None, ',') if depth == 0 => {
                push_value(&mut out, &raw[start..k]);
                start = k + 1;
            }
            _ => {}
        }
    }
    push_value(&mut out, &raw[start..]);
    out
}

fn push_value(out: &mut Vec<String>, item: &str) {
    let item = item.trim();
    if !item.is_empty() {
        out.push(unquote(item));
    }
}

/// `"a\"b"` → `a"b`, `'x'` → `x`; anything not wholly quoted is returned as is.
fn unquote(s: &str) -> String {
    let b = s.as_bytes();
    if b.len() >= 2 && (b[0] == b'"' || b[0] == b'\'') && b[b.len() - 1] == b[0] {
        let mut out = String::new();
        let mut chars = s[1..s.len() - 1].chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            } else {
                out.push(c);
            }
        }
        out
    } else {
        s.to_string()
    }
}

/// At most 40 characters of `s`, for error messages.
fn snippet(s: &str) -> String {
    let s = s.trim_end();
    match s.char_indices().nth(40) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_string(),
    }
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_'
}

/// Harness identifiers are `[A-Za-z_][A-Za-z0-9_$]*`; variable and output names also use `-`.
fn is_ident_continue(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c == b'-'
}

struct Parser<'a> {
    src: &'a str,
    pos: usize,
    depth: usize,
    nodes: usize,
    /// How many `<+ >` enclose the current position; bare paths are allowed when > 0.
    wrappers: usize,
    /// The innermost open bracket is a `<+`, so a `>` may close it rather than compare.
    gt_closes: bool,
}

impl<'a> Parser<'a> {
    fn new(src: &'a str, pos: usize) -> Self {
        Parser {
            src,
            pos,
            depth: 0,
            nodes: 0,
            wrappers: 0,
            gt_closes: false,
        }
    }

    fn bytes(&self) -> &'a [u8] {
        self.src.as_bytes()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.pos).copied()
    }

    fn peek_at(&self, n: usize) -> Option<u8> {
        self.bytes().get(self.pos + n).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.src.len()
    }

    fn starts(&self, s: &str) -> bool {
        self.src[self.pos..].starts_with(s)
    }

    fn eat(&mut self, s: &str) -> bool {
        if self.starts(s) {
            self.pos += s.len();
            true
        } else {
            false
        }
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    fn unexpected(&self) -> ExprError {
        match self.src[self.pos..].chars().next() {
            None => ExprError::syntax(self.src.len(), "unexpected end of expression"),
            Some(c) => ExprError::syntax(self.pos, format!("unexpected '{c}' in expression")),
        }
    }

    fn enter(&mut self) -> Result<(), ExprError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(ExprError::syntax(self.pos, "expression nested too deeply"));
        }
        Ok(())
    }

    fn leave(&mut self) {
        self.depth -= 1;
    }

    fn node(&mut self) -> Result<(), ExprError> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(ExprError::syntax(self.pos, "expression too long"));
        }
        Ok(())
    }

    /// Runs `f` with `>` as a plain operator (inside `( )`, `[ ]` or call arguments).
    fn bracketed<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, ExprError>,
    ) -> Result<T, ExprError> {
        self.enter()?;
        let saved = self.gt_closes;
        self.gt_closes = false;
        let out = f(self)?;
        self.gt_closes = saved;
        self.leave();
        Ok(out)
    }

    /// `<+ expr >` at `self.pos`.
    fn parse_wrapped(&mut self) -> Result<Expr, ExprError> {
        let start = self.pos;
        self.pos += 2;
        self.enter()?;
        let saved = self.gt_closes;
        self.gt_closes = true;
        self.wrappers += 1;
        self.skip_ws();
        if self.peek() == Some(b'>') {
            return Err(ExprError::syntax(start, "empty expression '<+>'"));
        }
        let e = match self.parse_ternary() {
            Ok(e) => e,
            Err(err) if err.offset >= self.src.len() => return Err(self.unterminated(start)),
            Err(err) => return Err(err),
        };
        self.skip_ws();
        if !self.eat(">") {
            return Err(if self.at_end() {
                self.unterminated(start)
            } else {
                self.unexpected()
            });
        }
        self.wrappers -= 1;
        self.gt_closes = saved;
        self.leave();
        Ok(e)
    }

    fn unterminated(&self, start: usize) -> ExprError {
        ExprError::syntax(
            start,
            format!(
                "unterminated expression: missing '>' after {:?}",
                snippet(&self.src[start..])
            ),
        )
    }

    /// Whether the `>` (or `>=`, `len` bytes) at `self.pos` inside `<+ >` compares rather than
    /// closes: spaced on both sides, with another `>` further on to close the expression.
    fn gt_is_operator(&self, len: usize) -> bool {
        let b = self.bytes();
        let spaced_before = self.pos > 0 && b[self.pos - 1].is_ascii_whitespace();
        let spaced_after = b
            .get(self.pos + len)
            .is_some_and(|c| c.is_ascii_whitespace());
        spaced_before && spaced_after && self.closer_follows(self.pos + len)
    }

    /// Whether a `>` that would close the current `<+` appears at or after `from`, skipping
    /// quoted text and nested `<+ >`.
    fn closer_follows(&self, from: usize) -> bool {
        let b = self.bytes();
        let mut nested = 0usize;
        let mut k = from;
        while k < b.len() {
            match b[k] {
                b'\\' => k += 1,
                q @ (b'"' | b'\'') => match self.src[k + 1..].find(q as char) {
                    Some(rel) => k += rel + 1,
                    None => return false,
                },
                b'<' if b.get(k + 1) == Some(&b'+') => {
                    nested += 1;
                    k += 1;
                }
                b'>' if nested == 0 => return true,
                b'>' => nested -= 1,
                _ => {}
            }
            k += 1;
        }
        false
    }

    fn parse_ternary(&mut self) -> Result<Expr, ExprError> {
        let cond = self.parse_or()?;
        self.skip_ws();
        if self.peek() != Some(b'?') {
            return Ok(cond);
        }
        self.pos += 1;
        self.enter()?;
        let then = self.parse_ternary()?;
        self.skip_ws();
        if !self.eat(":") {
            return Err(if self.at_end() {
                ExprError::syntax(
                    self.src.len(),
                    "unexpected end of expression: missing ':' of '? :'",
                )
            } else {
                self.unexpected()
            });
        }
        let otherwise = self.parse_ternary()?;
        self.leave();
        self.node()?;
        Ok(Expr::Cond(
            Box::new(cond),
            Box::new(then),
            Box::new(otherwise),
        ))
    }

    fn parse_or(&mut self) -> Result<Expr, ExprError> {
        let mut left = self.parse_and()?;
        loop {
            self.skip_ws();
            if !self.eat("||") {
                return Ok(left);
            }
            let right = self.parse_and()?;
            self.node()?;
            left = Expr::Bin(BinOp::Or, Box::new(left), Box::new(right));
        }
    }

    fn parse_and(&mut self) -> Result<Expr, ExprError> {
        let mut left = self.parse_eq()?;
        loop {
            self.skip_ws();
            if !self.eat("&&") {
                return Ok(left);
            }
            let right = self.parse_eq()?;
            self.node()?;
            left = Expr::Bin(BinOp::And, Box::new(left), Box::new(right));
        }
    }

    fn parse_eq(&mut self) -> Result<Expr, ExprError> {
        let mut left = self.parse_rel()?;
        loop {
            self.skip_ws();
            let op = if self.eat("==") {
                BinOp::Eq
            } else if self.eat("!=") {
                BinOp::Ne
            } else {
                return Ok(left);
            };
            let right = self.parse_rel()?;
            self.node()?;
            left = Expr::Bin(op, Box::new(left), Box::new(right));
        }
    }

    fn parse_rel(&mut self) -> Result<Expr, ExprError> {
        let mut left = self.parse_add()?;
        loop {
            self.skip_ws();
            let (op, len) = if self.starts("<=") {
                (BinOp::Le, 2)
            } else if self.starts("<+") {
                return Ok(left);
            } else if self.starts("<") {
                (BinOp::Lt, 1)
            } else if self.starts(">=") {
                (BinOp::Ge, 2)
            } else if self.starts(">") {
                (BinOp::Gt, 1)
            } else {
                return Ok(left);
            };
            if matches!(op, BinOp::Gt | BinOp::Ge) && self.gt_closes && !self.gt_is_operator(len) {
                return Ok(left);
            }
            self.pos += len;
            let right = self.parse_add()?;
            self.node()?;
            left = Expr::Bin(op, Box::new(left), Box::new(right));
        }
    }

    fn parse_add(&mut self) -> Result<Expr, ExprError> {
        let mut left = self.parse_unary()?;
        loop {
            self.skip_ws();
            let op = match self.peek() {
                Some(b'+') => BinOp::Add,
                Some(b'-') => BinOp::Sub,
                _ => return Ok(left),
            };
            self.pos += 1;
            let right = self.parse_unary()?;
            self.node()?;
            left = Expr::Bin(op, Box::new(left), Box::new(right));
        }
    }

    fn parse_unary(&mut self) -> Result<Expr, ExprError> {
        self.skip_ws();
        match (self.peek(), self.peek_at(1)) {
            (Some(b'!'), next) if next != Some(b'=') => {
                self.pos += 1;
                self.enter()?;
                let e = self.parse_unary()?;
                self.leave();
                self.node()?;
                Ok(Expr::Not(Box::new(e)))
            }
            (Some(b'-'), _) => {
                self.pos += 1;
                self.enter()?;
                let e = self.parse_unary()?;
                self.leave();
                Ok(match e {
                    Expr::Lit(Val::Num(n)) => Expr::Lit(Val::Num(-n)),
                    e => {
                        self.node()?;
                        Expr::Bin(BinOp::Sub, Box::new(Expr::Lit(Val::Num(0.0))), Box::new(e))
                    }
                })
            }
            _ => self.parse_postfix(),
        }
    }

    fn parse_postfix(&mut self) -> Result<Expr, ExprError> {
        let mut e = self.parse_primary()?;
        while self.peek() == Some(b'.') && self.peek_at(1).is_some_and(is_ident_start) {
            let dot = self.pos;
            self.pos += 1;
            let name = self.ident();
            if self.peek() != Some(b'(') {
                return Err(ExprError::syntax(
                    dot,
                    format!(
                        "unexpected '.{name}': only methods can follow an expression, as in .{name}(...)"
                    ),
                ));
            }
            let spec = method_spec(name).ok_or_else(|| unknown_method(dot + 1, name))?;
            let args = self.parse_args(name)?;
            if args.len() < spec.min_args || args.len() > spec.max_args {
                return Err(ExprError::syntax(
                    dot + 1,
                    arity_message(spec.name, spec.min_args, spec.max_args, args.len()),
                ));
            }
            self.node()?;
            e = Expr::Method(Box::new(e), name.to_string(), args);
        }
        Ok(e)
    }

    /// Reads an identifier at `self.pos` (the caller checked its first character).
    fn ident(&mut self) -> &'a str {
        let start = self.pos;
        let b = self.bytes();
        while self.pos < b.len() && is_ident_continue(b[self.pos]) {
            self.pos += 1;
        }
        &self.src[start..self.pos]
    }

    /// `( arg, ... )` at `self.pos`.
    fn parse_args(&mut self, name: &str) -> Result<Vec<Expr>, ExprError> {
        let open = self.pos;
        self.pos += 1;
        self.bracketed(|p| {
            let mut args = Vec::new();
            p.skip_ws();
            if p.eat(")") {
                return Ok(args);
            }
            loop {
                // Running off the end inside the parentheses: the call is what is unclosed
                // (`<+secrets.getValue("t">` reads the `>` as a comparison in there).
                let arg = p.parse_ternary().map_err(|e| {
                    if e.offset >= p.src.len() {
                        ExprError::syntax(open, format!("missing ')' to close '{name}('"))
                    } else {
                        e
                    }
                })?;
                args.push(arg);
                p.skip_ws();
                if p.eat(",") {
                    continue;
                }
                if p.eat(")") {
                    return Ok(args);
                }
                return Err(if p.at_end() {
                    ExprError::syntax(open, format!("missing ')' to close '{name}('"))
                } else {
                    p.unexpected()
                });
            }
        })
    }

    fn parse_primary(&mut self) -> Result<Expr, ExprError> {
        self.skip_ws();
        let Some(c) = self.peek() else {
            return Err(self.unexpected());
        };
        match c {
            b'(' => {
                let open = self.pos;
                self.pos += 1;
                self.bracketed(|p| {
                    let e = p.parse_ternary()?;
                    p.skip_ws();
                    if p.eat(")") {
                        Ok(e)
                    } else if p.at_end() {
                        Err(ExprError::syntax(open, "missing ')' to close '('"))
                    } else {
                        Err(p.unexpected())
                    }
                })
            }
            b'"' | b'\'' => self.parse_string(),
            b'0'..=b'9' => self.parse_number(),
            b'<' if self.peek_at(1) == Some(b'+') => self.parse_wrapped(),
            c if is_ident_start(c) => {
                let start = self.pos;
                let word = self.ident();
                match word {
                    "true" => return Ok(Expr::Lit(Val::Bool(true))),
                    "false" => return Ok(Expr::Lit(Val::Bool(false))),
                    "null" => return Ok(Expr::Lit(Val::Null)),
                    _ => {}
                }
                if self.wrappers == 0 {
                    return Err(ExprError::syntax(
                        start,
                        format!(
                            "bare name '{word}' in a condition: write references as <+{word}> and text as \"{word}\""
                        ),
                    ));
                }
                self.parse_path(word)
            }
            _ => Err(self.unexpected()),
        }
    }

    /// The rest of a bare path whose first name was just read.
    fn parse_path(&mut self, first: &str) -> Result<Expr, ExprError> {
        let mut segs = vec![Seg::Name(first.to_string())];
        loop {
            let after_dot = self.peek_at(1);
            if self.peek() == Some(b'.')
                && after_dot.is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_')
            {
                let dot = self.pos;
                self.pos += 1;
                let name = self.ident();
                if self.peek() == Some(b'(') {
                    if method_spec(name).is_some() {
                        // A string method applied to the value, not part of the path.
                        self.pos = dot;
                        break;
                    }
                    let args = self.parse_args(name)?;
                    segs.push(Seg::Call(name.to_string(), args));
                } else {
                    segs.push(Seg::Name(name.to_string()));
                }
            } else if self.peek() == Some(b'[') {
                let open = self.pos;
                self.pos += 1;
                let index = self.bracketed(|p| {
                    let e = p.parse_ternary()?;
                    p.skip_ws();
                    if p.eat("]") {
                        Ok(e)
                    } else if p.at_end() {
                        Err(ExprError::syntax(open, "missing ']' to close '['"))
                    } else {
                        Err(p.unexpected())
                    }
                })?;
                segs.push(Seg::Index(Box::new(index)));
            } else {
                break;
            }
            self.node()?;
        }
        // A method call is handled by parse_postfix; the path stops before it.
        Ok(Expr::Ref(Path { segs }))
    }

    fn parse_number(&mut self) -> Result<Expr, ExprError> {
        let start = self.pos;
        let b = self.bytes();
        let digits = |p: &mut Self| {
            while p.peek().is_some_and(|c| c.is_ascii_digit()) {
                p.pos += 1;
            }
        };
        digits(self);
        if self.peek() == Some(b'.') && self.peek_at(1).is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
            digits(self);
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            let sign = usize::from(matches!(self.peek_at(1), Some(b'+' | b'-')));
            if b.get(self.pos + 1 + sign)
                .is_some_and(|c| c.is_ascii_digit())
            {
                self.pos += 1 + sign;
                digits(self);
            }
        }
        let text = &self.src[start..self.pos];
        match text.parse::<f64>() {
            Ok(n) if n.is_finite() => Ok(Expr::Lit(Val::Num(n))),
            _ => Err(ExprError::syntax(
                start,
                format!("number {text} is out of range"),
            )),
        }
    }

    /// A quoted string. `<+...>` inside it is an expression, as Harness resolves nested
    /// expressions first: the result is a concatenation.
    fn parse_string(&mut self) -> Result<Expr, ExprError> {
        let open = self.pos;
        let quote = self.src[open..].chars().next().unwrap_or('"');
        self.pos += 1;
        let mut head = String::new();
        let mut parts: Vec<(Expr, String)> = Vec::new();
        loop {
            let Some(c) = self.src[self.pos..].chars().next() else {
                return Err(ExprError::syntax(
                    open,
                    format!("unterminated string: missing closing {quote}"),
                ));
            };
            let text = match parts.last_mut() {
                Some((_, tail)) => tail,
                None => &mut head,
            };
            if c == quote {
                self.pos += 1;
                break;
            }
            if c == '\\' {
                self.pos += 1;
                let Some(esc) = self.src[self.pos..].chars().next() else {
                    continue;
                };
                self.pos += esc.len_utf8();
                text.push(match esc {
                    'n' => '\n',
                    't' => '\t',
                    'r' => '\r',
                    '0' => '\0',
                    other => other,
                });
            } else if self.starts("<+") {
                let e = self.parse_wrapped()?;
                self.node()?;
                parts.push((e, String::new()));
            } else {
                text.push(c);
                self.pos += c.len_utf8();
            }
        }
        let mut acc = Expr::Lit(Val::Str(head));
        for (e, tail) in parts {
            // Starting from the (possibly empty) leading text keeps `+` a concatenation even
            // when the nested values are numbers.
            acc = Expr::Bin(BinOp::Add, Box::new(acc), Box::new(e));
            if !tail.is_empty() {
                acc = Expr::Bin(
                    BinOp::Add,
                    Box::new(acc),
                    Box::new(Expr::Lit(Val::Str(tail))),
                );
            }
        }
        Ok(acc)
    }
}

fn unknown_method(offset: usize, name: &str) -> ExprError {
    let known: Vec<&str> = METHODS.iter().map(|m| m.name).collect();
    ExprError::syntax(
        offset,
        format!(
            "unknown method '{name}()': supported methods are {}",
            known.join(", ")
        ),
    )
}

pub(super) fn arity_message(name: &str, min: usize, max: usize, got: usize) -> String {
    let plural = |n: usize| if n == 1 { "argument" } else { "arguments" };
    if min == max {
        format!("{name}() takes {min} {}, got {got}", plural(min))
    } else {
        format!("{name}() takes {min} to {max} arguments, got {got}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Expr {
        Expr::Lit(Val::Str(v.into()))
    }
    fn n(v: f64) -> Expr {
        Expr::Lit(Val::Num(v))
    }
    fn r(path: &str) -> Expr {
        Expr::Ref(Path::of(&path.split('.').collect::<Vec<_>>()))
    }
    fn bin(op: BinOp, a: Expr, b: Expr) -> Expr {
        Expr::Bin(op, Box::new(a), Box::new(b))
    }
    fn method(recv: Expr, name: &str, args: Vec<Expr>) -> Expr {
        Expr::Method(Box::new(recv), name.into(), args)
    }
    fn cond(src: &str) -> Expr {
        parse_condition(src).unwrap_or_else(|e| panic!("{src}: {e} at {}", e.offset))
    }
    fn cond_err(src: &str) -> ExprError {
        match parse_condition(src) {
            Ok(e) => panic!("{src} parsed as {e:?}"),
            Err(e) => e,
        }
    }
    fn exprs(t: &Template) -> Vec<(&Expr, &str, usize)> {
        t.pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Expr { expr, src, offset } => Some((expr, src.as_str(), *offset)),
                Piece::Lit(_) => None,
            })
            .collect()
    }

    #[test]
    fn template_splits_text_and_expressions() {
        let t = parse_template("psql -h <+pipeline.variables.host> -p 5433").unwrap();
        assert_eq!(
            t.pieces,
            vec![
                Piece::Lit("psql -h ".into()),
                Piece::Expr {
                    expr: r("pipeline.variables.host"),
                    src: "<+pipeline.variables.host>".into(),
                    offset: 8
                },
                Piece::Lit(" -p 5433".into()),
            ]
        );
    }

    #[test]
    fn template_plain_and_empty() {
        assert_eq!(parse_template("").unwrap().pieces, vec![]);
        let t = parse_template("a < b > c <= d + e").unwrap();
        assert!(t.is_plain());
        assert_eq!(t.pieces, vec![Piece::Lit("a < b > c <= d + e".into())]);
    }

    #[test]
    fn template_adjacent_and_glued_expressions() {
        let t = parse_template(
            "<+pipeline.variables.RUNNER_IMAGE_REPO>:<+pipeline.variables.GO_VERSION>-tf<+pipeline.variables.TERRAFORM_VERSION>",
        )
        .unwrap();
        let e = exprs(&t);
        assert_eq!(e.len(), 3);
        assert_eq!(e[1].0, &r("pipeline.variables.GO_VERSION"));
        assert_eq!(e[1].2, 40);
        let t = parse_template("<+a><+b>").unwrap();
        assert_eq!(t.pieces.len(), 2);
        // Text right after `>` is text, even when it looks like a method call.
        let t = parse_template("<+matrix.repo>.exe and <+x>.toLowerCase()").unwrap();
        assert_eq!(
            t.pieces,
            vec![
                Piece::Expr {
                    expr: r("matrix.repo"),
                    src: "<+matrix.repo>".into(),
                    offset: 0
                },
                Piece::Lit(".exe and ".into()),
                Piece::Expr {
                    expr: r("x"),
                    src: "<+x>".into(),
                    offset: 23
                },
                Piece::Lit(".toLowerCase()".into()),
            ]
        );
    }

    #[test]
    fn template_shell_redirect_after_expression() {
        let t = parse_template("echo <+pipeline.variables.x> > out.txt 2>&1").unwrap();
        assert_eq!(exprs(&t).len(), 1);
        assert_eq!(t.pieces.last(), Some(&Piece::Lit(" > out.txt 2>&1".into())));
        let t = parse_template("echo <+ x > out.txt").unwrap();
        assert_eq!(exprs(&t)[0].0, &r("x"));
    }

    #[test]
    fn secrets_get_value_is_a_call_segment() {
        for src in [
            r#"<+secrets.getValue("id")>"#,
            "<+secrets.getValue('id')>",
            "<+secrets.getValue( 'id' )>",
        ] {
            let t = parse_template(src).unwrap();
            assert_eq!(
                exprs(&t)[0].0,
                &Expr::Ref(Path {
                    segs: vec![
                        Seg::Name("secrets".into()),
                        Seg::Call("getValue".into(), vec![s("id")])
                    ]
                }),
                "{src}"
            );
        }
        let t = parse_template("<+secrets.getValue('account.jfrog-username')>").unwrap();
        assert_eq!(
            t.references()[0].segs[1],
            Seg::Call("getValue".into(), vec![s("account.jfrog-username")])
        );
    }

    #[test]
    fn path_shapes() {
        let t = parse_template(
            "<+pipeline.stages.build.spec.execution.steps.sg1.steps.Run_1.output.outputVariables.V>",
        )
        .unwrap();
        assert_eq!(t.references()[0].segs.len(), 12);
        for p in [
            "steps.Run_1.output.outputVariables.VAR",
            "matrix.os",
            "strategy.iteration",
            "repeat.item",
            "env.HOME",
            "codebase.branch",
            "input",
            "pipeline.variables.my-var",
            "stage.variables.a$b",
            "pipeline.stages.s.0.name",
        ] {
            let t = parse_template(&format!("<+{p}>")).unwrap();
            let got = t.references()[0].to_string();
            assert_eq!(got, p);
        }
        let t = parse_template(r#"<+eventPayload.commits["0"].message>"#).unwrap();
        assert_eq!(
            t.references()[0].segs,
            vec![
                Seg::Name("eventPayload".into()),
                Seg::Name("commits".into()),
                Seg::Index(Box::new(s("0"))),
                Seg::Name("message".into()),
            ]
        );
    }

    #[test]
    fn whitespace_inside_wrapper() {
        let t = parse_template("<+ pipeline.variables.x >").unwrap();
        assert_eq!(exprs(&t)[0].0, &r("pipeline.variables.x"));
    }

    #[test]
    fn nested_wrappers_and_methods_inside_a_template() {
        let t = parse_template(
            "<+<+codebase.repoUrl>.substring(<+codebase.repoUrl>.lastIndexOf('/') + 1)>",
        )
        .unwrap();
        assert_eq!(
            exprs(&t)[0].0,
            &method(
                r("codebase.repoUrl"),
                "substring",
                vec![bin(
                    BinOp::Add,
                    method(r("codebase.repoUrl"), "lastIndexOf", vec![s("/")]),
                    n(1.0)
                )]
            )
        );
        // A method call written inside the path belongs to the value, not the path.
        let t = parse_template("<+pipeline.variables.x.toLowerCase()>").unwrap();
        assert_eq!(
            exprs(&t)[0].0,
            &method(r("pipeline.variables.x"), "toLowerCase", vec![])
        );
        let t = parse_template(r#"<+secrets.getValue("a").trim()>"#).unwrap();
        assert!(matches!(exprs(&t)[0].0, Expr::Method(_, m, _) if m == "trim"));
    }

    #[test]
    fn greater_than_inside_a_wrapper() {
        let t = parse_template("<+ <+a>.length() > 3 >").unwrap();
        assert_eq!(
            exprs(&t)[0].0,
            &bin(BinOp::Gt, method(r("a"), "length", vec![]), n(3.0))
        );
        let t = parse_template("<+ a >= 3 > tail").unwrap();
        assert_eq!(exprs(&t)[0].0, &bin(BinOp::Ge, r("a"), n(3.0)));
        assert_eq!(t.pieces.last(), Some(&Piece::Lit(" tail".into())));
        let t = parse_template("<+(a > 3)>").unwrap();
        assert_eq!(exprs(&t)[0].0, &bin(BinOp::Gt, r("a"), n(3.0)));
        let t = parse_template(r#"<+a.contains(">")>"#).unwrap();
        assert_eq!(exprs(&t)[0].0, &method(r("a"), "contains", vec![s(">")]));
        // Unspaced: closes.
        let t = parse_template("<+a>3").unwrap();
        assert_eq!(t.pieces.last(), Some(&Piece::Lit("3".into())));
    }

    #[test]
    fn greater_than_in_conditions() {
        assert_eq!(cond("<+a> > 3"), bin(BinOp::Gt, r("a"), n(3.0)));
        assert_eq!(cond("<+a>>3"), bin(BinOp::Gt, r("a"), n(3.0)));
        assert_eq!(cond("<+a>>=3"), bin(BinOp::Ge, r("a"), n(3.0)));
        assert_eq!(cond(r#"<+a>=="x""#), bin(BinOp::Eq, r("a"), s("x")));
        assert_eq!(cond("<+a><3"), bin(BinOp::Lt, r("a"), n(3.0)));
        assert_eq!(cond("<+a><=<+b>"), bin(BinOp::Le, r("a"), r("b")));
        assert_eq!(cond("<+<+a> > 3>"), bin(BinOp::Gt, r("a"), n(3.0)));
    }

    #[test]
    fn string_with_nested_expression_is_a_concatenation() {
        let t = parse_template(
            r#"<+secrets.getValue("org.vault://v<+pipeline.stages.build.variables.ENV>/x#y")>"#,
        )
        .unwrap();
        let arg = bin(
            BinOp::Add,
            bin(
                BinOp::Add,
                s("org.vault://v"),
                r("pipeline.stages.build.variables.ENV"),
            ),
            s("/x#y"),
        );
        assert_eq!(
            exprs(&t)[0].0,
            &Expr::Ref(Path {
                segs: vec![
                    Seg::Name("secrets".into()),
                    Seg::Call("getValue".into(), vec![arg])
                ]
            })
        );
        assert_eq!(cond(r#""<+a>""#), bin(BinOp::Add, s(""), r("a")));
        // An escaped `<` is text.
        assert_eq!(cond(r#""\<+a>""#), s("<+a>"));
    }

    #[test]
    fn index_with_expression() {
        let t =
            parse_template(r#"<+pipeline.stages["ExecuteMatrix"+ <+strategy.iteration>].status>"#)
                .unwrap();
        let p = t.references()[0];
        assert_eq!(
            p.segs[2],
            Seg::Index(Box::new(bin(
                BinOp::Add,
                s("ExecuteMatrix"),
                r("strategy.iteration")
            )))
        );
        assert_eq!(p.name(3), Some("status"));
    }

    #[test]
    fn literals() {
        assert_eq!(cond("\"a\""), s("a"));
        assert_eq!(cond("'a'"), s("a"));
        assert_eq!(cond(r#""a\"b\\c\n\t'""#), s("a\"b\\c\n\t'"));
        assert_eq!(cond(r#"'it\'s'"#), s("it's"));
        assert_eq!(cond("'日本'"), s("日本"));
        assert_eq!(cond("12"), n(12.0));
        assert_eq!(cond("1.5"), n(1.5));
        assert_eq!(cond("1e3"), n(1000.0));
        assert_eq!(cond("-2"), n(-2.0));
        assert_eq!(cond("true"), Expr::Lit(Val::Bool(true)));
        assert_eq!(cond("false"), Expr::Lit(Val::Bool(false)));
        assert_eq!(cond("null"), Expr::Lit(Val::Null));
        assert_eq!(cond(" \n false \n"), Expr::Lit(Val::Bool(false)));
    }

    #[test]
    fn precedence() {
        // || binds looser than &&.
        assert_eq!(
            cond("<+a> || <+b> && <+c>"),
            bin(BinOp::Or, r("a"), bin(BinOp::And, r("b"), r("c")))
        );
        // == binds looser than <, which binds looser than +.
        assert_eq!(
            cond("<+a> == <+b> < <+c> + 1"),
            bin(
                BinOp::Eq,
                r("a"),
                bin(BinOp::Lt, r("b"), bin(BinOp::Add, r("c"), n(1.0)))
            )
        );
        // ! applies to the method call result.
        assert_eq!(
            cond("!<+y>.isEmpty()"),
            Expr::Not(Box::new(method(r("y"), "isEmpty", vec![])))
        );
        // ?: is loosest and right-associative.
        assert_eq!(
            cond("<+a> || <+b> ? 1 : <+c> ? 2 : 3"),
            Expr::Cond(
                Box::new(bin(BinOp::Or, r("a"), r("b"))),
                Box::new(n(1.0)),
                Box::new(Expr::Cond(
                    Box::new(r("c")),
                    Box::new(n(2.0)),
                    Box::new(n(3.0))
                ))
            )
        );
        // Left-associative chains.
        assert_eq!(
            cond("1 - 2 - 3"),
            bin(BinOp::Sub, bin(BinOp::Sub, n(1.0), n(2.0)), n(3.0))
        );
        assert_eq!(
            cond("(<+a> || <+b>) && <+c>"),
            bin(BinOp::And, bin(BinOp::Or, r("a"), r("b")), r("c"))
        );
        assert_eq!(
            cond("!!<+a>"),
            Expr::Not(Box::new(Expr::Not(Box::new(r("a")))))
        );
        assert_eq!(cond("-<+a>"), bin(BinOp::Sub, n(0.0), r("a")));
    }

    #[test]
    fn brief_examples() {
        assert_eq!(
            cond(r#"<+codebase.branch> == "main" && <+pipeline.variables.deploy> != "false""#),
            bin(
                BinOp::And,
                bin(BinOp::Eq, r("codebase.branch"), s("main")),
                bin(BinOp::Ne, r("pipeline.variables.deploy"), s("false"))
            )
        );
        assert_eq!(
            cond("<+stage.variables.x> == 'a' || !<+pipeline.variables.y>.isEmpty()"),
            bin(
                BinOp::Or,
                bin(BinOp::Eq, r("stage.variables.x"), s("a")),
                Expr::Not(Box::new(method(
                    r("pipeline.variables.y"),
                    "isEmpty",
                    vec![]
                )))
            )
        );
        assert_eq!(
            cond("<+pipeline.variables.mvnTestCompileOnly> == \"false\"\n"),
            bin(
                BinOp::Eq,
                r("pipeline.variables.mvnTestCompileOnly"),
                s("false")
            )
        );
        assert_eq!(
            cond(r#"<+x>.contains("a") && <+x>.startsWith('b') || <+x>.endsWith("c")"#),
            bin(
                BinOp::Or,
                bin(
                    BinOp::And,
                    method(r("x"), "contains", vec![s("a")]),
                    method(r("x"), "startsWith", vec![s("b")])
                ),
                method(r("x"), "endsWith", vec![s("c")])
            )
        );
    }

    #[test]
    fn condition_errors_have_offsets_and_messages() {
        let e = cond_err("<+pipeline.variables.x");
        assert_eq!(e.offset, 0);
        assert_eq!(
            e.message,
            "unterminated expression: missing '>' after \"<+pipeline.variables.x\""
        );
        let e = cond_err("(<+a> == \"b\"))");
        assert_eq!(e.offset, 13);
        assert_eq!(e.message, "unexpected ')' in expression");
        let e = cond_err("(<+a> == \"b\"");
        assert_eq!(
            (e.offset, e.message.as_str()),
            (0, "missing ')' to close '('")
        );
        let e = cond_err("<+a> == \"b");
        assert_eq!(
            (e.offset, e.message.as_str()),
            (8, "unterminated string: missing closing \"")
        );
        let e = cond_err("branch == 'main'");
        assert_eq!(e.offset, 0);
        assert!(
            e.message.contains("write references as <+branch>"),
            "{}",
            e.message
        );
        let e = cond_err("<+a> ==");
        assert_eq!(
            (e.offset, e.message.as_str()),
            (7, "unexpected end of expression")
        );
        let e = cond_err("");
        assert_eq!(e.message, "empty condition");
        let e = cond_err("  ");
        assert_eq!(e.message, "empty condition");
        let e = cond_err("<+>");
        assert_eq!(e.message, "empty expression '<+>'");
        let e = cond_err("<+a>.foo()");
        assert_eq!(e.offset, 5);
        assert!(
            e.message
                .starts_with("unknown method 'foo()': supported methods are contains, ")
        );
        let e = cond_err("<+a>.length");
        assert_eq!(e.offset, 4);
        let e = cond_err("<+a>.contains()");
        assert_eq!(e.message, "contains() takes 1 argument, got 0");
        let e = cond_err("<+a>.substring()");
        assert_eq!(e.message, "substring() takes 1 to 2 arguments, got 0");
        let e = cond_err("<+a>.substring(1,2,3)");
        assert_eq!(e.message, "substring() takes 1 to 2 arguments, got 3");
        let e = cond_err("<+a>.contains('x'");
        assert_eq!(
            (e.offset, e.message.as_str()),
            (13, "missing ')' to close 'contains('")
        );
        // Every broken expression of a string is reported, each at its own place.
        let errs = template_errors("a <+> b <+x.y( c <+ok> d <+p.>");
        let at: Vec<usize> = errs.iter().map(|e| e.offset).collect();
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert_eq!(at[0], 2);
        assert!(errs[0].message.contains("empty expression"));
        assert!(at[1] >= 8 && at[2] > at[1], "{errs:?}");
        assert!(template_errors("fine <+a.b> text").is_empty());
        // Multi-byte text after an error does not trip the restart.
        assert_eq!(template_errors("<+>é<+>ü").len(), 2);
        // The `>` meant to close is read as a comparison inside the call: the call is unclosed.
        let e = parse_template("<+secrets.getValue(\"token\">").unwrap_err();
        assert_eq!(
            (e.offset, e.message.as_str()),
            (18, "missing ')' to close 'getValue('")
        );
        let e = cond_err("<+a[1>");
        assert_eq!(e.offset, 0);
        assert!(e.message.starts_with("unterminated expression"));
        // Spaced `>` with nothing after to close: it is the closer, and `2` is left over.
        let e = cond_err("<+a[1] > 2");
        assert_eq!(
            (e.offset, e.message.as_str()),
            (9, "unexpected '2' in expression")
        );
        let e = cond_err("<+a[1>]>");
        assert_eq!(
            (e.offset, e.message.as_str()),
            (6, "unexpected ']' in expression")
        );
        let e = cond_err("<+a> == 1 ? 2");
        assert!(e.message.contains("missing ':'"), "{}", e.message);
        let e = cond_err("<+a> = 1");
        assert_eq!(
            (e.offset, e.message.as_str()),
            (5, "unexpected '=' in expression")
        );
        let e = cond_err("<+a> == 'x' extra");
        assert_eq!(e.offset, 12);
        let e = cond_err("1e999");
        assert!(e.message.contains("out of range"));
    }

    #[test]
    fn template_errors_have_offsets() {
        let e = parse_template("echo <+pipeline.variables.x").unwrap_err();
        assert_eq!(e.offset, 5);
        assert_eq!(
            e.message,
            "unterminated expression: missing '>' after \"<+pipeline.variables.x\""
        );
        let e = parse_template("a <+b> c <+d e>").unwrap_err();
        assert_eq!(
            (e.offset, e.message.as_str()),
            (13, "unexpected 'e' in expression")
        );
        let e = parse_template("x <+").unwrap_err();
        assert_eq!(e.offset, 2);
        let e = parse_template("<+var x=[...]; return x>").unwrap_err();
        assert_eq!(e.offset, 6);
        let long = format!("<+{}", "a".repeat(100));
        let e = parse_template(&long).unwrap_err();
        assert!(e.message.ends_with("...\""), "{}", e.message);
    }

    #[test]
    fn input_markers_in_templates() {
        let t = parse_template("<+input>").unwrap();
        assert_eq!(
            t.pieces,
            vec![Piece::Expr {
                expr: r("input"),
                src: "<+input>".into(),
                offset: 0
            }]
        );
        let src = "<+input>.default(dev).allowedValues(dev, prod)";
        let t = parse_template(src).unwrap();
        assert_eq!(
            t.pieces,
            vec![Piece::Expr {
                expr: r("input"),
                src: src.into(),
                offset: 0
            }]
        );
        // In a sentence (a description), `<+input>` is just a reference.
        let t = parse_template("Takes `<+input>`, as usual").unwrap();
        assert_eq!(t.references().len(), 1);
        assert_eq!(t.pieces.len(), 3);
        let t = parse_template("Set it to <+input>.").unwrap();
        assert_eq!(t.pieces.last(), Some(&Piece::Lit(".".into())));
        let e = parse_template("x: <+input>.bogus(1)").unwrap_err();
        assert_eq!(e.offset, 12);
    }

    #[test]
    fn input_spec_forms() {
        let spec = |s: &str| parse_input(s).unwrap().unwrap();
        assert_eq!(spec("<+input>"), InputSpec::default());
        assert_eq!(spec("  <+input>  "), InputSpec::default());
        assert_eq!(spec("<+input>.default(1)").default.as_deref(), Some("1"));
        assert_eq!(
            spec("<+input>.default('a b')").default.as_deref(),
            Some("a b")
        );
        assert_eq!(
            spec("<+input>.default(\"x,y\")").default.as_deref(),
            Some("x,y")
        );
        assert_eq!(spec("<+input>.default()").default.as_deref(), Some(""));
        assert_eq!(
            spec("<+input>.allowedValues(true,false)").allowed,
            vec!["true", "false"]
        );
        assert_eq!(
            spec("<+input>.allowedValues(a, b,  c ,)").allowed,
            vec!["a", "b", "c"]
        );
        assert_eq!(
            spec(r#"<+input>.allowedValues("a,b", 'c', d)"#).allowed,
            vec!["a,b", "c", "d"]
        );
        assert_eq!(spec("<+input>.selectOneFrom(x,y)").allowed, vec!["x", "y"]);
        assert_eq!(
            spec("<+input>.selectManyFrom(x,y).default(x,y)").allowed,
            vec!["x", "y"]
        );
        assert_eq!(
            spec("<+input>.regex(^v[0-9]+$)").regex.as_deref(),
            Some("^v[0-9]+$")
        );
        assert_eq!(
            spec(r"<+input>.regex(^\(a|b\)$)").regex.as_deref(),
            Some(r"^\(a|b\)$")
        );
        assert!(spec("<+input>.executionInput()").execution_input);
        assert_eq!(
            spec("<+input>.executionInput().default(TRUE).allowedValues(TRUE,FALSE)"),
            InputSpec {
                default: Some("TRUE".into()),
                allowed: vec!["TRUE".into(), "FALSE".into()],
                regex: None,
                execution_input: true
            }
        );
        assert_eq!(
            spec("<+input>.default(it's)").default.as_deref(),
            Some("it's")
        );
    }

    #[test]
    fn input_spec_errors() {
        assert_eq!(parse_input("dev"), None);
        assert_eq!(parse_input("x <+input>"), None);
        assert_eq!(parse_input(""), None);
        let err = |s: &str| parse_input(s).unwrap().unwrap_err();
        let e = err("<+input>.bogus(1)");
        assert_eq!(e.offset, 9);
        assert!(
            e.message
                .starts_with("unknown runtime input method '.bogus()'")
        );
        let e = err("<+input>x");
        assert_eq!(e.offset, 8);
        assert!(e.message.starts_with("unexpected text after <+input>"));
        let e = err("<+input>.default(a");
        assert_eq!(
            (e.offset, e.message.as_str()),
            (16, "missing ')' to close '.default('")
        );
        let e = err("<+input>.default");
        assert_eq!(e.message, "expected '(' after '.default'");
        let e = err("<+input>.");
        assert_eq!(e.message, "expected a method name after '.'");
        let e = err("<+input>.default(a).default(b)");
        assert_eq!(e.message, ".default(...) is given twice");
        let e = err("<+input>.allowedValues()");
        assert_eq!(e.message, ".allowedValues() needs at least one value");
        let e = err("<+input>.allowedValues(a).selectOneFrom(b)");
        assert!(e.message.starts_with("allowed values are given twice"));
        let e = err("<+input>.executionInput(x)");
        assert_eq!(e.message, ".executionInput() takes no arguments");
        let e = err("<+input>.regex()");
        assert_eq!(e.message, ".regex() needs a pattern");
        let e = err("<+input>.default(qa).allowedValues(dev,prod)");
        assert_eq!(
            e.message,
            "default \"qa\" is not one of the allowed values dev, prod"
        );
        let e = err("<+input>.default(a) junk");
        assert_eq!(e.offset, 20);
        // Offsets count from the untrimmed text.
        let e = err("  <+input>.x()");
        assert_eq!(e.offset, 11);
    }

    #[test]
    fn split_values_and_unquote() {
        assert_eq!(split_values("a,b"), vec!["a", "b"]);
        assert_eq!(split_values(r#"["a","b"], c"#), vec![r#"["a","b"]"#, "c"]);
        assert_eq!(split_values(r#""a\"b", c"#), vec!["a\"b", "c"]);
        assert_eq!(split_values(""), Vec::<String>::new());
        assert_eq!(unquote("'x'"), "x");
        assert_eq!(unquote("\"x'"), "\"x'");
        assert_eq!(unquote("'"), "'");
    }

    #[test]
    fn limits_stop_hostile_input() {
        let deep = format!("{}1{}", "(".repeat(200), ")".repeat(200));
        assert_eq!(cond_err(&deep).message, "expression nested too deeply");
        let nots = format!("{}true", "!".repeat(500));
        assert_eq!(cond_err(&nots).message, "expression nested too deeply");
        let long = vec!["1"; 5000].join(" + ");
        assert_eq!(cond_err(&long).message, "expression too long");
        let wrappers = format!("{}a{}", "<+".repeat(300), ">".repeat(300));
        assert_eq!(cond_err(&wrappers).message, "expression nested too deeply");
        let wrappers = format!("{}a{}", "<+".repeat(20), ">".repeat(20));
        assert_eq!(cond(&wrappers), r("a"));
    }

    /// The largest trees the limits allow must parse, evaluate, print and drop on a small
    /// stack (tokio worker threads get 2 MiB; this uses a quarter of that).
    #[test]
    fn largest_allowed_trees_fit_a_small_stack() {
        let worker = std::thread::Builder::new()
            .stack_size(512 * 1024)
            .spawn(|| {
                let any = |_: &Path| -> Result<Val, String> { Ok(Val::Num(1.0)) };
                let chain = vec!["<+a>"; MAX_NODES].join(" + ");
                let e = parse_condition(&chain).unwrap();
                assert_eq!(
                    crate::expr::eval(&e, &any).unwrap(),
                    Val::Num(MAX_NODES as f64)
                );
                assert!(e.to_string().len() > chain.len());
                let depth = MAX_DEPTH - 2;
                let nested = format!("{}<+a>{}", "(!".repeat(depth / 2), ")".repeat(depth / 2));
                let e = parse_condition(&nested).unwrap();
                let odd = (depth / 2) % 2 == 1;
                assert_eq!(crate::expr::eval(&e, &any).unwrap(), Val::Bool(!odd));
                drop(e);
            })
            .unwrap();
        worker.join().expect("ran out of stack");
    }

    /// Never panic: every prefix (and every suffix) of tricky inputs, and pseudo-random
    /// strings over an alphabet of the tokens that matter, go through every entry point.
    #[test]
    fn never_panics_on_prefixes_and_noise() {
        let tricky = [
            r#"(<+trigger.branch> == "main" || (<+trigger.prLabels> != null && <+trigger.prLabels>.contains("load-test")))"#,
            "<+<+codebase.repoUrl>.substring(<+codebase.repoUrl>.lastIndexOf('/') + 1)>",
            r#"<+secrets.getValue("org.hashicorpvault://vault<+pipeline.stages.build.variables.ENV>/a#b")>"#,
            r#"echo <+pipeline.stages["ExecuteMatrix"+ <+strategy.iteration>].status> > f 2>&1"#,
            "<+input>.default(qa).allowedValues(qa,dev,prod).regex(^(a|b)$).executionInput()",
            r#"<+ <+a>.length() > 3 > '\'\"' ? -1.5e3 : !x"#,
            "<+var x=[...];for (i: [0,1]) { x.add(i);}; return x.toString()>",
            "日本<+語.x>€ <+'é'>",
            r#"'\",\\<+>'"#,
        ];
        let mut inputs = Vec::new();
        for t in tricky {
            for (i, _) in t.char_indices().chain([(t.len(), ' ')]) {
                inputs.push(t[..i].to_string());
                inputs.push(t[i..].to_string());
            }
        }
        let alphabet = [
            "<+",
            ">",
            "<",
            "=",
            "!",
            "&&",
            "||",
            "(",
            ")",
            "[",
            "]",
            ".",
            ",",
            "'",
            "\"",
            "\\",
            "?",
            ":",
            "+",
            "-",
            "a",
            "input",
            "contains",
            "1",
            "1.5e",
            " ",
            "日",
            "<+input>",
            ".default(",
            "getValue",
        ];
        let mut seed: u64 = 0x5eed;
        for _ in 0..5000 {
            let mut s = String::new();
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = (seed >> 33) % 24;
            for _ in 0..len {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                s.push_str(alphabet[((seed >> 33) % alphabet.len() as u64) as usize]);
            }
            inputs.push(s);
        }
        let resolver = |p: &Path| -> Result<Val, String> {
            match p.name(0) {
                Some("a") => Ok(Val::Num(2.0)),
                Some("input") => Ok(Val::Null),
                _ => Ok(Val::Str("x/y".into())),
            }
        };
        let mut parsed = 0;
        for s in &inputs {
            if let Ok(t) = parse_template(s) {
                parsed += 1;
                let _ = crate::expr::render(&t, &resolver);
            }
            if let Ok(e) = parse_condition(s) {
                parsed += 1;
                let _ = crate::expr::eval(&e, &resolver);
                // What Display prints must parse back to the same tree.
                assert_eq!(parse_condition(&e.to_string()).as_ref(), Ok(&e), "{s:?}");
            }
            let _ = parse_input(s);
            for err in [parse_template(s).err(), parse_condition(s).err()]
                .into_iter()
                .flatten()
            {
                assert!(
                    err.offset <= s.len(),
                    "{s:?}: offset {} > {}",
                    err.offset,
                    s.len()
                );
            }
        }
        assert!(
            parsed > 100,
            "only {parsed} inputs parsed; the generator is too noisy"
        );
    }
}
