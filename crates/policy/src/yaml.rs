//! A YAML document as a tree of located nodes, so that every problem in a policy file is
//! reported with its line and column, and all of them at once (a derived `Deserialize` stops at
//! the first).

use std::fmt;
use std::path::Path;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

use crate::error::Diagnostic;

/// A YAML value. Plain scalars are typed by YAML 1.2's core schema (`yes`, `on`, `y` are
/// strings; `true`, `false` booleans).
#[derive(Debug)]
pub(crate) enum Node {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Spanned<Node>>),
    Map(Vec<(Spanned<Node>, Spanned<Node>)>),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML value")
    }
    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Int(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
        Ok(Node::Int(v.into()))
    }
    fn visit_i128<E>(self, v: i128) -> Result<Node, E> {
        Ok(Node::Int(v))
    }
    fn visit_u128<E>(self, v: u128) -> Result<Node, E> {
        Ok(i128::try_from(v).map_or(Node::Float(v as f64), Node::Int))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(Node::Str(v))
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<Node, E> {
        Ok(Node::Str(String::from_utf8_lossy(v).into_owned()))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = a.next_element()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = a.next_entry()? {
            entries.push(entry);
        }
        Ok(Node::Map(entries))
    }
}

impl Node {
    /// The kind of value, for messages ("expected a string, found a list").
    pub(crate) fn describe(&self) -> &'static str {
        match self {
            Node::Null => "nothing (null)",
            Node::Bool(_) => "a boolean",
            Node::Int(_) => "an integer",
            Node::Float(_) => "a number",
            Node::Str(_) => "a string",
            Node::Seq(_) => "a list",
            Node::Map(_) => "a mapping",
        }
    }
}

/// A mapping entry: the field's name, its key node and its value node.
pub(crate) type Field<'n> = (&'static str, &'n Spanned<Node>, &'n Spanned<Node>);

/// Line and column (from 1) of a node.
pub(crate) fn pos(n: &Spanned<Node>) -> (usize, usize) {
    let l = n.referenced;
    (usize::try_from(l.line()).unwrap_or(0), usize::try_from(l.column()).unwrap_or(0))
}

/// A parsed file: its text and the diagnostics found so far.
pub(crate) struct Doc<'a> {
    pub(crate) src: &'a str,
    pub(crate) file: &'a Path,
    pub(crate) diags: Vec<Diagnostic>,
}

impl<'a> Doc<'a> {
    pub(crate) fn new(file: &'a Path, src: &'a str) -> Self {
        Self { src, file, diags: Vec::new() }
    }

    /// The document's root node, or `None` after a syntax error (reported).
    pub(crate) fn parse(&mut self) -> Option<Spanned<Node>> {
        let options = serde_saphyr::options! { strict_booleans: true, with_snippet: false };
        match serde_saphyr::from_str_with_options::<Spanned<Node>>(self.src, options) {
            Ok(root) => Some(root),
            Err(e) => {
                let (line, column) = e
                    .location()
                    .map(|l| (usize::try_from(l.line()).unwrap_or(0), usize::try_from(l.column()).unwrap_or(0)))
                    .unwrap_or((1, 1));
                let message = strip_position(&e.without_snippet().to_string());
                self.diags.push(Diagnostic::error(self.file, line.max(1), column.max(1), message));
                None
            }
        }
    }

    pub(crate) fn error(&mut self, n: &Spanned<Node>, message: impl Into<String>) {
        let (line, column) = pos(n);
        self.diags.push(Diagnostic::error(self.file, line, column, message));
    }

    pub(crate) fn error_at(&mut self, line: usize, column: usize, message: impl Into<String>) {
        self.diags.push(Diagnostic::error(self.file, line, column, message));
    }

