//! Runtime inputs: `<+input>` placeholders and the values that fill them.
//!
//! Owns: finding every `<+input>` in a document, naming it by its path
//! (`stages.build.spec.execution.steps.Run_1.spec.image`, or a variable's name), and replacing it
//! with a value from `--input`, an input-set file, or its `.default(...)`. Does not own: what the
//! field means once filled (that is `load`).
//!
//! Paths follow Harness input sets: mapping keys joined by dots, with a list item named by its
//! `identifier` (steps, stages, step groups) or `name` (variables); `parallel` wrappers and the
//! `step:`/`stage:`/`stepGroup:` wrapper keys are left out. A step inside a group can be named
//! with or without the group: `...steps.sg1.steps.Run_1.spec.image` or `...steps.Run_1.spec.image`.

use std::collections::BTreeMap;

use crate::expr::{InputSpec, parse_input};
use crate::yaml::{Node, Pos, Scalar, Value};

/// One `<+input>` still without a value.
#[derive(Clone, Debug, PartialEq)]
pub struct MissingInput {
    pub path: String,
    pub pos: Pos,
}

/// A problem with a value given for an input (not allowed, fails its regex).
#[derive(Clone, Debug, PartialEq)]
pub struct BadInput {
    pub path: String,
    pub pos: Pos,
    pub message: String,
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub missing: Vec<MissingInput>,
    pub bad: Vec<BadInput>,
    /// Values given with `--input` that matched no `<+input>` in the file.
    pub unused: Vec<String>,
}

/// Values for inputs: exact paths (from an input set or `--input a.b.c=v`) and bare names.
#[derive(Clone, Debug, Default)]
pub struct InputValues {
    pub values: BTreeMap<String, String>,
}

impl InputValues {
    pub fn insert(&mut self, name: &str, value: &str) {
        let name = name.strip_prefix("pipeline.").unwrap_or(name);
        self.values.insert(name.to_string(), value.to_string());
    }

    /// Read a Harness input set (`inputSet: {pipeline: ...}` or a bare `pipeline:`): every scalar
    /// leaf becomes a value at its path. Leaves that are still `<+input>` are skipped.
    pub fn add_input_set(&mut self, doc: &Node) -> Result<(), String> {
        let root = doc.get("inputSet").unwrap_or(doc);
        let pipeline = root
            .get("pipeline")
            .ok_or("an input set must hold `pipeline:` (or `inputSet: {pipeline: ...}`)")?;
        let mut leaves = Vec::new();
        collect_leaves(pipeline, &mut Vec::new(), &mut leaves);
        for (path, value) in leaves {
            if !value.trim_start().starts_with("<+input>") {
                self.values.insert(path, value);
            }
        }
        Ok(())
    }
}

fn collect_leaves(node: &Node, path: &mut Vec<String>, out: &mut Vec<(String, String)>) {
    match &node.value {
        Value::Map(entries) => {
            for (k, v) in entries {
                if is_wrapper(&k.name) {
                    collect_leaves(v, path, out);
                    continue;
                }
                path.push(k.name.clone());
                collect_leaves(v, path, out);
                path.pop();
            }
        }
        Value::Seq(items) => {
            for item in items {
                match item_name(item) {
                    Some(name) => {
                        path.push(name);
                        collect_leaves(item, path, out);
                        path.pop();
                    }
                    None => collect_leaves(item, path, out),
                }
            }
        }
        Value::Scalar(_) => {
            if let Some(t) = node.as_text() {
                out.push((variable_alias(path).unwrap_or_else(|| path.join(".")), t));
            }
        }
    }
}

fn is_wrapper(key: &str) -> bool {
    matches!(key, "step" | "stage" | "stepGroup" | "parallel")
}

/// A list item's name in a path: the `identifier` of a (wrapped) step/stage/group, else `name`.
fn item_name(item: &Node) -> Option<String> {
    let inner = ["step", "stage", "stepGroup"]
        .iter()
        .find_map(|w| item.get(w))
        .unwrap_or(item);
    inner
        .get("identifier")
        .or_else(|| inner.get("name"))
        .and_then(Node::as_text)
}

/// `variables.x.value` → `variables.x`, `stages.s.variables.x.value` → `stages.s.variables.x`.
fn variable_alias(path: &[String]) -> Option<String> {
    let n = path.len();
    if n >= 3 && path[n - 1] == "value" && path[n - 3] == "variables" {
        return Some(path[..n - 1].join("."));
    }
    None
}

