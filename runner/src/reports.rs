//! Test reports: finding a step's JUnit XML files, reading them, and summarising them.
//!
//! Owns: expanding `reports.spec.paths` globs (with `**`) against a workspace, a tolerant JUnit XML
//! reader for the common producers (cargo-nextest, pytest, Maven surefire, jest-junit,
//! go-junit-report), the end-of-stage summary text, and the merged `junit.xml` of a stage.
//! Does not own: *when* reports are read (the scheduler calls [`collect`] after a step finished, or
//! after a Background step was stopped at teardown), printing (the console does that, and masks
//! secrets), or where the run directory is.
//!
//! Why a hand-written reader instead of `quick_junit::Report::deserialize`: quick-junit 0.8's
//! reader is documented as experimental and only guaranteed for its own output. It rejects a
//! `<testsuite>` root (older pytest, surefire), a `<testsuite>` without `name`, timestamps that are
//! not RFC 3339 with an offset (jest-junit and surefire write `2026-11-20T10:11:12`), and times
//! with a thousands separator (surefire in some locales writes `time="1,234.5"`). One strict
//! attribute would lose a whole report, so we read with `quick-xml` (the same version quick-junit
//! uses) and ignore what we do not need. quick-junit still *writes* the merged report, so the
//! output is exactly what nextest-style consumers expect.
//!
//! Nothing here panics on input: malformed, truncated or non-JUnit files become warnings that name
//! the file, and the walk is bounded (file size, directory loops through symlinks, entry count).

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::{GlobBuilder, GlobMatcher};
use quick_xml::escape::resolve_predefined_entity;
use quick_xml::events::{BytesStart, Event};

/// Reports larger than this are skipped with a warning: a runaway `system-out` should not take the
/// runner's memory with it.
pub const MAX_REPORT_BYTES: u64 = 64 * 1024 * 1024;

/// How many directory entries one pattern may visit before the walk stops with a warning. A
/// `**/*.xml` from the workspace root can otherwise crawl a huge `node_modules` or `target`.
const MAX_WALK_ENTRIES: usize = 200_000;

/// Depth cap for `**`, far beyond any real report tree; a second guard next to the loop check.
const MAX_WALK_DEPTH: usize = 64;

/// Failure details longer than this are cut; the full text stays in the producer's own file.
const MAX_DETAIL_BYTES: usize = 64 * 1024;

/// Failed cases listed in the summary before "and N more".
const MAX_FAILED_LISTED: usize = 50;

/// Longest message shown on one summary line.
const MAX_SUMMARY_MESSAGE_CHARS: usize = 200;

/// How one test case ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaseOutcome {
    /// Passed (possibly after retries; see [`CaseResult::retries`]).
    Passed,
    /// An assertion failed (`<failure>`).
    Failed {
        /// The `message` attribute, or the first non-empty line of the text when it is missing.
        message: Option<String>,
        /// The element's text (stack trace, captured assertion output), if any.
        detail: Option<String>,
    },
    /// The test could not run properly (`<error>`: setup failure, panic outside an assertion,
    /// build error).
    Error {
        /// As for [`CaseOutcome::Failed`].
        message: Option<String>,
        /// As for [`CaseOutcome::Failed`].
        detail: Option<String>,
    },
    /// Not run (`<skipped>`; pytest's xfail too).
    Skipped {
        /// The `message` attribute, or the first line of the text.
        message: Option<String>,
    },
}

/// One `<testcase>` from a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseResult {
    /// Name of the innermost enclosing `<testsuite>` (the file stem when it has none).
    pub suite: String,
    /// The `classname` attribute, when present and non-empty.
    pub classname: Option<String>,
    /// The `name` attribute (`(unnamed)` when missing).
    pub name: String,
    /// The `time` attribute; `None` when missing or unreadable.
    pub time: Option<Duration>,
    /// How the case ended.
    pub outcome: CaseOutcome,
    /// Attempts recorded before the final outcome (`<flakyFailure>`, `<flakyError>`,
    /// `<rerunFailure>`, `<rerunError>`, written by nextest and surefire). A `Passed` case with
    /// `retries > 0` is flaky.
    pub retries: usize,
    /// Id of the step whose reports this case came from.
    pub step: String,
}

impl CaseResult {
    /// A short human name: `classname::name` (or `suite::name`), without repeating a prefix the
    /// name already carries (jest-junit puts the describe block in both).
    pub fn display_name(&self) -> String {
        let qualifier = match &self.classname {
            Some(c) if !self.name.starts_with(c.as_str()) => c.as_str(),
            _ => self.suite.as_str(),
        };
        if qualifier.is_empty() || self.name.starts_with(qualifier) {
            self.name.clone()
        } else {
            format!("{qualifier}::{}", self.name)
        }
    }

    /// True for a case that passed only after failed attempts.
    pub fn is_flaky(&self) -> bool {
        self.outcome == CaseOutcome::Passed && self.retries > 0
    }
}

/// Everything read for one step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepReports {
    /// Step id.
    pub step: String,
    /// Report files that were read successfully and whose cases are in `cases`, in the order the
    /// patterns found them. Files that were skipped or invalid appear only in `warnings`.
    pub files: Vec<PathBuf>,
    /// All cases of all files, in document order.
    pub cases: Vec<CaseResult>,
    /// One line per problem, each naming the file or pattern, e.g.
    /// ``report /w/x.xml is not valid JUnit XML: ...`` or ``no file matches reports path `a/**/*.xml` ``.
    pub warnings: Vec<String>,
}

/// What can go wrong while collecting a step's reports. Each becomes one warning line; none stops
/// the collection.
#[derive(Debug, thiserror::Error)]
enum ReportIssue {
    #[error("reports path `{pattern}` is not a valid glob: {source}")]
    BadPattern {
        pattern: String,
        source: globset::Error,
    },
    #[error("no file matches reports path `{pattern}`")]
    NoMatch { pattern: String },
    #[error("reports path `{pattern}` is a directory; use a glob such as `{pattern}/**/*.xml`")]
    IsDirectory { pattern: String },
    #[error(
        "stopped scanning for reports path `{pattern}` after {limit} directory entries; \
         narrow the pattern"
    )]
    WalkLimit { pattern: String, limit: usize },
    #[error("cannot read report {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "report {} is {size} bytes, over the {} MiB limit; skipped",
        path.display(),
        MAX_REPORT_BYTES / (1024 * 1024)
    )]
    TooLarge { path: PathBuf, size: u64 },
    #[error("report {} is not valid JUnit XML: {source}", path.display())]
    Invalid { path: PathBuf, source: ParseError },
}

/// Why one document could not be read as JUnit.
#[derive(Debug, thiserror::Error)]
enum ParseError {
    #[error("{source} (line {line}, column {column})")]
    Xml {
        line: usize,
        column: usize,
        source: quick_xml::Error,
    },
    #[error("{source} (line {line}, column {column})")]
    Attribute {
        line: usize,
        column: usize,
        source: quick_xml::events::attributes::AttrError,
    },
    #[error("the file ends inside <{open}> (truncated?)")]
    UnexpectedEof { open: String },
    #[error("root element is <{root}>, expected <testsuites> or <testsuite>")]
    NotJunit { root: String },
    #[error("no root element")]
    Empty,
}