    /// The text of a scalar as written, for a plain scalar YAML typed as a number or a boolean
    /// where a string is expected (`task_types: [1]`).
    fn raw(&self, n: &Spanned<Node>) -> Option<String> {
        let span = n.referenced.span();
        let start = usize::try_from(span.byte_offset()?).ok()?;
        let len = usize::try_from(span.byte_len()?).ok()?;
        let text = self.src.get(start..start.checked_add(len)?)?;
        (!text.is_empty()).then(|| text.to_owned())
    }

    /// The byte at a node's start (to tell a quoted scalar from a plain one).
    pub(crate) fn first_char(&self, n: &Spanned<Node>) -> Option<char> {
        let start = usize::try_from(n.referenced.span().byte_offset()?).ok()?;
        self.src.get(start..)?.chars().next()
    }

    /// A string (a plain scalar typed otherwise is taken as written).
    pub(crate) fn string(&mut self, n: &Spanned<Node>, what: &str) -> Option<String> {
        match &n.value {
            Node::Str(s) => Some(s.clone()),
            Node::Int(_) | Node::Float(_) | Node::Bool(_) => match self.raw(n) {
                Some(s) => Some(s),
                None => {
                    self.error(n, format!("{what} must be a string, found {}", n.value.describe()));
                    None
                }
            },
            other => {
                let found = other.describe();
                self.error(n, format!("{what} must be a string, found {found}"));
                None
            }
        }
    }

    /// A string or a list of strings, each with its node (for located errors).
    pub(crate) fn strings<'n>(&mut self, n: &'n Spanned<Node>, what: &str) -> Vec<(String, &'n Spanned<Node>)> {
        match &n.value {
            Node::Seq(items) => {
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    if let Some(s) = self.string(item, &format!("each entry of {what}")) {
                        out.push((s, item));
                    }
                }
                out
            }
            Node::Map(_) | Node::Null => {
                let found = n.value.describe();
                self.error(n, format!("{what} must be a string or a list of strings, found {found}"));
                Vec::new()
            }
            _ => self.string(n, what).map(|s| vec![(s, n)]).unwrap_or_default(),
        }
    }

    /// The entries of a mapping with string keys; each key checked against `known` (an unknown
    /// or repeated key is reported, with a suggestion when one is close).
    pub(crate) fn fields<'n>(
        &mut self,
        n: &'n Spanned<Node>,
        what: &str,
        known: &[&'static str],
    ) -> Option<Vec<Field<'n>>> {
        let Node::Map(entries) = &n.value else {
            let found = n.value.describe();
            self.error(n, format!("{what} must be a mapping, found {found}"));
            return None;
        };
        let mut out: Vec<Field<'n>> = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            let Some(key) = self.string(k, &format!("a key of {what}")) else { continue };
            let Some(&name) = known.iter().find(|&&f| f == key) else {
                let hint = match closest(&key, known) {
                    Some(s) => format!(" (did you mean `{s}`?)"),
                    None => String::new(),
                };
                self.error(k, format!("unknown field `{key}` in {what}{hint}; expected one of: {}", known.join(", ")));
                continue;
            };
            if out.iter().any(|(f, _, _)| *f == name) {
                self.error(k, format!("field `{key}` appears twice in {what}"));
                continue;
            }
            out.push((name, k, v));
        }
        Some(out)
    }
}

/// serde-saphyr's plain message ends with " at line N, column M": the diagnostic has them.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) if message[i..].contains(", column ") => message[..i].to_owned(),
        _ => message.to_owned(),
    }
}

/// The known name closest to `s` (edit distance at most 2), for "did you mean".
fn closest<'k>(s: &str, known: &[&'k str]) -> Option<&'k str> {
    known.iter().map(|k| (edit_distance(s, k), *k)).filter(|(d, _)| *d <= 2).min_by_key(|(d, _)| *d).map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(closest("efect", &["id", "effect"]), Some("effect"));
        assert_eq!(closest("zzzzzz", &["id", "effect"]), None);
        assert_eq!(strip_position("unclosed bracket '[' at line 1, column 4"), "unclosed bracket '['");
    }
}