/// Replace every `<+input>` in `doc` that has a value (given, or its default).
/// With `require` false (validate), inputs without a value are left in place and not reported.
pub fn resolve(doc: &mut Node, values: &InputValues, require: bool) -> Outcome {
    let mut out = Outcome::default();
    let mut used = std::collections::BTreeSet::new();
    let mut path = Vec::new();
    walk(
        doc,
        &mut path,
        &mut Vec::new(),
        values,
        require,
        &mut out,
        &mut used,
    );
    out.unused = values
        .values
        .keys()
        .filter(|k| !used.contains(*k))
        .cloned()
        .collect();
    out
}

fn walk(
    node: &mut Node,
    path: &mut Vec<String>,
    short: &mut Vec<String>,
    values: &InputValues,
    require: bool,
    out: &mut Outcome,
    used: &mut std::collections::BTreeSet<String>,
) {
    let pos = node.pos;
    match &mut node.value {
        Value::Map(entries) => {
            let top = path.is_empty();
            for (k, v) in entries.iter_mut() {
                // Paths are relative to the pipeline, as in input sets: `variables.x`, `stages...`.
                if is_wrapper(&k.name) || (top && k.name == "pipeline") {
                    walk(v, path, short, values, require, out, used);
                    continue;
                }
                path.push(k.name.clone());
                short.push(k.name.clone());
                walk(v, path, short, values, require, out, used);
                path.pop();
                short.pop();
            }
        }
        Value::Seq(items) => {
            for item in items.iter_mut() {
                let name = item_name(item);
                let is_group = item.get("stepGroup").is_some();
                match name {
                    Some(name) => {
                        path.push(name.clone());
                        // The short form drops a group and its `steps` key: sg1.steps.Run_1 → Run_1.
                        if is_group {
                            let saved = short.pop();
                            walk(item, path, short, values, require, out, used);
                            if let Some(s) = saved {
                                short.push(s);
                            }
                        } else {
                            short.push(name);
                            walk(item, path, short, values, require, out, used);
                            short.pop();
                        }
                        path.pop();
                    }
                    None => walk(item, path, short, values, require, out, used),
                }
            }
        }
        Value::Scalar(Scalar::Str(s)) => {
            let Some(parsed) = parse_input(s) else { return };
            let full = variable_alias(path).unwrap_or_else(|| path.join("."));
            let short_path = variable_alias(short).unwrap_or_else(|| short.join("."));
            let spec = match parsed {
                Ok(spec) => spec,
                Err(e) => {
                    out.bad.push(BadInput {
                        path: full,
                        pos,
                        message: e.to_string(),
                    });
                    return;
                }
            };
            // A broken `.regex()` is the file's fault, reported whether or not a value is given.
            if let Some(re) = &spec.regex {
                if let Err(e) = regex::Regex::new(&format!("^(?:{re})$")) {
                    out.bad.push(BadInput {
                        path: full,
                        pos,
                        message: format!("the input's regex {re} is invalid: {}", regex_reason(&e)),
                    });
                    return;
                }
            }
            let var_name = full
                .rsplit_once("variables.")
                .map(|(_, n)| n.to_string())
                .filter(|n| !n.contains('.'));
            let stage_var = stage_variable_alias(path);
            let candidates = [Some(full.clone()), Some(short_path), stage_var, var_name];
            let given = candidates
                .iter()
                .flatten()
                .find_map(|c| values.values.get(c).map(|v| (c.clone(), v.clone())));
            let value = match given {
                Some((key, v)) => {
                    used.insert(key);
                    if let Err(message) = check_value(&spec, &v) {
                        out.bad.push(BadInput {
                            path: full,
                            pos,
                            message,
                        });
                        return;
                    }
                    Some(v)
                }
                None => spec.default.clone(),
            };
            match value {
                Some(v) => *s = v,
                None if require => out.missing.push(MissingInput { path: full, pos }),
                None => {}
            }
        }
        Value::Scalar(_) => {}
    }
}

/// `stages.build.variables.x` is also reachable as `stage.variables.x`... only when unambiguous;
/// we offer `build.x`-free forms: the plain `stage.variables.x` is matched via the bare name.
fn stage_variable_alias(path: &[String]) -> Option<String> {
    let n = path.len();
    if n >= 4 && path[0] == "stages" && path[n - 1] == "value" && path[n - 3] == "variables" {
        return Some(format!("stage.variables.{}", path[n - 2]));
    }
    None
}

/// The one-line reason of a regex error (its Display draws the pattern over several lines).
fn regex_reason(e: &regex::Error) -> String {
    let text = e.to_string();
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().trim_start_matches("error: ").to_string())
        .unwrap_or(text)
}