/// Finds the files `patterns` match and reads each as JUnit XML.
///
/// Relative patterns resolve against `workspace`; absolute ones are used as they are. `*` and `?`
/// stay within one path component, `**` crosses any number (including none), `[ab]` and `{a,b}`
/// work as in globset. Symlinks are followed, but a directory is entered once, so a link back up
/// the tree does not loop. A file matched by two patterns is read once. Never panics: every
/// problem becomes a line in [`StepReports::warnings`].
pub fn collect(step: &str, workspace: &Path, patterns: &[String]) -> StepReports {
    let mut out = StepReports {
        step: step.to_string(),
        ..StepReports::default()
    };
    let mut seen_files: HashSet<(u64, u64)> = HashSet::new();
    for pattern in patterns {
        let mut issues = Vec::new();
        let files = expand(workspace, pattern, &mut issues);
        for path in files {
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            if !seen_files.insert((meta.dev(), meta.ino())) {
                continue;
            }
            match read_report(&path, step) {
                Ok(cases) => {
                    out.files.push(path);
                    out.cases.extend(cases);
                }
                Err(issue) => issues.push(issue),
            }
        }
        out.warnings.extend(issues.iter().map(ToString::to_string));
    }
    out
}

/// Expands one pattern into the regular files it matches, sorted.
fn expand(workspace: &Path, pattern: &str, issues: &mut Vec<ReportIssue>) -> Vec<PathBuf> {
    let trimmed = pattern.trim();
    let (prefix, rest) = split_literal_prefix(trimmed);
    let base = if Path::new(&prefix).is_absolute() {
        PathBuf::from(&prefix)
    } else {
        workspace.join(&prefix)
    };

    if rest.is_empty() {
        // No glob characters: a plain path.
        return match fs::metadata(&base) {
            Ok(m) if m.is_file() => vec![base],
            Ok(m) if m.is_dir() => {
                issues.push(ReportIssue::IsDirectory {
                    pattern: pattern.to_string(),
                });
                Vec::new()
            }
            _ => {
                issues.push(ReportIssue::NoMatch {
                    pattern: pattern.to_string(),
                });
                Vec::new()
            }
        };
    }

    let matcher = match GlobBuilder::new(&rest)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
    {
        Ok(g) => g.compile_matcher(),
        Err(source) => {
            issues.push(ReportIssue::BadPattern {
                pattern: pattern.to_string(),
                source,
            });
            return Vec::new();
        }
    };
    // Without `**` (or braces, which may hide a `/`), nothing deeper than the pattern's own
    // component count can match, so the walk stops there.
    let max_depth = if rest.contains("**") || rest.contains('{') {
        MAX_WALK_DEPTH
    } else {
        rest.split('/').filter(|c| !c.is_empty()).count()
    };

    let mut found = Vec::new();
    if !walk(&base, &matcher, max_depth, &mut found) {
        issues.push(ReportIssue::WalkLimit {
            pattern: pattern.to_string(),
            limit: MAX_WALK_ENTRIES,
        });
    }
    found.sort();
    if found.is_empty() {
        issues.push(ReportIssue::NoMatch {
            pattern: pattern.to_string(),
        });
    }
    found
}

/// Splits `a/b/**/c*.xml` into the leading components without glob characters (`a/b`) and the
/// rest (`**/c*.xml`), so the walk starts as deep as possible and the workspace path itself is
/// never interpreted as a glob (it may contain `[`).
fn split_literal_prefix(pattern: &str) -> (String, String) {
    let is_glob = |c: &str| c.contains(['*', '?', '[', '{', '\\']);
    let components: Vec<&str> = pattern.split('/').collect();
    match components.iter().position(|c| is_glob(c)) {
        None => (pattern.to_string(), String::new()),
        Some(i) => {
            let mut prefix = components[..i].join("/");
            if prefix.is_empty() && pattern.starts_with('/') {
                prefix = "/".to_string();
            }
            (prefix, components[i..].join("/"))
        }
    }
}

/// Depth-first walk below `base`, pushing regular files whose path relative to `base` matches.
/// Returns false when the entry budget ran out.
fn walk(base: &Path, matcher: &GlobMatcher, max_depth: usize, found: &mut Vec<PathBuf>) -> bool {
    let mut visited_dirs: HashSet<(u64, u64)> = HashSet::new();
    match fs::metadata(base) {
        Ok(m) if m.is_dir() => {
            visited_dirs.insert((m.dev(), m.ino()));
        }
        _ => return true,
    }
    let mut budget = MAX_WALK_ENTRIES;
    let mut stack = vec![(base.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if budget == 0 {
                return false;
            }
            budget -= 1;
            let path = entry.path();
            // `metadata` follows symlinks: a linked report or report directory counts. A dangling
            // link is simply not a match.
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            let Ok(rel) = path.strip_prefix(base) else {
                continue;
            };
            if meta.is_dir() {
                // Entering each (device, inode) once is what breaks symlink loops.
                if depth + 1 < max_depth && visited_dirs.insert((meta.dev(), meta.ino())) {
                    stack.push((path, depth + 1));
                }
            } else if meta.is_file() && matcher.is_match(rel) {
                found.push(path);
            }
        }
    }
    true
}

