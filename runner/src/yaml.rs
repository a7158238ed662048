//! A YAML document as a tree of spanned nodes.
//!
//! Owns: turning pipeline text into [`Node`]s that remember where they came from (line:col),
//! with serde-saphyr doing the YAML work (syntax, anchors, merge keys, duplicate keys).
//! Does not own: what any key means; that is `model` and `validate`.
//!
//! Why a generic tree rather than typed serde structs: validation must report *every* problem
//! in a file at once, each at its line and column, and must tell "a key Harness knows but
//! stagehand ignores" from "a typo". Serde derives stop at the first error and forget spans.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// A position in the source: 1-based line and column.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// A scalar as YAML gave it: we keep the text so `"5432"` and `5432` both read as ports,
/// and the kind so a type error can say what it found.
#[derive(Clone, Debug, PartialEq)]
pub enum Scalar {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Scalar(Scalar),
    Seq(Vec<Node>),
    /// Entries in document order; keys are scalars rendered as text.
    Map(Vec<(Key, Node)>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Key {
    pub name: String,
    pub pos: Pos,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub value: Value,
    pub pos: Pos,
}

impl Node {
    pub fn kind(&self) -> &'static str {
        match &self.value {
            Value::Scalar(Scalar::Null) => "null",
            Value::Scalar(Scalar::Bool(_)) => "a boolean",
            Value::Scalar(Scalar::Int(_)) => "a number",
            Value::Scalar(Scalar::Float(_)) => "a number",
            Value::Scalar(Scalar::Str(_)) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    pub fn as_map(&self) -> Option<&[(Key, Node)]> {
        match &self.value {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    pub fn as_seq(&self) -> Option<&[Node]> {
        match &self.value {
            Value::Seq(s) => Some(s),
            _ => None,
        }
    }

    /// The scalar as text, the way Harness reads every leaf (numbers and booleans included).
    pub fn as_text(&self) -> Option<String> {
        match &self.value {
            Value::Scalar(Scalar::Str(s)) => Some(s.clone()),
            Value::Scalar(Scalar::Int(i)) => Some(i.to_string()),
            Value::Scalar(Scalar::Float(f)) => Some(f.to_string()),
            Value::Scalar(Scalar::Bool(b)) => Some(b.to_string()),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.value, Value::Scalar(Scalar::Null))
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k.name == key)
            .map(|(_, v)| v)
    }
}

/// A YAML error with the place it happened.
#[derive(Clone, Debug, PartialEq)]
pub struct YamlError {
    pub pos: Pos,
    pub message: String,
}

/// The stack the parser runs on. serde-saphyr recurses once per nesting level and stops at
/// 64 levels, but an unoptimised build spends about 30 KiB of stack per level: 64 levels
/// overflow the 2 MiB of a test or tokio worker thread (an abort, not an error).
const PARSE_STACK: usize = 16 << 20;

/// Parse one YAML document.
pub fn parse(text: &str) -> Result<Node, YamlError> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("stagehand-yaml".into())
            .stack_size(PARSE_STACK)
            .spawn_scoped(s, || parse_here(text))
            .map(|h| h.join())
    })
    // No thread (resource limits): parse on this one; a panic is the parser's and goes on.
    .map(|joined| joined.unwrap_or_else(|p| std::panic::resume_unwind(p)))
    .unwrap_or_else(|_| parse_here(text))
}

fn parse_here(text: &str) -> Result<Node, YamlError> {
    // YAML reads a carriage return on its own as a line break; everything that shows a line
    // (snippets, `str::lines`) does not, so every later line number would be off by one.
    if let Some(pos) = lone_carriage_return(text) {
        return Err(YamlError {
            pos,
            message: "a carriage return without a line feed (old Mac line endings): use LF or CRLF"
                .into(),
        });
    }
    let options = serde_saphyr::options! {
        // YAML 1.2 booleans only: `on`, `y` and `no` stay strings, as in Harness's own parser.
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        with_snippet: false,
    };
    let spanned: Spanned<RawValue> =
        serde_saphyr::from_str_with_options(text, options).map_err(|e| {
            let mut pos = e
                .location()
                .map(|l| Pos {
                    line: l.line() as u32,
                    col: l.column() as u32,
                })
                .unwrap_or(Pos { line: 1, col: 1 });
            let mut message = first_line(&e.to_string());
            message = limit_message(&message).unwrap_or(message);
            if message.contains("unknown anchor") {
                if let Some(name) = alias_at(text, pos) {
                    message = format!(
                        "alias `*{name}` names no anchor: an anchor (`&{name}`) must be defined earlier in the same file"
                    );
                }
            }
            if message.contains("did not find expected <document start>") {
                if let Some(line) = directive_before(text, pos) {
                    pos = Pos { line, col: 1 };
                    message = "a line starting with `%` is a YAML directive (`%YAML 1.2`), which must be followed by `---`: quote a value that starts with `%`".into();
                }
            }
            YamlError {
                pos: within(text, pos),
                message,
            }
        })?;
    Ok(into_node(spanned))
}

/// serde-saphyr's resource limits and document count in words (its own text is
/// `budget breached: Depth { depth: 65 }` or names its API).
fn limit_message(m: &str) -> Option<String> {
    let number = |key: &str| -> String {
        m.split(key)
            .nth(1)
            .map(|r| {
                r.chars()
                    .skip_while(|c| !c.is_ascii_digit())
                    .take_while(char::is_ascii_digit)
                    .collect()
            })
            .unwrap_or_default()
    };
    if m.starts_with("multiple YAML documents detected") {
        return Some(
            "a second YAML document (after `---`): a pipeline file holds one document".into(),
        );
    }
    if m.starts_with("recursion limit exceeded") {
        return Some("the document nests too deeply to read".into());
    }
    let rest = m.strip_prefix("budget breached: ")?;
    Some(if rest.starts_with("Depth") {
        format!(
            "the document nests {} levels deep, more than stagehand reads",
            number("depth")
        )
    } else if rest.starts_with("Nodes") || rest.starts_with("Aliases") || rest.starts_with("Events")
    {
        "the document is too large once its aliases are expanded (each `*alias` repeats its anchor's whole value)".into()
    } else if rest.starts_with("Anchors") {
        format!(
            "the document defines more than {} anchors",
            number("anchors")
                .parse::<u64>()
                .map_or(0, |n| n.saturating_sub(1))
        )
    } else if rest.starts_with("Documents") {
        "the file holds too many YAML documents".into()
    } else {
        format!("the document exceeds a size limit ({rest})")
    })
}

/// Where the first `\r` not followed by `\n` is, counting lines as `str::lines` does.
fn lone_carriage_return(text: &str) -> Option<Pos> {
    let bytes = text.as_bytes();
    let at = bytes
        .iter()
        .enumerate()
        .position(|(i, b)| *b == b'\r' && bytes.get(i + 1) != Some(&b'\n'))?;
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    Some(Pos {
        line: line as u32,
        col: col as u32,
    })
}

/// The last line at or before `pos` that starts with `%` (a directive), 1-based.
fn directive_before(text: &str, pos: Pos) -> Option<u32> {
    text.lines()
        .take(pos.line as usize)
        .enumerate()
        .filter(|(_, l)| l.starts_with('%'))
        .last()
        .map(|(i, _)| i as u32 + 1)
}

/// `pos` moved inside the text: the parser reports an unexpected end of file on the line after
/// the last one, which no snippet can show. Such a place becomes the end of the last line.
fn within(text: &str, pos: Pos) -> Pos {
    let lines: Vec<&str> = text.lines().collect();
    let Some(last) = lines.len().checked_sub(1) else {
        return Pos { line: 1, col: 1 };
    };
    let wanted = pos.line.max(1) as usize - 1;
    let line = wanted.min(last);
    let len = lines[line].chars().count() as u32;
    let col = if line < wanted {
        len + 1
    } else {
        pos.col.clamp(1, len + 1)
    };
    Pos {
        line: line as u32 + 1,
        col,
    }
}

/// The alias name (`*name`) written at `pos`, if there is one.
fn alias_at(text: &str, pos: Pos) -> Option<String> {
    let line = text.lines().nth((pos.line as usize).checked_sub(1)?)?;
    let rest: String = line
        .chars()
        .skip((pos.col as usize).checked_sub(1)?)
        .collect();
    let name: String = rest
        .strip_prefix('*')?
        .chars()
        .take_while(|c| !c.is_whitespace() && !",[]{}".contains(*c))
        .collect();
    (!name.is_empty()).then_some(name)
}

fn first_line(s: &str) -> String {
    // serde-saphyr renders a snippet below the message; we render our own.
    let line = s.lines().next().unwrap_or(s).trim();
    let line = line.strip_prefix("error: ").unwrap_or(line);
    // Drop the "line X column Y: " that we show ourselves, and serde-saphyr's advice.
    let line = match line.find(": ") {
        Some(i) if line.starts_with("line ") => &line[i + 2..],
        _ => line,
    };
    let line = line
        .split(", set DuplicateKeyPolicy")
        .next()
        .unwrap_or(line);
    // The scanner repeats the position at the end ("... at line 17, column 7"); we print it first.
    let line = match line.rfind(" at line ") {
        Some(i) if line[i..].contains(", column ") => &line[..i],
        _ => line,
    };
    line.to_string()
}

fn pos_of<T>(s: &Spanned<T>) -> Pos {
    Pos {
        line: s.referenced.line() as u32,
        col: s.referenced.column() as u32,
    }
}

fn into_node(s: Spanned<RawValue>) -> Node {
    let pos = pos_of(&s);
    let value = match s.value {
        RawValue::Scalar(sc) => Value::Scalar(sc),
        RawValue::Seq(items) => Value::Seq(items.into_iter().map(into_node).collect()),
        RawValue::Map(entries) => Value::Map(
            entries
                .into_iter()
                .map(|(k, v)| {
                    let kpos = pos_of(&k);
                    (
                        Key {
                            name: k.value,
                            pos: kpos,
                        },
                        into_node(v),
                    )
                })
                .collect(),
        ),
    };
    Node { value, pos }
}

/// What serde-saphyr deserializes into; converted to [`Node`] right after.
enum RawValue {
    Scalar(Scalar),
    Seq(Vec<Spanned<RawValue>>),
    Map(Vec<(Spanned<String>, Spanned<RawValue>)>),
}

/// Map keys: YAML allows any scalar; Harness keys are strings, but `5432: 5432` in
/// `portBindings` is common, so numbers and booleans become their text.
struct KeyText(String);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = KeyText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a scalar mapping key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<KeyText, E> {
                Ok(KeyText(String::new()))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for RawValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawValue, E> {
                Ok(RawValue::Scalar(Scalar::Bool(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawValue, E> {
                Ok(RawValue::Scalar(Scalar::Int(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawValue, E> {
                Ok(match i64::try_from(v) {
                    Ok(i) => RawValue::Scalar(Scalar::Int(i)),
                    Err(_) => RawValue::Scalar(Scalar::Str(v.to_string())),
                })
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawValue, E> {
                Ok(RawValue::Scalar(Scalar::Float(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawValue, E> {
                Ok(RawValue::Scalar(Scalar::Str(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<RawValue, E> {
                Ok(RawValue::Scalar(Scalar::Str(v)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<RawValue, E> {
                Ok(RawValue::Scalar(Scalar::Null))
            }
            fn visit_none<E: de::Error>(self) -> Result<RawValue, E> {
                Ok(RawValue::Scalar(Scalar::Null))
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<RawValue, D2::Error> {
                RawValue::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawValue, A::Error> {
                let mut out = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<RawValue>>()? {
                    out.push(item);
                }
                Ok(RawValue::Seq(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawValue, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = map.next_key::<Spanned<KeyText>>()? {
                    let v = map.next_value::<Spanned<RawValue>>()?;
                    let key = Spanned::new(k.value.0, k.referenced, k.defined);
                    out.push((key, v));
                }
                Ok(RawValue::Map(out))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_point_at_keys_and_values() {
        let n = parse("a:\n  b: 1\n  c: [x, \"y\"]\n").unwrap();
        let (k, a) = &n.as_map().unwrap()[0];
        assert_eq!(k.name, "a");
        assert_eq!(k.pos, Pos { line: 1, col: 1 });
        let (kb, b) = &a.as_map().unwrap()[0];
        assert_eq!(kb.pos, Pos { line: 2, col: 3 });
        assert_eq!(b.value, Value::Scalar(Scalar::Int(1)));
        assert_eq!(b.pos, Pos { line: 2, col: 6 });
        let c = a.get("c").unwrap();
        assert_eq!(c.as_seq().unwrap()[1].as_text().unwrap(), "y");
        assert_eq!(c.as_seq().unwrap()[1].pos, Pos { line: 3, col: 10 });
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let e = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(e.pos.line, 3, "{e:?}");
        assert!(e.message.to_lowercase().contains("duplicate"), "{e:?}");
    }

    #[test]
    fn syntax_error_has_position() {
        let e = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.pos.line >= 1, "{e:?}");
    }

    #[test]
    fn resource_limits_are_put_in_words() {
        let deep = format!(
            "a:\n{}",
            (1..100)
                .map(|i| format!("{}k:\n", "  ".repeat(i)))
                .collect::<String>()
        );
        let e = parse(&deep).unwrap_err();
        assert!(e.message.starts_with("the document nests "), "{e:?}");
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..8u8 {
            let (prev, this) = ((b'a' + i - 1) as char, (b'a' + i) as char);
            bomb.push_str(&format!(
                "{this}: &{this} [{}]\n",
                vec![format!("*{prev}"); 10].join(", ")
            ));
        }
        let e = parse(&bomb).unwrap_err();
        assert!(e.message.contains("aliases are expanded"), "{e:?}");
    }

    #[test]
    fn a_lone_carriage_return_is_refused_at_its_place() {
        assert!(parse("a: 1\r\nb: 2\r\n").is_ok());
        let e = parse("a: 1\nbb: 2\r\rc: 3\n").unwrap_err();
        assert_eq!(e.pos, Pos { line: 2, col: 6 }, "{e:?}");
    }

    #[test]
    fn an_error_at_the_end_of_the_file_is_placed_on_its_last_line() {
        // Found by fuzzing: a directive with no `---` after it fails at end of file, which the
        // parser places on the line after the last.
        let e = parse("# a comment\n%YAML 1.2\n# another\n").unwrap_err();
        assert_eq!(e.pos, Pos { line: 2, col: 1 }, "{e:?}");
        assert!(e.message.contains("directive"), "{e:?}");
        let e = parse("a: [1, 2\n").unwrap_err();
        assert_eq!(e.pos.line, 1, "{e:?}");
        assert!(e.pos.col <= 9, "{e:?}");
        assert_eq!(
            within("ab\n", Pos { line: 7, col: 3 }),
            Pos { line: 1, col: 3 }
        );
        assert_eq!(within("", Pos { line: 2, col: 5 }), Pos { line: 1, col: 1 });
        assert_eq!(
            within("ab\ncd", Pos { line: 1, col: 9 }),
            Pos { line: 1, col: 3 }
        );
    }

    #[test]
    fn an_unknown_alias_is_named() {
        let e = parse("a: 1\nb: *missing\n").unwrap_err();
        assert_eq!(e.pos, Pos { line: 2, col: 4 }, "{e:?}");
        assert!(e.message.contains("`*missing`"), "{e:?}");
    }

    #[test]
    fn numeric_keys_and_anchors() {
        let n = parse("p:\n  5432: 5432\nx: &a {k: v}\ny: *a\n").unwrap();
        assert_eq!(n.get("p").unwrap().as_map().unwrap()[0].0.name, "5432");
        assert_eq!(
            n.get("y").unwrap().get("k").unwrap().as_text().unwrap(),
            "v"
        );
    }
}