fn check_value(spec: &InputSpec, v: &str) -> Result<(), String> {
    if !spec.allowed.is_empty() && !spec.allowed.iter().any(|a| a == v) {
        return Err(format!(
            "value {v:?} is not one of the allowed values: {}",
            spec.allowed.join(", ")
        ));
    }
    if let Some(re) = &spec.regex {
        let anchored = format!("^(?:{re})$");
        match regex::Regex::new(&anchored) {
            Ok(r) if r.is_match(v) => {}
            Ok(_) => return Err(format!("value {v:?} does not match the input's regex {re}")),
            Err(e) => {
                return Err(format!(
                    "the input's regex {re} is invalid: {}",
                    regex_reason(&e)
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml::parse;

    const DOC: &str = "pipeline:
  identifier: p
  variables:
    - name: env
      type: String
      value: <+input>.default(dev).allowedValues(dev,prod)
    - name: tag
      type: String
      value: <+input>
  stages:
    - stage:
        identifier: build
        variables:
          - name: sv
            type: String
            value: <+input>
        spec:
          execution:
            steps:
              - stepGroup:
                  identifier: sg1
                  steps:
                    - step:
                        identifier: Run_1
                        spec:
                          image: <+input>
";

    fn text_at(n: &Node, path: &[&str]) -> String {
        let mut cur = n;
        for p in path {
            cur = match p.parse::<usize>() {
                Ok(i) => &cur.as_seq().unwrap()[i],
                Err(_) => cur.get(p).unwrap(),
            };
        }
        cur.as_text().unwrap()
    }

    #[test]
    fn defaults_and_missing_inputs() {
        let mut doc = parse(DOC).unwrap();
        let out = resolve(&mut doc, &InputValues::default(), true);
        let missing: Vec<_> = out.missing.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(
            missing,
            [
                "variables.tag",
                "stages.build.variables.sv",
                "stages.build.spec.execution.steps.sg1.steps.Run_1.spec.image"
            ]
        );
        assert_eq!(out.missing[0].pos.line, 9);
        assert_eq!(
            text_at(&doc, &["pipeline", "variables", "0", "value"]),
            "dev"
        );
    }

    #[test]
    fn values_by_name_and_by_path() {
        let mut doc = parse(DOC).unwrap();
        let mut v = InputValues::default();
        v.insert("tag", "v1");
        v.insert("env", "prod");
        v.insert("stage.variables.sv", "s");
        v.insert(
            "stages.build.spec.execution.steps.Run_1.spec.image",
            "alpine",
        );
        let out = resolve(&mut doc, &v, true);
        assert!(
            out.missing.is_empty() && out.bad.is_empty() && out.unused.is_empty(),
            "{out:?}"
        );
        assert_eq!(
            text_at(&doc, &["pipeline", "variables", "1", "value"]),
            "v1"
        );
        assert_eq!(
            text_at(&doc, &["pipeline", "variables", "0", "value"]),
            "prod"
        );
    }

    #[test]
    fn disallowed_value_is_reported() {
        let mut doc = parse(DOC).unwrap();
        let mut v = InputValues::default();
        v.insert("env", "qa");
        let out = resolve(&mut doc, &v, false);
        assert_eq!(out.bad.len(), 1);
        assert!(
            out.bad[0].message.contains("allowed values: dev, prod"),
            "{:?}",
            out.bad
        );
    }

    #[test]
    fn input_set_file_fills_values() {
        let set = parse(
            "inputSet:
  identifier: s
  pipeline:
    identifier: p
    variables:
      - name: tag
        type: String
        value: v2
    stages:
      - stage:
          identifier: build
          spec:
            execution:
              steps:
                - stepGroup:
                    identifier: sg1
                    steps:
                      - step:
                          identifier: Run_1
                          spec:
                            image: busybox
",
        )
        .unwrap();
        let mut v = InputValues::default();
        v.add_input_set(&set).unwrap();
        let mut doc = parse(DOC).unwrap();
        let out = resolve(&mut doc, &v, true);
        let missing: Vec<_> = out.missing.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(missing, ["stages.build.variables.sv"]);
        assert_eq!(
            text_at(
                &doc,
                &[
                    "pipeline",
                    "stages",
                    "0",
                    "stage",
                    "spec",
                    "execution",
                    "steps",
                    "0",
                    "stepGroup",
                    "steps",
                    "0",
                    "step",
                    "spec",
                    "image"
                ]
            ),
            "busybox"
        );
    }
}