/// Reads one file, bounded by [`MAX_REPORT_BYTES`].
fn read_report(path: &Path, step: &str) -> Result<Vec<CaseResult>, ReportIssue> {
    let read_err = |source| ReportIssue::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = fs::File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    if size > MAX_REPORT_BYTES {
        return Err(ReportIssue::TooLarge {
            path: path.to_path_buf(),
            size,
        });
    }
    // The file may still be growing (a Background step's writer): read at most one byte past the
    // limit to notice.
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(MAX_REPORT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_REPORT_BYTES {
        return Err(ReportIssue::TooLarge {
            path: path.to_path_buf(),
            size: bytes.len() as u64,
        });
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    parse_junit(&bytes, &stem, step).map_err(|source| ReportIssue::Invalid {
        path: path.to_path_buf(),
        source,
    })
}

/// What an open element on the parser's stack means to us.
enum Frame {
    Suites,
    Suite,
    Case(CaseBuilder),
    /// A `<failure>`/`<error>`/`<skipped>`/`<flaky*>`/`<rerun*>` directly inside a case.
    Status(StatusBuilder),
    /// `<system-out>`/`<system-err>` and anything else: text inside is not a failure detail.
    Other,
    /// An unknown element inside a status element (nextest's `<stackTrace>`): its text is part of
    /// the detail.
    StatusChild,
}

struct CaseBuilder {
    suite: String,
    classname: Option<String>,
    name: String,
    time: Option<Duration>,
    /// First failure or error wins; a skip counts only when there is neither.
    main: Option<(StatusKind, Option<String>, Option<String>)>,
    skipped: Option<Option<String>>,
    retries: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StatusKind {
    Failure,
    Error,
    Skipped,
    Retry,
}

struct StatusBuilder {
    kind: StatusKind,
    message: Option<String>,
    ty: Option<String>,
    text: String,
}

impl StatusBuilder {
    fn push_text(&mut self, s: &str) {
        if self.text.len() >= MAX_DETAIL_BYTES {
            return;
        }
        let room = MAX_DETAIL_BYTES - self.text.len();
        if s.len() <= room {
            self.text.push_str(s);
        } else {
            let mut cut = room;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            self.text.push_str(&s[..cut]);
            self.text.push_str("\n…(truncated)");
        }
    }

    /// Message attribute, else the first line of the text (see [`headline`]), else the `type`
    /// attribute.
    fn finish(self) -> (StatusKind, Option<String>, Option<String>) {
        let detail = {
            let t = self.text.trim();
            (!t.is_empty()).then(|| t.to_string())
        };
        let message = non_empty(self.message)
            .or_else(|| detail.as_deref().and_then(headline))
            .or_else(|| non_empty(self.ty));
        (self.kind, message, detail)
    }
}

/// The first non-empty line of a failure text. A line ending in `:` introduces the real message
/// on the next line (Rust ≥ 1.73 panics: "thread 'x' panicked at src/a.rs:3:5:" then the
/// assertion), so the two are joined.
fn headline(text: &str) -> Option<String> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next()?;
    match lines.next() {
        Some(second) if first.ends_with(':') => Some(format!("{first} {second}")),
        _ => Some(first.to_string()),
    }
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

impl CaseBuilder {
    fn apply(&mut self, status: StatusBuilder) {
        let (kind, message, detail) = status.finish();
        match kind {
            StatusKind::Retry => self.retries += 1,
            StatusKind::Skipped => {
                if self.skipped.is_none() {
                    self.skipped = Some(message);
                }
            }
            StatusKind::Failure | StatusKind::Error => {
                if self.main.is_none() {
                    self.main = Some((kind, message, detail));
                }
            }
        }
    }

    fn finish(self, step: &str) -> CaseResult {
        let outcome = match (self.main, self.skipped) {
            (Some((StatusKind::Error, message, detail)), _) => {
                CaseOutcome::Error { message, detail }
            }
            (Some((_, message, detail)), _) => CaseOutcome::Failed { message, detail },
            (None, Some(message)) => CaseOutcome::Skipped { message },
            (None, None) => CaseOutcome::Passed,
        };
        CaseResult {
            suite: self.suite,
            classname: self.classname,
            name: self.name,
            time: self.time,
            outcome,
            retries: self.retries,
            step: step.to_string(),
        }
    }
}

/// Parses one JUnit document. `default_suite` names cases outside any named `<testsuite>`.
///
/// Counts come from the `<testcase>` elements, not from the `tests=`/`failures=` attributes:
/// producers disagree on whether skipped cases are in `tests`, and a count cannot name a case.
fn parse_junit(
    bytes: &[u8],
    default_suite: &str,
    step: &str,
) -> Result<Vec<CaseResult>, ParseError> {
    let text = String::from_utf8_lossy(bytes);
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut reader = quick_xml::Reader::from_str(text);
    // Mismatched end tags are errors: a report that is not XML should say so, not half-parse.
    reader.config_mut().check_end_names = true;

    let mut stack: Vec<(String, Frame)> = Vec::new();
    let mut suites: Vec<String> = Vec::new();
    let mut cases = Vec::new();
    let mut saw_root = false;

    let position = |offset: u64| line_column(text, offset as usize);

    loop {
        let event = reader.read_event().map_err(|source| {
            let (line, column) = position(reader.error_position());
            ParseError::Xml {
                line,
                column,
                source,
            }
        })?;
        let offset = reader.buffer_position();
        let attr_err = |source| {
            let (line, column) = position(offset);
            ParseError::Attribute {
                line,
                column,
                source,
            }
        };
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let is_empty = matches!(event, Event::Empty(_));
                let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                if !saw_root {
                    saw_root = true;
                    if name != "testsuites" && name != "testsuite" {
                        return Err(ParseError::NotJunit { root: name });
                    }
                }
                let frame = open_frame(
                    &name,
                    e,
                    stack.last().map(|(_, f)| f),
                    &suites,
                    default_suite,
                )
                .map_err(attr_err)?;
                if is_empty {
                    close_frame(frame, &mut stack, &mut cases, step);
                } else {
                    if let Frame::Suite = frame {
                        suites.push(suite_name(e, default_suite).map_err(attr_err)?);
                    }
                    stack.push((name, frame));
                }
            }
            Event::End(_) => {
                if let Some((_, frame)) = stack.pop() {
                    if let Frame::Suite = frame {
                        suites.pop();
                    }
                    close_frame(frame, &mut stack, &mut cases, step);
                }
            }
            Event::Text(ref t) => {
                if let Some(status) = capturing(&mut stack) {
                    let s = t.xml10_content().unwrap_or(Cow::Borrowed(""));
                    status.push_text(&s);
                }
            }
            Event::CData(ref t) => {
                if let Some(status) = capturing(&mut stack) {
                    let s = t.xml10_content().unwrap_or(Cow::Borrowed(""));
                    status.push_text(&s);
                }
            }
            Event::GeneralRef(ref r) => {
                if let Some(status) = capturing(&mut stack) {
                    match r.resolve_char_ref() {
                        Ok(Some(c)) => status.push_text(c.encode_utf8(&mut [0u8; 4])),
                        _ => {
                            let name = String::from_utf8_lossy(r.as_ref()).into_owned();
                            // Unknown entities (a DTD we do not read) stay visible as written.
                            let s = resolve_predefined_entity(&name)
                                .map(str::to_string)
                                .unwrap_or_else(|| format!("&{name};"));
                            status.push_text(&s);
                        }
                    }
                }
            }
            Event::Eof => break,
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
        }
    }
    if let Some((open, _)) = stack.pop() {
        return Err(ParseError::UnexpectedEof { open });
    }
    if !saw_root {
        return Err(ParseError::Empty);
    }
    Ok(cases)
}

/// The status element whose text is being collected, if the innermost frames say so.
fn capturing(stack: &mut [(String, Frame)]) -> Option<&mut StatusBuilder> {
    for (_, frame) in stack.iter_mut().rev() {
        match frame {
            Frame::StatusChild => continue,
            Frame::Status(s) => return Some(s),
            _ => return None,
        }
    }
    None
}

/// Decides what a newly opened element is, from its name and its parent.
fn open_frame(
    name: &str,
    e: &BytesStart<'_>,
    parent: Option<&Frame>,
    suites: &[String],
    default_suite: &str,
) -> Result<Frame, quick_xml::events::attributes::AttrError> {
    let frame = match (parent, name) {
        (None, "testsuites") => Frame::Suites,
        (None | Some(Frame::Suites | Frame::Suite), "testsuite") => Frame::Suite,
        (None | Some(Frame::Suites | Frame::Suite), "testcase") => {
            let attrs = attributes(e)?;
            let get = |k: &str| attrs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            Frame::Case(CaseBuilder {
                suite: suites
                    .last()
                    .cloned()
                    .unwrap_or_else(|| default_suite.to_string()),
                classname: non_empty(get("classname")),
                name: non_empty(get("name")).unwrap_or_else(|| "(unnamed)".to_string()),
                time: get("time").as_deref().and_then(parse_time),
                main: None,
                skipped: None,
                retries: 0,
            })
        }
        (Some(Frame::Case(_)), status) => {
            let kind = match status {
                "failure" => Some(StatusKind::Failure),
                "error" => Some(StatusKind::Error),
                "skipped" => Some(StatusKind::Skipped),
                "flakyFailure" | "flakyError" | "rerunFailure" | "rerunError" => {
                    Some(StatusKind::Retry)
                }
                _ => None,
            };
            match kind {
                Some(kind) => {
                    let attrs = attributes(e)?;
                    let get = |k: &str| attrs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
                    Frame::Status(StatusBuilder {
                        kind,
                        message: get("message"),
                        ty: get("type"),
                        text: String::new(),
                    })
                }
                None => Frame::Other,
            }
        }
        (Some(Frame::Status(_) | Frame::StatusChild), "system-out" | "system-err") => Frame::Other,
        (Some(Frame::Status(_) | Frame::StatusChild), _) => Frame::StatusChild,
        _ => Frame::Other,
    };
    Ok(frame)
}

/// Applies a closed element to its parent (a status to its case) or to the output (a case).
fn close_frame(
    frame: Frame,
    stack: &mut [(String, Frame)],
    cases: &mut Vec<CaseResult>,
    step: &str,
) {
    match frame {
        Frame::Case(case) => cases.push(case.finish(step)),
        Frame::Status(status) => {
            if let Some((_, Frame::Case(case))) = stack.last_mut() {
                case.apply(status);
            }
        }
        Frame::Suites | Frame::Suite | Frame::Other | Frame::StatusChild => {}
    }
}

fn suite_name(
    e: &BytesStart<'_>,
    default_suite: &str,
) -> Result<String, quick_xml::events::attributes::AttrError> {
    let attrs = attributes(e)?;
    Ok(
        non_empty(attrs.into_iter().find(|(n, _)| n == "name").map(|(_, v)| v))
            .unwrap_or_else(|| default_suite.to_string()),
    )
}

/// All attributes of an element, values unescaped. An entity we cannot resolve keeps the raw
/// text rather than failing the file.
///
/// Deliberately *not* the XML attribute-value normalization (which turns a literal newline into a
/// space): producers and quick-junit's writer put multi-line messages in `message=` with literal
/// newlines, and keeping them lets the summary show the first line and lets our own merged file
/// read back unchanged.
fn attributes(
    e: &BytesStart<'_>,
) -> Result<Vec<(String, String)>, quick_xml::events::attributes::AttrError> {
    let mut out = Vec::new();
    for attr in e.attributes() {
        let attr = attr?;
        let key = String::from_utf8_lossy(attr.key.local_name().as_ref()).into_owned();
        let raw = String::from_utf8_lossy(&attr.value);
        let value = match quick_xml::escape::unescape(&raw) {
            Ok(v) => v.into_owned(),
            Err(_) => raw.into_owned(),
        };
        out.push((key, value));
    }
    Ok(out)
}

/// Reads a `time` attribute in seconds: `0.001`, `12`, `1,234.5` (surefire with a grouping
/// locale), `0,5` or `1.234,5` (a decimal-comma locale), `1.5s`. Negative, NaN or absurd values
/// are `None`, as is anything else.
fn parse_time(raw: &str) -> Option<Duration> {
    let s = raw.trim().trim_end_matches('s').trim();
    if s.is_empty() {
        return None;
    }
    let normalized = match (s.rfind(','), s.rfind('.')) {
        // Both separators: the last one is the decimal point.
        (Some(c), Some(d)) if c > d => s.replace('.', "").replacen(',', ".", 1),
        (Some(_), Some(_)) => s.replace(',', ""),
        (Some(_), None) => {
            // Only commas: `1,234` or `12,345,678` is grouping; `0,5` or `1,25` is a decimal.
            let groups: Vec<&str> = s.split(',').collect();
            let grouping = groups.len() > 1
                && (1..=3).contains(&groups[0].len())
                && !groups[0].starts_with('0')
                && groups[1..].iter().all(|g| g.len() == 3);
            if grouping {
                s.replace(',', "")
            } else if groups.len() == 2 {
                s.replacen(',', ".", 1)
            } else {
                return None;
            }
        }
        (None, _) => s.to_string(),
    };
    let secs: f64 = normalized.parse().ok()?;
    if !secs.is_finite() || secs < 0.0 {
        return None;
    }
    Duration::try_from_secs_f64(secs).ok()
}

/// 1-based line and column of a byte offset, for warnings a user can jump to.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Aggregate counts over every step's cases.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// All cases, skipped included.
    pub tests: usize,
    /// Cases that ended [`CaseOutcome::Failed`].
    pub failures: usize,
    /// Cases that ended [`CaseOutcome::Error`].
    pub errors: usize,
    /// Cases that ended [`CaseOutcome::Skipped`].
    pub skipped: usize,
    /// Cases that passed after failed attempts (also counted as passed).
    pub flaky: usize,
    /// Report files read.
    pub files: usize,
    /// Sum of the cases' times (cases without a time count as zero).
    pub time: Duration,
}

impl Totals {
    /// Cases that passed (flaky ones included).
    pub fn passed(&self) -> usize {
        self.tests - self.failures - self.errors - self.skipped
    }
}

/// Adds up all steps' cases.
pub fn totals(all: &[StepReports]) -> Totals {
    let mut t = Totals::default();
    for step in all {
        t.files += step.files.len();
        for case in &step.cases {
            t.tests += 1;
            match case.outcome {
                CaseOutcome::Passed => {}
                CaseOutcome::Failed { .. } => t.failures += 1,
                CaseOutcome::Error { .. } => t.errors += 1,
                CaseOutcome::Skipped { .. } => t.skipped += 1,
            }
            if case.is_flaky() {
                t.flaky += 1;
            }
            t.time = t.time.saturating_add(case.time.unwrap_or_default());
        }
    }
    t
}

/// The end-of-stage summary, one fact per line:
///
/// ```text
/// tests: 12 passed, 1 failed, 0 errors, 2 skipped (3 files, 4.20s)
/// flaky: 1 passed on retry: suite::case
/// slowest: suite::a 3.10s, suite::b 1.00s
/// failed: suite::case — message
/// error: suite::other — message
/// warning: report x.xml is not valid JUnit XML: ...
/// ```
///
/// Case names get a `[step] ` prefix when more than one step contributed cases. The report
/// warnings are included (so the caller need not print them again). Returns an empty string when
/// there are no report files, no cases and no warnings.
pub fn render_summary(all: &[StepReports], slowest: usize) -> String {
    let t = totals(all);
    let warnings: Vec<&String> = all.iter().flat_map(|s| &s.warnings).collect();
    if t.files == 0 && t.tests == 0 && warnings.is_empty() {
        return String::new();
    }
    let steps_with_cases = all.iter().filter(|s| !s.cases.is_empty()).count();
    let label = |c: &CaseResult| {
        if steps_with_cases > 1 {
            format!("[{}] {}", c.step, c.display_name())
        } else {
            c.display_name()
        }
    };
    let cases = || all.iter().flat_map(|s| &s.cases);

    let mut out = String::new();
    if t.files > 0 || t.tests > 0 {
        let _ = writeln!(
            out,
            "tests: {} passed, {} failed, {} {}, {} skipped ({} {}, {})",
            t.passed(),
            t.failures,
            t.errors,
            if t.errors == 1 { "error" } else { "errors" },
            t.skipped,
            t.files,
            if t.files == 1 { "file" } else { "files" },
            format_duration(t.time),
        );
    }
    if t.flaky > 0 {
        let names: Vec<String> = cases().filter(|c| c.is_flaky()).map(label).collect();
        let _ = writeln!(
            out,
            "flaky: {} passed on retry: {}",
            t.flaky,
            names.join(", ")
        );
    }
    if slowest > 0 {
        let mut timed: Vec<&CaseResult> = cases()
            .filter(|c| !matches!(c.outcome, CaseOutcome::Skipped { .. }))
            .filter(|c| c.time.is_some_and(|d| !d.is_zero()))
            .collect();
        // Stable sort keeps document order among equal times, so the output is deterministic.
        timed.sort_by_key(|c| std::cmp::Reverse(c.time));
        if !timed.is_empty() {
            let list: Vec<String> = timed
                .iter()
                .take(slowest)
                .map(|c| {
                    format!(
                        "{} {}",
                        label(c),
                        format_duration(c.time.unwrap_or_default())
                    )
                })
                .collect();
            let _ = writeln!(out, "slowest: {}", list.join(", "));
        }
    }
    let bad: Vec<&CaseResult> = cases()
        .filter(|c| {
            matches!(
                c.outcome,
                CaseOutcome::Failed { .. } | CaseOutcome::Error { .. }
            )
        })
        .collect();
    for c in bad.iter().take(MAX_FAILED_LISTED) {
        let (word, message) = match &c.outcome {
            CaseOutcome::Failed { message, .. } => ("failed", message),
            CaseOutcome::Error { message, .. } => ("error", message),
            _ => continue,
        };
        match message.as_deref().map(summary_message) {
            Some(m) => {
                let _ = writeln!(out, "{word}: {} — {m}", label(c));
            }
            None => {
                let _ = writeln!(out, "{word}: {}", label(c));
            }
        }
    }
    if bad.len() > MAX_FAILED_LISTED {
        let _ = writeln!(
            out,
            "… and {} more failed (see junit.xml)",
            bad.len() - MAX_FAILED_LISTED
        );
    }
    for w in warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}

/// First non-empty line of a message, shortened to fit one summary line.
fn summary_message(m: &str) -> String {
    let line = m
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    if line.chars().count() > MAX_SUMMARY_MESSAGE_CHARS {
        let cut: String = line.chars().take(MAX_SUMMARY_MESSAGE_CHARS).collect();
        format!("{cut}…")
    } else {
        line.to_string()
    }
}

/// `12ms`, `4.20s`, `2m05s`.
fn format_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 1.0 {
        format!("{}ms", d.as_millis())
    } else if secs < 60.0 {
        format!("{secs:.2}s")
    } else {
        let whole = d.as_secs();
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

/// Writes one `<testsuites>` document with every case of every step.
///
/// Cases are grouped into one `<testsuite>` per run of consecutive cases with the same step and
/// suite, named `<step>/<suite>`, so two steps' `pytest` suites stay apart. Suites without cases
/// are not written: they carry nothing the totals or a reader would use. Written through quick-junit
/// (which also strips ANSI escapes and characters XML 1.0 forbids), to a temporary file renamed
/// into place, so a reader never sees half a file.
pub fn write_merged(all: &[StepReports], path: &Path) -> io::Result<()> {
    use quick_junit::{
        FlakyOrRerun, NonSuccessKind, Report, TestCase, TestCaseStatus, TestRerun, TestSuite,
    };

    let mut report = Report::new("stagehand");
    let mut total_time = Duration::ZERO;
    let mut current: Option<(String, String, TestSuite, Duration)> = None;
    let flush = |report: &mut Report, current: Option<(String, String, TestSuite, Duration)>| {
        if let Some((_, _, mut suite, time)) = current {
            suite.set_time(time);
            report.add_test_suite(suite);
        }
    };

    for case in all.iter().flat_map(|s| &s.cases) {
        let same = matches!(&current, Some((step, suite, _, _)) if *step == case.step && *suite == case.suite);
        if !same {
            flush(&mut report, current.take());
            current = Some((
                case.step.clone(),
                case.suite.clone(),
                TestSuite::new(format!("{}/{}", case.step, case.suite)),
                Duration::ZERO,
            ));
        }
        let reruns = |kind| (0..case.retries).map(move |_| TestRerun::new(kind));
        let status = match &case.outcome {
            CaseOutcome::Passed => TestCaseStatus::Success {
                flaky_runs: reruns(NonSuccessKind::Failure).collect(),
            },
            CaseOutcome::Failed { message, detail } | CaseOutcome::Error { message, detail } => {
                let kind = if matches!(case.outcome, CaseOutcome::Error { .. }) {
                    NonSuccessKind::Error
                } else {
                    NonSuccessKind::Failure
                };
                let mut s = TestCaseStatus::non_success(kind);
                if let Some(m) = message {
                    s.set_message(m.as_str());
                }
                if let Some(d) = detail {
                    s.set_description(d.as_str());
                }
                s.add_reruns(reruns(kind));
                s.set_rerun_kind(FlakyOrRerun::Rerun);
                s
            }
            CaseOutcome::Skipped { message } => {
                let mut s = TestCaseStatus::skipped();
                if let Some(m) = message {
                    s.set_message(m.as_str());
                }
                s
            }
        };
        let mut tc = TestCase::new(case.name.as_str(), status);
        if let Some(c) = &case.classname {
            tc.set_classname(c.as_str());
        }
        if let Some(t) = case.time {
            tc.set_time(t);
        }
        if let Some((_, _, suite, time)) = current.as_mut() {
            suite.add_test_case(tc);
            *time = time.saturating_add(case.time.unwrap_or_default());
        }
        total_time = total_time.saturating_add(case.time.unwrap_or_default());
    }
    flush(&mut report, current.take());
    report.set_time(total_time);

    let xml = report.to_string().map_err(io::Error::other)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "junit.xml".to_string());
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    fs::write(&tmp, xml.as_bytes())?;
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/junit")
    }

    fn fixture(name: &str) -> StepReports {
        let r = collect("test", &fixtures(), &[name.to_string()]);
        assert!(r.warnings.is_empty(), "{name}: {:?}", r.warnings);
        assert_eq!(r.files.len(), 1, "{name}");
        r
    }

    fn case<'a>(r: &'a StepReports, name: &str) -> &'a CaseResult {
        r.cases
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no case {name} in {:?}", r.cases))
    }

    fn message(c: &CaseResult) -> Option<&str> {
        match &c.outcome {
            CaseOutcome::Failed { message, .. }
            | CaseOutcome::Error { message, .. }
            | CaseOutcome::Skipped { message } => message.as_deref(),
            CaseOutcome::Passed => None,
        }
    }

    fn detail(c: &CaseResult) -> Option<&str> {
        match &c.outcome {
            CaseOutcome::Failed { detail, .. } | CaseOutcome::Error { detail, .. } => {
                detail.as_deref()
            }
            _ => None,
        }
    }

    fn counts(r: &StepReports) -> (usize, usize, usize, usize, usize) {
        let t = totals(std::slice::from_ref(r));
        (t.tests, t.failures, t.errors, t.skipped, t.flaky)
    }

    const ALL_FIXTURES: [&str; 7] = [
        "nextest.xml",
        "pytest.xml",
        "pytest-legacy.xml",
        "surefire.xml",
        "jest-junit.xml",
        "go-junit-report.xml",
        "go-junit-report-legacy.xml",
    ];

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    const MINIMAL: &str = r#"<testsuite name="s"><testcase name="ok"/></testsuite>"#;

    #[test]
    fn nextest_counts_flaky_and_reruns() {
        let r = fixture("nextest.xml");
        assert_eq!(counts(&r), (6, 2, 0, 0, 1));
        let flaky = case(&r, "retry::flaky_network");
        assert_eq!(flaky.outcome, CaseOutcome::Passed);
        assert_eq!(flaky.retries, 2);
        let parse_err = case(&r, "units::parse_rejects_garbage");
        // nextest writes no `message` attribute: the first line of the text stands in.
        assert_eq!(
            message(parse_err),
            Some(
                "thread 'units::parse_rejects_garbage' panicked at runner/src/units.rs:88:9: \
                 assertion `left == right` failed"
            )
        );
        assert!(detail(parse_err).unwrap().contains("left: 3"));
        let always = case(&r, "retry::always_fails");
        assert_eq!(always.retries, 2);
        assert!(matches!(always.outcome, CaseOutcome::Failed { .. }));
        assert_eq!(always.suite, "stagehand");
        assert_eq!(always.classname.as_deref(), Some("stagehand"));
        assert_eq!(
            case(&r, "cgroup::create_and_remove").time,
            Some(Duration::from_millis(1234))
        );
        // The flaky attempts' <system-out> and <stackTrace> do not leak into the case.
        assert_eq!(case(&r, "units::parse_ok").outcome, CaseOutcome::Passed);
    }

    #[test]
    fn pytest_failure_error_skip_and_xfail() {
        let r = fixture("pytest.xml");
        assert_eq!(counts(&r), (6, 1, 1, 2, 0));
        let fail = case(&r, "test_divide");
        // pytest puts the whole assertion explanation in the attribute (`&#10;` for newlines).
        assert_eq!(
            message(fail),
            Some("assert 0.5 == 2\n +  where 0.5 = divide(1, 2)")
        );
        assert!(
            detail(fail)
                .unwrap()
                .contains(">       assert divide(1, 2) == 2")
        );
        assert_eq!(fail.classname.as_deref(), Some("tests.test_math"));
        assert_eq!(fail.suite, "pytest");
        let err = case(&r, "test_query");
        assert!(matches!(err.outcome, CaseOutcome::Error { .. }));
        assert_eq!(
            message(err),
            Some("failed on setup with \"fixture 'db' not found\"")
        );
        assert_eq!(message(case(&r, "test_fetch")), Some("needs network"));
        assert_eq!(
            message(case(&r, "test_known_bug")),
            Some("rounding bug #12")
        );
    }

    #[test]
    fn pytest_legacy_single_testsuite_root() {
        let r = fixture("pytest-legacy.xml");
        assert_eq!(counts(&r), (4, 1, 0, 1, 0));
        let fail = case(&r, "test_boom");
        // No message attribute: first non-empty line of the text.
        assert_eq!(message(fail), Some("AssertionError: boom"));
        assert_eq!(message(case(&r, "test_skip_me")), None);
        assert_eq!(case(&r, "test_no_time").time, None);
        assert_eq!(case(&r, "test_ok").time, Some(Duration::from_millis(1)));
    }

    #[test]
    fn surefire_locale_time_and_cdata() {
        let r = fixture("surefire.xml");
        assert_eq!(counts(&r), (5, 1, 1, 1, 1));
        let div = case(&r, "divideRounds");
        assert_eq!(div.time, Some(Duration::from_secs_f64(1234.5)));
        assert_eq!(message(div), Some("expected: <2> but was: <3>"));
        assert!(
            detail(div)
                .unwrap()
                .contains("at com.example.CalculatorTest.divideRounds(CalculatorTest.java:27)")
        );
        // <system-out> of the case is not the failure detail.
        assert!(!detail(div).unwrap().contains("computing"));
        let npe = case(&r, "nullInput");
        assert!(matches!(npe.outcome, CaseOutcome::Error { .. }));
        assert_eq!(message(case(&r, "notYet")), Some("not implemented yet"));
        assert!(case(&r, "retriedTimeout").is_flaky());
        assert_eq!(
            case(&r, "adds").display_name(),
            "com.example.CalculatorTest::adds"
        );
    }

    #[test]
    fn jest_junit_failure_without_message() {
        let r = fixture("jest-junit.xml");
        assert_eq!(counts(&r), (5, 1, 0, 1, 0));
        let fail = case(&r, "Calculator divides by zero throws");
        assert_eq!(message(fail), Some("Error: expect(received).toThrow()"));
        assert!(detail(fail).unwrap().contains("at Object.<anonymous>"));
        assert_eq!(fail.suite, "Calculator");
        // classname repeats the name: shown once.
        assert_eq!(fail.display_name(), "Calculator divides by zero throws");
        assert_eq!(case(&r, "Api returns 404").suite, "Api");
    }

    #[test]
    fn go_junit_report_build_error_and_skip() {
        let r = fixture("go-junit-report.xml");
        assert_eq!(counts(&r), (4, 1, 1, 1, 0));
        let div = case(&r, "TestDivide");
        assert_eq!(message(div), Some("Failed"));
        assert!(
            detail(div)
                .unwrap()
                .contains("calc_test.go:21: Divide(1, 0)")
        );
        assert_eq!(div.display_name(), "example.com/app/calc::TestDivide");
        let build = case(&r, "[build failed]");
        assert_eq!(message(build), Some("Build error"));
        assert_eq!(
            message(case(&r, "TestSlow")),
            Some("calc_test.go:30: skipping in short mode")
        );
    }

    #[test]
    fn go_junit_report_legacy_single_root() {
        let r = fixture("go-junit-report-legacy.xml");
        assert_eq!(counts(&r), (3, 1, 0, 0, 0));
        assert_eq!(case(&r, "TestParse").suite, "example.com/app/parse");
        let empty = case(&r, "TestParseEmpty");
        assert_eq!(message(empty), Some("Failed"));
        assert_eq!(
            detail(empty),
            Some("parse_test.go:14: Parse(\"\") = nil, want error")
        );
    }

    /// Why the module has its own reader (see the module doc): if quick-junit ever accepts these,
    /// this test says the hand-written reader could go.
    #[test]
    fn quick_junit_reader_rejects_common_producers() {
        for name in ["surefire.xml", "pytest-legacy.xml", "jest-junit.xml"] {
            let xml = fs::read_to_string(fixtures().join(name)).unwrap();
            assert!(
                quick_junit::Report::deserialize_from_str(&xml).is_err(),
                "{name}"
            );
        }
    }

    #[test]
    fn glob_double_star_matches_nested_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path();
        write(&ws.join("out/a.xml"), MINIMAL);
        write(&ws.join("out/x/y/z/b.xml"), MINIMAL);
        write(&ws.join("out/x/notes.txt"), "not a report");
        write(&ws.join("elsewhere/c.xml"), MINIMAL);
        let r = collect("t", ws, &["out/**/*.xml".to_string()]);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        assert_eq!(
            r.files,
            vec![ws.join("out/a.xml"), ws.join("out/x/y/z/b.xml")]
        );
        assert_eq!(r.cases.len(), 2);
        assert!(r.cases.iter().all(|c| c.step == "t"));

        // `*` does not cross directories.
        let r = collect("t", ws, &["out/*.xml".to_string()]);
        assert_eq!(r.files, vec![ws.join("out/a.xml")]);

        // A leading `**` from the workspace root, and an absolute pattern.
        let r = collect("t", ws, &["**/c.xml".to_string()]);
        assert_eq!(r.files, vec![ws.join("elsewhere/c.xml")]);
        let abs = format!("{}/elsewhere/*.xml", ws.display());
        let r = collect("t", Path::new("/nonexistent"), &[abs]);
        assert_eq!(r.files, vec![ws.join("elsewhere/c.xml")]);

        // Two patterns naming the same file read it once.
        let r = collect(
            "t",
            ws,
            &["out/a.xml".to_string(), "out/**/a.xml".to_string()],
        );
        assert_eq!(r.files.len(), 1);
        assert_eq!(r.cases.len(), 1);
    }

    #[test]
    fn glob_metacharacters_in_workspace_path_are_literal() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws[1]");
        write(&ws.join("r/a.xml"), MINIMAL);
        let r = collect("t", &ws, &["r/*.xml".to_string()]);
        assert_eq!(r.files, vec![ws.join("r/a.xml")]);
    }

    #[test]
    fn symlink_loop_terminates() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path();
        write(&ws.join("reports/a.xml"), MINIMAL);
        std::os::unix::fs::symlink(ws, ws.join("reports/loop")).unwrap();
        std::os::unix::fs::symlink(ws.join("reports/a.xml"), ws.join("link.xml")).unwrap();
        let r = collect("t", ws, &["**/*.xml".to_string()]);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        // Found once, although reachable as reports/a.xml, link.xml and through the loop.
        assert_eq!(r.files.len(), 1);
        assert_eq!(r.cases.len(), 1);
    }

    #[test]
    fn missing_match_directory_and_bad_glob_warn() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path();
        fs::create_dir_all(ws.join("reports")).unwrap();
        let r = collect(
            "t",
            ws,
            &[
                "a/**/*.xml".to_string(),
                "reports".to_string(),
                "missing.xml".to_string(),
                "r/[.xml".to_string(),
            ],
        );
        assert!(r.cases.is_empty());
        assert_eq!(r.warnings.len(), 4, "{:?}", r.warnings);
        assert_eq!(r.warnings[0], "no file matches reports path `a/**/*.xml`");
        assert!(r.warnings[1].contains("`reports` is a directory"));
        assert_eq!(r.warnings[2], "no file matches reports path `missing.xml`");
        assert!(r.warnings[3].starts_with("reports path `r/[.xml` is not a valid glob"));
    }

    #[test]
    fn invalid_xml_is_a_warning_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path();
        write(&ws.join("r/good.xml"), MINIMAL);
        write(
            &ws.join("r/bad.xml"),
            "<testsuite name=\"s\">\n  <testcase name=\"a\"></testsuite>\n",
        );
        write(&ws.join("r/html.xml"), "<html><body/></html>");
        write(&ws.join("r/empty.xml"), "");
        write(&ws.join("r/binary.xml"), "\u{0}\u{1}PK\u{3}\u{4}garbage");
        let r = collect("t", ws, &["r/*.xml".to_string()]);
        assert_eq!(r.files, vec![ws.join("r/good.xml")]);
        assert_eq!(r.cases.len(), 1);
        assert_eq!(r.warnings.len(), 4, "{:?}", r.warnings);
        let bad = format!(
            "report {} is not valid JUnit XML: ",
            ws.join("r/bad.xml").display()
        );
        let w = r.warnings.iter().find(|w| w.starts_with(&bad)).unwrap();
        assert!(w.contains("line 2"), "{w}");
        assert!(
            r.warnings
                .iter()
                .any(|w| w.contains("html.xml") && w.contains("root element is <html>"))
        );
        assert!(r.warnings.iter().any(|w| w.contains("empty.xml")));
        assert!(r.warnings.iter().any(|w| w.contains("binary.xml")));
    }

    #[test]
    fn oversized_report_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.xml");
        let f = fs::File::create(&path).unwrap();
        // Sparse: no 64 MiB actually written.
        f.set_len(MAX_REPORT_BYTES + 1).unwrap();
        let r = collect("t", dir.path(), &["big.xml".to_string()]);
        assert!(r.files.is_empty());
        assert_eq!(r.warnings.len(), 1);
        assert!(
            r.warnings[0].contains("over the 64 MiB limit"),
            "{:?}",
            r.warnings
        );
    }

    #[test]
    fn truncated_fixtures_never_panic_and_are_rejected() {
        for name in ALL_FIXTURES {
            let bytes = fs::read(fixtures().join(name)).unwrap();
            let end = bytes.trim_ascii_end().len();
            for len in 0..end {
                let result = parse_junit(&bytes[..len], "f", "t");
                assert!(result.is_err(), "{name} cut at {len} parsed as complete");
            }
            assert!(parse_junit(&bytes[..end], "f", "t").is_ok(), "{name}");
        }
    }

    #[test]
    fn mutated_fixtures_never_panic() {
        // Deterministic xorshift so a failure is reproducible.
        let mut state: u64 = 0x5eed_cafe_f00d_beef;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let nasty = [b'<', b'>', b'&', b'"', b'/', 0, 0xff, b']', b'\n'];
        for name in ALL_FIXTURES {
            let original = fs::read(fixtures().join(name)).unwrap();
            for _ in 0..300 {
                let mut bytes = original.clone();
                for _ in 0..(next() % 4 + 1) {
                    let i = (next() as usize) % bytes.len();
                    bytes[i] = nasty[(next() as usize) % nasty.len()];
                }
                let _ = parse_junit(&bytes, "f", "t");
            }
        }
    }

    #[test]
    fn parse_time_formats() {
        let ms = Duration::from_millis;
        assert_eq!(parse_time("0.001"), Some(ms(1)));
        assert_eq!(parse_time(" 12 "), Some(ms(12_000)));
        assert_eq!(parse_time("1,234.5"), Some(ms(1_234_500)));
        assert_eq!(parse_time("1.234,5"), Some(ms(1_234_500)));
        assert_eq!(parse_time("0,5"), Some(ms(500)));
        assert_eq!(parse_time("1,234"), Some(ms(1_234_000)));
        assert_eq!(parse_time("1.5s"), Some(ms(1_500)));
        assert_eq!(parse_time(""), None);
        assert_eq!(parse_time("-1"), None);
        assert_eq!(parse_time("NaN"), None);
        assert_eq!(parse_time("1e300"), None);
        assert_eq!(parse_time("fast"), None);
    }

    #[test]
    fn entities_and_nested_suites() {
        let xml = r#"<?xml version="1.0"?>
<!DOCTYPE testsuites [ <!ENTITY x "boom"> ]>
<testsuites>
  <testsuite name="outer">
    <testsuite name="inner">
      <testcase name="a &amp; b"><failure>&lt;tag&gt; &#233; &x;</failure></testcase>
    </testsuite>
    <testcase name="c"/>
  </testsuite>
  <testcase name="orphan"/>
</testsuites>"#;
        let cases = parse_junit(xml.as_bytes(), "file", "t").unwrap();
        assert_eq!(cases.len(), 3);
        assert_eq!(cases[0].name, "a & b");
        assert_eq!(cases[0].suite, "inner");
        assert_eq!(message(&cases[0]), Some("<tag> é &x;"));
        assert_eq!(cases[1].suite, "outer");
        assert_eq!(cases[2].suite, "file");
    }

    #[test]
    fn merged_file_round_trips() {
        let all: Vec<StepReports> = vec![
            collect(
                "unit",
                &fixtures(),
                &["nextest.xml".to_string(), "pytest*.xml".to_string()],
            ),
            collect(
                "integration",
                &fixtures(),
                &[
                    "surefire.xml".to_string(),
                    "jest-junit.xml".to_string(),
                    "go-*.xml".to_string(),
                ],
            ),
        ];
        assert!(all.iter().all(|s| s.warnings.is_empty()), "{all:?}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junit.xml");
        write_merged(&all, &path).unwrap();
        let before = totals(&all);

        // A generic reader: quick-junit's own.
        let xml = fs::read_to_string(&path).unwrap();
        let report = quick_junit::Report::deserialize_from_str(&xml).unwrap();
        assert_eq!(report.tests, before.tests);
        assert_eq!(report.failures, before.failures);
        assert_eq!(report.errors, before.errors);
        assert_eq!(report.skipped, before.skipped);
        assert!(
            report
                .test_suites
                .iter()
                .all(|s| s.name.starts_with("unit/") || s.name.starts_with("integration/"))
        );
        assert!(
            report
                .test_suites
                .iter()
                .any(|s| s.name.as_str() == "integration/com.example.CalculatorTest")
        );

        // And ours: same totals, same messages.
        let again = collect("merged", dir.path(), &["junit.xml".to_string()]);
        assert!(again.warnings.is_empty(), "{:?}", again.warnings);
        let after = totals(std::slice::from_ref(&again));
        assert_eq!(
            (
                after.tests,
                after.failures,
                after.errors,
                after.skipped,
                after.flaky
            ),
            (
                before.tests,
                before.failures,
                before.errors,
                before.skipped,
                before.flaky
            )
        );
        let diff = after.time.abs_diff(before.time);
        assert!(
            diff < Duration::from_millis(50),
            "{:?} vs {:?}",
            after.time,
            before.time
        );
        let orig: Vec<_> = all.iter().flat_map(|s| &s.cases).map(message).collect();
        let back: Vec<_> = again.cases.iter().map(message).collect();
        assert_eq!(orig, back);
        assert!(!dir.path().join(".junit.xml.tmp").exists());
    }

    #[test]
    fn summary_text() {
        let r = collect(
            "unit",
            &fixtures(),
            &["pytest-legacy.xml".to_string(), "nope/*.xml".to_string()],
        );
        let summary = render_summary(std::slice::from_ref(&r), 2);
        assert_eq!(
            summary,
            "tests: 2 passed, 1 failed, 0 errors, 1 skipped (1 file, 31ms)\n\
             slowest: tests.test_legacy::test_boom 30ms, tests.test_legacy::test_ok 1ms\n\
             failed: tests.test_legacy::test_boom — AssertionError: boom\n\
             warning: no file matches reports path `nope/*.xml`\n"
        );
    }

    #[test]
    fn summary_multi_step_flaky_and_slowest() {
        let all = vec![
            collect("unit", &fixtures(), &["nextest.xml".to_string()]),
            collect("java", &fixtures(), &["surefire.xml".to_string()]),
        ];
        let summary = render_summary(&all, 3);
        let lines: Vec<&str> = summary.lines().collect();
        assert!(
            lines[0].starts_with("tests: 6 passed, 3 failed, 1 error, 1 skipped (2 files, "),
            "{summary}"
        );
        assert_eq!(
            lines[1],
            "flaky: 2 passed on retry: [unit] stagehand::retry::flaky_network, \
             [java] com.example.CalculatorTest::retriedTimeout"
        );
        assert!(
            lines[2]
                .starts_with("slowest: [java] com.example.CalculatorTest::divideRounds 20m34s, "),
            "{summary}"
        );
        assert!(summary.contains(
            "error: [java] com.example.CalculatorTest::nullInput — Cannot invoke \"String.length()\""
        ));
        assert!(summary.contains("failed: [unit] stagehand::retry::always_fails — "));
    }

    #[test]
    fn summary_empty_without_reports() {
        assert_eq!(render_summary(&[], 3), "");
        assert_eq!(render_summary(&[StepReports::default()], 3), "");
        assert_eq!(totals(&[]), Totals::default());
    }
}
