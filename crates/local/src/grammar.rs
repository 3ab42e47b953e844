//! Grammar-constrained sampling of JSON: a small local model cannot emit malformed tool-call
//! arguments if every token it samples keeps the output a valid prefix of a value of the schema.
//!
//! # Mechanism
//!
//! [`JsonGrammar::from_schema`] compiles a JSON Schema (a subset, below) into a graph of nodes
//! (string, number, literal set, array, object, any-of). [`JsonGrammar::start`] gives a
//! [`Matcher`]: an incremental, byte-level pushdown recognizer. Its state is a small set of
//! *threads*, each a stack of frames (one per open value: the root, each open array/object, and
//! the string, number or literal being written). A byte is fed to every thread; a thread that
//! cannot take it dies, and where the byte starts a value that several alternatives of an
//! `anyOf` (or the branches of "any JSON value") could begin, the thread forks. The matcher
//! accepts a byte if at least one thread survives. So an `enum` whose values share a prefix, or
//! `anyOf` branches that look alike for a while, are followed together until the bytes decide.
//! At most 32 threads are kept (identical ones merge); beyond that, later alternatives are
//! dropped, which makes the matcher stricter but never lets an invalid byte through.
//!
//! Being byte-level, it does not care how a tokenizer cuts the text: a token may end in the middle
//! of a string escape, of a `\uXXXX` sequence or of a multi-byte UTF-8 character. UTF-8 is
//! checked exactly (no overlong forms, no encoded surrogates, nothing above U+10FFFF), escapes
//! must be JSON's, and `\u` surrogates must come as a high/low pair, so the output always parses
//! with `serde_json`.
//!
//! **No dead ends.** Every prefix the matcher accepts can be completed to a value of the schema:
//! unsatisfiable parts of a schema are pruned when it compiles (an `anyOf` branch, an optional
//! property, an `enum` left empty by `type`; a schema that cannot be satisfied at all is an
//! error), every literal set is a trie, every bound (whitespace, digits, string length, item
//! count) still leaves a way to close, and a required property can always still be written.
//! [`Matcher::shortest_completion`] returns such a completion, which the tests check after every
//! step of random walks; an engine can also use it to close the JSON when its token budget runs
//! out.
//!
//! **Bounded output.** Whitespace is allowed between tokens but at most [`MAX_WHITESPACE`] bytes
//! in a row; numbers have at most 15 integer digits, 15 fraction digits and a two-digit exponent
//! (so they always fit an `f64`/`i64`); "any value" nests at most a dozen containers deep. Strings
//! and arrays without `maxLength`/`maxItems` are unbounded: the engine's token limit bounds them.
//!
//! ```
//! use descartes_local::grammar::{JsonGrammar, pick};
//!
//! let schema = serde_json::json!({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]});
//! let grammar = JsonGrammar::from_schema(&schema)?;
//! // A vocabulary in the model's order of preference; empty bytes = end of generation.
//! let vocab: [(u32, &[u8]); 5] = [(0, b"Sure!"), (1, b""), (2, b"}"), (3, b"{\"n\": 4"), (4, b"2")];
//! let mut matcher = grammar.start();
//! let mut out = Vec::new();
//! while let Some(id) = pick(&matcher, vocab) {
//!     let bytes = vocab[id as usize].1;
//!     if bytes.is_empty() {
//!         break;
//!     }
//!     matcher.advance(bytes);
//!     out.extend_from_slice(bytes);
//! }
//! assert_eq!(out, b"{\"n\": 4}");
//! # Ok::<(), descartes_local::grammar::GrammarError>(())
//! ```
//!
//! # The schema subset
//!
//! - `type` (`string`, `number`, `integer`, `boolean`, `null`, `object`, `array`, or an array of
//!   them; `nullable: true` adds `null`). Without `type`, it is inferred from the keywords
//!   present (`properties` → object, `items` → array, `minLength` → string...), or any value.
//! - `properties`, `required`, `additionalProperties`: required properties must appear, optional
//!   ones may, each at most once, in any order. Only declared properties are generated (a
//!   constrained generator may be stricter than the schema); an object schema without
//!   `properties` generates free keys whose values follow `additionalProperties` (any value when
//!   absent; only `{}` when `false`). A required property that is not declared gets any value
//!   (the schema is unsatisfiable if `additionalProperties` is `false`). At most 64 properties
//!   per object are generated: the required ones, then the first optional ones.
//! - `items` (a schema), `minItems`, `maxItems`; `minLength`, `maxLength` (in characters).
//! - `enum`, `const`: the values are written in compact form (`serde_json`'s); values that do not
//!   fit the schema's `type` or string length are left out. Object keys and literal values must
//!   be spelled as `serde_json` writes them (raw UTF-8, `\"`-style escapes, no spaces inside).
//! - Numbers: `-0` is not an integer (parsers read it as a float); `minimum`/`maximum` are not
//!   enforced.
//! - `anyOf`, `oneOf` (taken as `anyOf`: exclusivity is not enforced), `allOf`: the sibling
//!   keywords of a combinator are merged into each branch, shallowly (`properties` merged by
//!   name, `required` united, any other keyword of the branch wins), which is exact for the usual
//!   "common properties + alternatives" schemas.
//! - `$ref` to a local JSON pointer (`#/$defs/x`, `#/definitions/x`), inlined; a recursive
//!   reference is followed at most four levels deep (deeper, that branch is pruned). A `$ref` that
//!   does not resolve is any value.
//! - `true` or `{}` is any JSON value; `false` is nothing. Every other keyword (`pattern`,
//!   `format`, `minimum`, `maximum`, `multipleOf`, `uniqueItems`, `minProperties`, `not`,
//!   `if`/`then`, tuple `items`/`prefixItems`...) is ignored, so values may violate it.
//!
//! # Sampling
//!
//! [`pick`] returns the first candidate token (best first) whose bytes the matcher accepts; an
//! end-of-generation token is passed with empty bytes and is accepted only when the value is
//! complete ([`Matcher::is_complete`]). [`TokenChecker`] is the same check for an engine that
//! scans candidates itself. Cost: a token whose first byte cannot come next is rejected by a
//! table lookup (the table is filled lazily, at most 256 one-byte probes per step); any other
//! token is first run on a copy of the top frame alone (most tokens stay inside the string,
//! number or literal being written, or are rejected there); a token that closes or opens a value
//! costs a copy of the matcher's stacks (no allocation after the first), starting from the state
//! after its first byte (cached per first byte), and one step per byte. Scanning a whole
//! 49,152-token vocabulary in the worst states takes 0.25 to 1 ms of CPU in a release build
//! (measured on 2 busy cores; the `grammar` integration test `cost_of_a_full_scan` prints the
//! wall time of such scans), 5 to 10 times that unoptimized.

use std::sync::Arc;

use descartes_protocol::ToolSpec;
use serde_json::{Map, Value};

/// At most this many whitespace bytes in a row between tokens (and before or after the value).
pub const MAX_WHITESPACE: u8 = 16;
const MAX_INT_DIGITS: u8 = 15;
const MAX_FRAC_DIGITS: u8 = 15;
const MAX_EXP_DIGITS: u8 = 2;
/// "Any value" opens no container when a thread is this many frames deep.
const MAX_ANY_DEPTH: usize = 12;
/// At most this many live threads (alternatives) are followed; extra ones are dropped, which only
/// makes the matcher stricter (every thread kept is a valid parse).
const MAX_THREADS: usize = 32;
const MAX_REF_DEPTH: u32 = 4;
const MAX_NODES: usize = 50_000;
const MAX_PROPS: usize = 64;
const NONE: u32 = u32::MAX;

// Nodes every grammar has, for "any JSON value".
const ANY: u32 = 0;
const ANY_ARRAY: u32 = 1;
const ANY_OBJECT: u32 = 2;
const ANY_STRING: u32 = 3;
const ANY_SCALAR: u32 = 4;
const ANY_NUMBER: u32 = 5;

/// Why a schema cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrammarError {
    /// No JSON value satisfies the schema (e.g. `false`, an empty `enum`, `minItems` above
    /// `maxItems`, a required property whose schema is unsatisfiable).
    #[error("no JSON value satisfies the schema")]
    Unsatisfiable,
    /// The schema is malformed (e.g. an unknown `type`, a schema that is not an object or a bool).
    #[error("invalid JSON schema: {0}")]
    InvalidSchema(String),
    /// The compiled grammar would be too large (deep `$ref` expansion, more than 64 required
    /// properties in one object).
    #[error("the schema is too large to compile into a grammar: {0}")]
    TooLarge(String),
    /// A tool-call grammar needs at least one tool whose parameters schema is satisfiable.
    #[error("no tool to call")]
    NoTools,
}

/// A compiled grammar of JSON values; cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct JsonGrammar {
    g: Arc<Grammar>,
}

#[derive(Debug)]
struct Grammar {
    nodes: Vec<Node>,
    /// The shortest serialization of each node's values.
    min: Vec<Vec<u8>>,
    objs: Vec<ObjNode>,
    tries: Vec<Trie>,
    root: u32,
}

#[derive(Debug)]
enum Node {
    Any,
    AnyOf(Vec<u32>),
    Str {
        min: u32,
        max: u32,
    },
    Num {
        integer: bool,
    },
    Lit {
        trie: u32,
    },
    Arr {
        items: u32,
        min: u32,
        max: u32,
    },
    Obj {
        obj: u32,
    },
    /// The value depends on the literal written for the object's tag property (tool calls: the
    /// arguments schema of the named tool).
    Switch(Vec<u32>),
}

#[derive(Debug)]
struct Prop {
    /// The key as JSON, quotes included.
    key: Vec<u8>,
    node: u32,
    tag: bool,
}

#[derive(Debug)]
struct ObjNode {
    props: Vec<Prop>,
    keys: u32,
    all: u64,
    required: u64,
    /// Properties that may only be written once the tag property has been.
    needs_tag: u64,
    /// Free-form object: any keys, values of this node.
    free: Option<u32>,
}

impl ObjNode {
    fn allowed(&self, seen: u64, tag: u32) -> u64 {
        let m = self.all & !seen;
        if tag == NONE { m & !self.needs_tag } else { m }
    }
}

/// A set of byte strings as a trie: literal values (`true`, `enum`) and object keys.
#[derive(Debug, Default)]
struct Trie {
    nodes: Vec<TrieNode>,
    literals: Vec<Vec<u8>>,
}

#[derive(Debug, Default)]
struct TrieNode {
    children: Vec<(u8, u32)>,
    terminal: u32,
    /// The literals below this node (indices modulo 64; exact for object keys, which are < 64).
    mask: u64,
    /// The shortest literal below this node.
    shortest: u32,
    depth: u32,
}

impl Trie {
    fn new(literals: Vec<Vec<u8>>) -> Trie {
        let mut trie =
            Trie { nodes: vec![TrieNode { terminal: NONE, shortest: NONE, ..TrieNode::default() }], literals };
        for i in 0..trie.literals.len() {
            let mut at = 0usize;
            for d in 0..trie.literals[i].len() {
                let b = trie.literals[i][d];
                let next = match trie.nodes[at].children.iter().find(|(c, _)| *c == b) {
                    Some(&(_, n)) => n as usize,
                    None => {
                        let n = trie.nodes.len();
                        trie.nodes.push(TrieNode {
                            terminal: NONE,
                            shortest: NONE,
                            depth: d as u32 + 1,
                            ..TrieNode::default()
                        });
                        trie.nodes[at].children.push((b, n as u32));
                        n
                    }
                };
                trie.mark(at, i);
                at = next;
            }
            trie.mark(at, i);
            if trie.nodes[at].terminal == NONE {
                trie.nodes[at].terminal = i as u32;
            }
        }
        trie
    }

    fn mark(&mut self, at: usize, i: usize) {
        let len = self.literals[i].len();
        let node = &mut self.nodes[at];
        node.mask |= 1u64 << (i % 64);
        if node.shortest == NONE || self.literals[node.shortest as usize].len() > len {
            node.shortest = i as u32;
        }
    }

    fn child(&self, at: u32, b: u8) -> Option<u32> {
        self.nodes[at as usize].children.iter().find(|(c, _)| *c == b).map(|&(_, n)| n)
    }
}

// ---------------------------------------------------------------------------------------------
// Compilation

struct Compiler<'s> {
    g: Grammar,
    root: &'s Value,
    ref_depth: u32,
    /// Nesting of `compile` calls (guards against combinators that refer to themselves).
    depth: u32,
}

fn bit(i: usize) -> u64 {
    if i < 64 { 1u64 << i } else { 0 }
}

impl<'s> Compiler<'s> {
    fn new(root: &'s Value) -> Compiler<'s> {
        let mut c = Compiler {
            g: Grammar { nodes: Vec::new(), min: Vec::new(), objs: Vec::new(), tries: Vec::new(), root: NONE },
            root,
            ref_depth: 0,
            depth: 0,
        };
        // The fixed nodes of "any value" (ids ANY..=ANY_NUMBER).
        c.g.nodes.push(Node::Any);
        c.g.min.push(b"0".to_vec());
        c.g.nodes.push(Node::Arr { items: ANY, min: 0, max: u32::MAX });
        c.g.min.push(b"[]".to_vec());
        c.g.objs.push(ObjNode { props: Vec::new(), keys: 0, all: 0, required: 0, needs_tag: 0, free: Some(ANY) });
        c.g.nodes.push(Node::Obj { obj: 0 });
        c.g.min.push(b"{}".to_vec());
        c.g.nodes.push(Node::Str { min: 0, max: u32::MAX });
        c.g.min.push(b"\"\"".to_vec());
        c.g.tries.push(Trie::new(vec![b"true".to_vec(), b"false".to_vec(), b"null".to_vec()]));
        c.g.nodes.push(Node::Lit { trie: 0 });
        c.g.min.push(b"null".to_vec());
        c.g.nodes.push(Node::Num { integer: false });
        c.g.min.push(b"0".to_vec());
        // The object node's key trie (empty).
        c.g.tries.push(Trie::new(Vec::new()));
        c.g.objs[0].keys = 1;
        c
    }

    fn add(&mut self, node: Node) -> Result<u32, GrammarError> {
        if self.g.nodes.len() >= MAX_NODES {
            return Err(GrammarError::TooLarge(format!("more than {MAX_NODES} nodes")));
        }
        let min = match &node {
            Node::Any | Node::Num { .. } => b"0".to_vec(),
            Node::AnyOf(alts) | Node::Switch(alts) => {
                alts.iter().map(|&a| &self.g.min[a as usize]).min_by_key(|m| m.len()).cloned().unwrap_or_default()
            }
            Node::Str { min, .. } => {
                let mut v = vec![b'"'];
                v.extend(std::iter::repeat_n(b'a', *min as usize));
                v.push(b'"');
                v
            }
            Node::Lit { trie } => {
                let t = &self.g.tries[*trie as usize];
                t.literals.get(t.nodes[0].shortest as usize).cloned().unwrap_or_default()
            }
            Node::Arr { items, min, .. } => {
                let mut v = vec![b'['];
                for i in 0..*min {
                    if i > 0 {
                        v.push(b',');
                    }
                    v.extend_from_slice(&self.g.min[*items as usize]);
                }
                v.push(b']');
                v
            }
            Node::Obj { obj } => {
                let mut v = vec![b'{'];
                complete_object(&self.g, *obj, ObjSt::Open, 0, NONE, NONE, 0, NONE, &mut v);
                v
            }
        };
        self.g.nodes.push(node);
        self.g.min.push(min);
        Ok(self.g.nodes.len() as u32 - 1)
    }

    fn lit(&mut self, values: &[Value]) -> Result<Option<u32>, GrammarError> {
        let mut literals: Vec<Vec<u8>> = Vec::new();
        for v in values {
            let bytes = serde_json::to_vec(v).map_err(|e| GrammarError::InvalidSchema(e.to_string()))?;
            if !literals.contains(&bytes) {
                literals.push(bytes);
            }
        }
        if literals.is_empty() {
            return Ok(None);
        }
        self.g.tries.push(Trie::new(literals));
        let trie = self.g.tries.len() as u32 - 1;
        self.add(Node::Lit { trie }).map(Some)
    }

    /// Compiles a schema; `None` when no value satisfies it.
    fn compile(&mut self, schema: &Value) -> Result<Option<u32>, GrammarError> {
        if self.depth >= 256 {
            return Err(GrammarError::TooLarge("schemas nested more than 256 deep".into()));
        }
        self.depth += 1;
        let node = self.compile_inner(schema);
        self.depth -= 1;
        node
    }

    fn compile_inner(&mut self, schema: &Value) -> Result<Option<u32>, GrammarError> {
        let map = match schema {
            Value::Bool(true) => return Ok(Some(ANY)),
            Value::Bool(false) => return Ok(None),
            Value::Object(map) => map,
            other => {
                return Err(GrammarError::InvalidSchema(format!("a schema must be an object or a bool, not {other}")));
            }
        };
        if let Some(Value::String(reference)) = map.get("$ref") {
            return self.reference(reference);
        }
        for combinator in ["allOf", "anyOf", "oneOf"] {
            if let Some(subs) = map.get(combinator) {
                let Value::Array(subs) = subs else {
                    return Err(GrammarError::InvalidSchema(format!("`{combinator}` must be an array")));
                };
                let mut base = map.clone();
                base.remove(combinator);
                if combinator == "allOf" {
                    let mut merged = base;
                    for sub in subs {
                        merged = merge(merged, self.resolve(sub)?)?;
                    }
                    return self.compile(&Value::Object(merged));
                }
                let mut alts = Vec::new();
                for sub in subs {
                    let merged = merge(base.clone(), self.resolve(sub)?)?;
                    if let Some(node) = self.compile(&Value::Object(merged))? {
                        alts.push(node);
                    }
                }
                return match alts.len() {
                    0 => Ok(None),
                    1 => Ok(alts.pop()),
                    _ => self.add(Node::AnyOf(alts)).map(Some),
                };
            }
        }
        let mut types: Vec<&str> = match map.get("type") {
            None => infer_types(map),
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => {
                let mut v = Vec::new();
                for t in ts {
                    match t.as_str() {
                        Some(t) => v.push(t),
                        None => return Err(GrammarError::InvalidSchema(format!("bad `type` entry {t}"))),
                    }
                }
                v
            }
            Some(other) => return Err(GrammarError::InvalidSchema(format!("bad `type` {other}"))),
        };
        for t in &types {
            if !matches!(*t, "string" | "number" | "integer" | "boolean" | "null" | "object" | "array") {
                return Err(GrammarError::InvalidSchema(format!("unknown type `{t}`")));
            }
        }
        if map.get("nullable") == Some(&Value::Bool(true)) && !types.is_empty() && !types.contains(&"null") {
            types.push("null");
        }
        let (min_len, max_len) =
            (get_u32(map, "minLength").unwrap_or(0), get_u32(map, "maxLength").unwrap_or(u32::MAX));
        let literal_values = match (map.get("const"), map.get("enum")) {
            (Some(c), _) => Some(vec![c.clone()]),
            (None, Some(Value::Array(values))) => Some(values.clone()),
            (None, Some(_)) => return Err(GrammarError::InvalidSchema("`enum` must be an array".into())),
            (None, None) => None,
        };
        if let Some(values) = literal_values {
            let fits = |v: &Value| {
                let type_ok = types.is_empty() || types.iter().any(|t| value_has_type(v, t));
                let len_ok = match v {
                    Value::String(s) => {
                        let n = s.chars().count() as u64;
                        n >= u64::from(min_len) && n <= u64::from(max_len)
                    }
                    _ => true,
                };
                type_ok && len_ok
            };
            let values: Vec<Value> = values.into_iter().filter(fits).collect();
            return self.lit(&values);
        }
        if types.is_empty() {
            return Ok(Some(ANY));
        }
        let mut alts = Vec::new();
        for t in types {
            let node = match t {
                "string" if min_len <= max_len => Some(self.add(Node::Str { min: min_len, max: max_len })?),
                "string" => None,
                "number" => Some(self.add(Node::Num { integer: false })?),
                "integer" => Some(self.add(Node::Num { integer: true })?),
                "boolean" => self.lit(&[Value::Bool(false), Value::Bool(true)])?,
                "null" => self.lit(&[Value::Null])?,
                "array" => self.array(map)?,
                _ => self.object(map)?,
            };
            alts.extend(node);
        }
        match alts.len() {
            0 => Ok(None),
            1 => Ok(alts.pop()),
            _ => self.add(Node::AnyOf(alts)).map(Some),
        }
    }

    fn reference(&mut self, reference: &str) -> Result<Option<u32>, GrammarError> {
        let Some(target) = reference.strip_prefix('#').and_then(|p| self.root.pointer(p)) else {
            return Ok(Some(ANY));
        };
        if self.ref_depth >= MAX_REF_DEPTH {
            return Ok(None);
        }
        self.ref_depth += 1;
        let node = self.compile(target);
        self.ref_depth -= 1;
        node
    }

    /// The object a combinator's branch stands for (its `$ref` followed, once).
    fn resolve(&self, sub: &Value) -> Result<Map<String, Value>, GrammarError> {
        let mut sub = sub;
        if let Some(Value::String(reference)) = sub.get("$ref")
            && let Some(target) = reference.strip_prefix('#').and_then(|p| self.root.pointer(p))
        {
            sub = target;
        }
        match sub {
            Value::Object(map) => Ok(map.clone()),
            Value::Bool(true) => Ok(Map::new()),
            Value::Bool(false) => Ok(Map::from_iter([false_marker()])),
            other => Err(GrammarError::InvalidSchema(format!("a schema must be an object or a bool, not {other}"))),
        }
    }

    fn array(&mut self, map: &Map<String, Value>) -> Result<Option<u32>, GrammarError> {
        let min = get_u32(map, "minItems").unwrap_or(0);
        let mut max = get_u32(map, "maxItems").unwrap_or(u32::MAX);
        if min > max {
            return Ok(None);
        }
        let items = match map.get("items") {
            Some(items @ (Value::Object(_) | Value::Bool(_))) => self.compile(items)?,
            _ => Some(ANY),
        };
        let items = match items {
            Some(items) => items,
            None if min == 0 => {
                max = 0;
                ANY
            }
            None => return Ok(None),
        };
        self.add(Node::Arr { items, min, max }).map(Some)
    }

    fn object(&mut self, map: &Map<String, Value>) -> Result<Option<u32>, GrammarError> {
        let additional = map.get("additionalProperties");
        let closed = additional == Some(&Value::Bool(false));
        let required: Vec<&str> = match map.get("required") {
            Some(Value::Array(names)) => names.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let empty = Map::new();
        let declared = match map.get("properties") {
            Some(Value::Object(props)) => props,
            _ => &empty,
        };
        // (name, schema node, required)
        let mut props: Vec<(String, u32, bool)> = Vec::new();
        for (name, schema) in declared {
            let is_required = required.contains(&name.as_str());
            match self.compile(schema)? {
                Some(node) => props.push((name.clone(), node, is_required)),
                None if is_required => return Ok(None),
                None => {}
            }
        }
        for name in &required {
            if !declared.contains_key(*name) && !props.iter().any(|(n, _, _)| n == name) {
                if closed {
                    return Ok(None);
                }
                let node = match additional {
                    Some(schema @ (Value::Object(_) | Value::Bool(_))) => self.compile(schema)?,
                    _ => Some(ANY),
                };
                match node {
                    Some(node) => props.push(((*name).to_owned(), node, true)),
                    None => return Ok(None),
                }
            }
        }
        if props.is_empty() && !closed && declared.is_empty() {
            let free = match additional {
                Some(schema @ (Value::Object(_) | Value::Bool(_))) => self.compile(schema)?,
                _ => Some(ANY),
            };
            return self.object_node(Vec::new(), free).map(Some);
        }
        if props.len() > MAX_PROPS {
            let n_required = props.iter().filter(|p| p.2).count();
            if n_required > MAX_PROPS {
                return Err(GrammarError::TooLarge(format!("{n_required} required properties in one object")));
            }
            let mut room = MAX_PROPS - n_required;
            props.retain(|p| {
                p.2 || (room > 0 && {
                    room -= 1;
                    true
                })
            });
        }
        let props = props.into_iter().map(|(name, node, req)| (name, node, req, false, false)).collect();
        self.object_node(props, None).map(Some)
    }

    /// props: (name, node, required, tag, needs_tag).
    fn object_node(
        &mut self,
        props: Vec<(String, u32, bool, bool, bool)>,
        free: Option<u32>,
    ) -> Result<u32, GrammarError> {
        let mut keys = Vec::new();
        let mut obj = ObjNode { props: Vec::new(), keys: 0, all: 0, required: 0, needs_tag: 0, free };
        for (i, (name, node, required, tag, needs_tag)) in props.into_iter().enumerate() {
            let key = serde_json::to_vec(&name).map_err(|e| GrammarError::InvalidSchema(e.to_string()))?;
            keys.push(key.clone());
            obj.all |= bit(i);
            if required {
                obj.required |= bit(i);
            }
            if needs_tag {
                obj.needs_tag |= bit(i);
            }
            obj.props.push(Prop { key, node, tag });
        }
        self.g.tries.push(Trie::new(keys));
        obj.keys = self.g.tries.len() as u32 - 1;
        self.g.objs.push(obj);
        let id = self.g.objs.len() as u32 - 1;
        self.add(Node::Obj { obj: id })
    }
}

/// A key/value pair that makes a merged schema unsatisfiable (`"false"` branch).
fn false_marker() -> (String, Value) {
    ("enum".to_owned(), Value::Array(Vec::new()))
}

fn merge(mut base: Map<String, Value>, sub: Map<String, Value>) -> Result<Map<String, Value>, GrammarError> {
    for (k, v) in sub {
        match (k.as_str(), base.get_mut(&k), v) {
            ("properties", Some(Value::Object(a)), Value::Object(b)) => {
                for (name, schema) in b {
                    a.insert(name, schema);
                }
            }
            ("required", Some(Value::Array(a)), Value::Array(b)) => {
                for name in b {
                    if !a.contains(&name) {
                        a.push(name);
                    }
                }
            }
            (_, _, v) => {
                base.insert(k, v);
            }
        }
    }
    Ok(base)
}

fn infer_types(map: &Map<String, Value>) -> Vec<&'static str> {
    let has = |keys: &[&str]| keys.iter().any(|k| map.contains_key(*k));
    let mut types = Vec::new();
    if has(&["properties", "required", "additionalProperties"]) {
        types.push("object");
    }
    if has(&["items", "minItems", "maxItems"]) {
        types.push("array");
    }
    if has(&["minLength", "maxLength", "pattern"]) {
        types.push("string");
    }
    if has(&["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"]) {
        types.push("number");
    }
    types
}

fn value_has_type(v: &Value, t: &str) -> bool {
    match (t, v) {
        ("string", Value::String(_))
        | ("number", Value::Number(_))
        | ("boolean", Value::Bool(_))
        | ("null", Value::Null)
        | ("object", Value::Object(_))
        | ("array", Value::Array(_)) => true,
        ("integer", Value::Number(n)) => n.is_i64() || n.is_u64(),
        _ => false,
    }
}

fn get_u32(map: &Map<String, Value>, key: &str) -> Option<u32> {
    map.get(key).and_then(Value::as_u64).map(|n| u32::try_from(n).unwrap_or(u32::MAX))
}

impl JsonGrammar {
    /// Compiles a JSON Schema (the subset in the module documentation) into a grammar of the
    /// values it allows.
    pub fn from_schema(schema: &Value) -> Result<JsonGrammar, GrammarError> {
        let mut c = Compiler::new(schema);
        let root = c.compile(schema)?.ok_or(GrammarError::Unsatisfiable)?;
        c.g.root = root;
        Ok(JsonGrammar { g: Arc::new(c.g) })
    }

    /// The grammar of one call of one of these tools: `{"name": <a tool's name>, "arguments":
    /// <that tool's arguments>}`, the name first. Tools whose schemas cannot be satisfied are
    /// left out (no call of them would be valid).
    pub fn for_tool_call(tools: &[ToolSpec]) -> Result<JsonGrammar, GrammarError> {
        Self::for_tools(tools.iter().map(|t| (t.name.as_str(), &t.input_schema)), "name", "arguments")
    }

    /// [`JsonGrammar::for_tool_call`] with other keys (e.g. `"parameters"` for Llama 3's format):
    /// `{<name_key>: <a tool's name>, <arguments_key>: <that tool's arguments>}`.
    pub fn for_tools<'a>(
        tools: impl IntoIterator<Item = (&'a str, &'a Value)>,
        name_key: &str,
        arguments_key: &str,
    ) -> Result<JsonGrammar, GrammarError> {
        let empty = Value::Bool(true);
        let mut c = Compiler::new(&empty);
        let mut names = Vec::new();
        let mut cases = Vec::new();
        for (name, schema) in tools {
            let name = Value::String(name.to_owned());
            if names.contains(&name) {
                continue;
            }
            c.root = schema;
            c.ref_depth = 0;
            // A broken schema leaves its tool out, as an unsatisfiable one does.
            if let Ok(Some(node)) = c.compile(schema) {
                names.push(name);
                cases.push(node);
            }
        }
        let Some(name_node) = c.lit(&names)? else {
            return Err(GrammarError::NoTools);
        };
        let args = c.add(Node::Switch(cases))?;
        let props = vec![
            (name_key.to_owned(), name_node, true, true, false),
            (arguments_key.to_owned(), args, true, false, true),
        ];
        c.g.root = c.object_node(props, None)?;
        Ok(JsonGrammar { g: Arc::new(c.g) })
    }

    /// A matcher at the start of a value.
    pub fn start(&self) -> Matcher {
        Matcher { g: self.g.clone(), threads: vec![vec![Frame::Root { st: RootSt::Before, ws: 0 }]], live: 1 }
    }
}

// ---------------------------------------------------------------------------------------------
// Matching

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RootSt {
    Before,
    InValue,
    After,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StrSt {
    Open,
    Body,
    Esc,
    /// `n` hex digits of a `\u` escape read.
    Hex {
        n: u8,
        flags: u8,
    },
    /// A high surrogate was read: `\` of its low surrogate expected.
    LowBackslash,
    LowU,
    /// Inside a multi-byte UTF-8 character: `rem` bytes left, the next one in `lo..=hi`.
    Utf8 {
        rem: u8,
        lo: u8,
        hi: u8,
    },
}
const HEX_LOW: u8 = 1;
const HEX_FIRST_D: u8 = 2;
const HEX_HIGH: u8 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NumSt {
    Start,
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArrSt {
    Start,
    Open,
    InValue,
    AfterValue,
    AfterComma,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ObjSt {
    Start,
    Open,
    InKey,
    InFreeKey,
    AfterKey,
    AfterColon,
    InValue,
    AfterValue,
    AfterComma,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    Root { st: RootSt, ws: u8 },
    Str { node: u32, count: u32, st: StrSt },
    Num { integer: bool, st: NumSt, digits: u8 },
    Lit { trie: u32, at: u32 },
    Arr { node: u32, count: u32, st: ArrSt, ws: u8 },
    Obj { obj: u32, seen: u64, cur: u32, tag: u32, at: u32, st: ObjSt, ws: u8 },
}

/// The incremental matcher of one value: which byte strings may come next. Cloning copies a few
/// small stacks.
#[derive(Debug)]
pub struct Matcher {
    g: Arc<Grammar>,
    /// `threads[..live]` are the live parses; later entries are spare allocations.
    threads: Vec<Vec<Frame>>,
    live: usize,
}

impl Clone for Matcher {
    fn clone(&self) -> Matcher {
        Matcher { g: self.g.clone(), threads: self.threads[..self.live].to_vec(), live: self.live }
    }
}

impl Matcher {
    /// Would appending `bytes` keep the output a valid prefix? (Empty bytes: always.)
    pub fn accepts(&self, bytes: &[u8]) -> bool {
        let mut m = self.clone();
        bytes.iter().all(|&b| m.feed(b))
    }

    /// Appends `bytes` if they keep the output a valid prefix, and says whether they did; on
    /// `false` the matcher is unchanged.
    pub fn advance(&mut self, bytes: &[u8]) -> bool {
        let mut m = self.clone();
        if bytes.iter().all(|&b| m.feed(b)) {
            *self = m;
            true
        } else {
            false
        }
    }

    /// Is the output a whole value? Then generation may end (only whitespace may follow).
    pub fn is_complete(&self) -> bool {
        self.threads[..self.live].iter().any(|t| thread_complete(&self.g, t))
    }

    /// The shortest bytes (as far as cheaply known) that complete the value; empty when it is
    /// complete. Appending them always makes the matcher complete: no accepted prefix is a
    /// dead end.
    pub fn shortest_completion(&self) -> Vec<u8> {
        self.threads[..self.live].iter().map(|t| completion(&self.g, t)).min_by_key(Vec::len).unwrap_or_default()
    }

    /// Copies `other`'s state into `self`, reusing `self`'s allocations.
    fn copy_from(&mut self, other: &Matcher) {
        for i in 0..other.live {
            match self.threads.get_mut(i) {
                Some(t) => t.clone_from(&other.threads[i]),
                None => self.threads.push(other.threads[i].clone()),
            }
        }
        self.live = other.live;
    }

    /// Feeds one byte to every thread; false (and no live thread) if none takes it.
    fn feed(&mut self, b: u8) -> bool {
        let g = &*self.g;
        let n = self.live;
        let mut extra: Vec<Vec<Frame>> = Vec::new();
        let mut live = 0;
        for i in 0..n {
            if step(g, &mut self.threads[i], b, &mut extra) {
                self.threads.swap(live, i);
                live += 1;
            }
        }
        for t in extra {
            if live < self.threads.len() {
                self.threads[live] = t;
            } else {
                self.threads.push(t);
            }
            live += 1;
        }
        if live > 1 {
            // Drop duplicate parses, then keep at most MAX_THREADS.
            let mut k = 1;
            for i in 1..live {
                if !self.threads[..k].contains(&self.threads[i]) {
                    self.threads.swap(k, i);
                    k += 1;
                }
            }
            live = k.min(MAX_THREADS);
        }
        self.live = live;
        live > 0
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

enum Outcome {
    Consumed,
    /// The frame's value ended with this byte (the literal's index, for literal sets).
    Done(u32),
    /// The frame's value had ended before this byte, which belongs to the parent.
    EndRefeed(u32),
    Reject,
    /// A container begins a value of this node with this byte.
    Start(u32),
    /// A free-form object begins a key with this byte.
    StartKey,
}

/// Feeds `b` to one thread; false if it dies. Forks go to `extra`.
fn step(g: &Grammar, stack: &mut Vec<Frame>, b: u8, extra: &mut Vec<Vec<Frame>>) -> bool {
    loop {
        let Some(top) = stack.last_mut() else { return false };
        let outcome = frame_step(g, top, b);
        match outcome {
            Outcome::Consumed => return true,
            Outcome::Reject => return false,
            Outcome::Done(lit) => {
                stack.pop();
                notify(g, stack, lit);
                return true;
            }
            Outcome::EndRefeed(lit) => {
                stack.pop();
                notify(g, stack, lit);
            }
            Outcome::StartKey => stack.push(Frame::Str { node: ANY_STRING, count: 0, st: StrSt::Open }),
            Outcome::Start(node) => {
                let tag = match stack.last() {
                    Some(Frame::Obj { tag, .. }) => *tag,
                    _ => NONE,
                };
                let mut first = None;
                let mut more = Vec::new();
                expand(g, node, b, tag, stack.len(), &mut |f| {
                    if first.is_none() {
                        first = Some(f);
                    } else {
                        more.push(f);
                    }
                });
                for f in more {
                    let mut fork = stack.clone();
                    fork.push(f);
                    if step(g, &mut fork, b, extra) {
                        extra.push(fork);
                    }
                }
                match first {
                    Some(f) => stack.push(f),
                    None => return false,
                }
            }
        }
    }
}

/// Feeds `b` to one frame alone.
fn frame_step(g: &Grammar, frame: &mut Frame, b: u8) -> Outcome {
    match frame {
        Frame::Str { node, count, st } => str_step(g, *node, count, st, b),
        Frame::Num { integer, st, digits } => num_step(*integer, st, digits, b),
        Frame::Lit { trie, at } => lit_step(&g.tries[*trie as usize], at, b),
        Frame::Root { st, ws } => root_step(g, st, ws, b),
        Frame::Arr { node, count, st, ws } => arr_step(g, *node, *count, st, ws, b),
        Frame::Obj { obj, seen, cur, tag, at, st, ws } => obj_step(g, *obj, *seen, cur, *tag, at, st, ws, b),
    }
}

/// The frames that can begin a value of `node` with byte `b`.
fn expand(g: &Grammar, node: u32, b: u8, tag: u32, depth: usize, out: &mut impl FnMut(Frame)) {
    match &g.nodes[node as usize] {
        Node::Any => {
            for n in [ANY_STRING, ANY_NUMBER, ANY_SCALAR] {
                expand(g, n, b, tag, depth, out);
            }
            if depth < MAX_ANY_DEPTH {
                expand(g, ANY_ARRAY, b, tag, depth, out);
                expand(g, ANY_OBJECT, b, tag, depth, out);
            }
        }
        Node::AnyOf(alts) => {
            for &a in alts {
                expand(g, a, b, tag, depth, out);
            }
        }
        Node::Switch(cases) => {
            if let Some(&case) = cases.get(tag as usize) {
                expand(g, case, b, tag, depth, out);
            }
        }
        Node::Str { .. } if b == b'"' => out(Frame::Str { node, count: 0, st: StrSt::Open }),
        Node::Num { integer } if b == b'-' || b.is_ascii_digit() => {
            out(Frame::Num { integer: *integer, st: NumSt::Start, digits: 0 })
        }
        Node::Lit { trie } if g.tries[*trie as usize].child(0, b).is_some() => out(Frame::Lit { trie: *trie, at: 0 }),
        Node::Arr { .. } if b == b'[' => out(Frame::Arr { node, count: 0, st: ArrSt::Start, ws: 0 }),
        Node::Obj { obj } if b == b'{' => {
            out(Frame::Obj { obj: *obj, seen: 0, cur: NONE, tag: NONE, at: 0, st: ObjSt::Start, ws: 0 })
        }
        _ => {}
    }
}

/// A child value ended: its parent moves on.
fn notify(g: &Grammar, stack: &mut [Frame], lit: u32) {
    match stack.last_mut() {
        Some(Frame::Root { st, ws }) => {
            *st = RootSt::After;
            *ws = 0;
        }
        Some(Frame::Arr { count, st, ws, .. }) => {
            *count = count.saturating_add(1);
            *st = ArrSt::AfterValue;
            *ws = 0;
        }
        Some(Frame::Obj { obj, seen, cur, tag, st, ws, .. }) => {
            if *st == ObjSt::InValue {
                *seen |= bit(*cur as usize);
                if g.objs[*obj as usize].props.get(*cur as usize).is_some_and(|p| p.tag) {
                    *tag = lit;
                }
                *st = ObjSt::AfterValue;
            } else {
                *st = ObjSt::AfterKey;
            }
            *ws = 0;
        }
        _ => {}
    }
}

fn take_ws(ws: &mut u8) -> Outcome {
    if *ws < MAX_WHITESPACE {
        *ws += 1;
        Outcome::Consumed
    } else {
        Outcome::Reject
    }
}

fn root_step(g: &Grammar, st: &mut RootSt, ws: &mut u8, b: u8) -> Outcome {
    match *st {
        _ if is_ws(b) && *st != RootSt::InValue => take_ws(ws),
        RootSt::Before => {
            *st = RootSt::InValue;
            Outcome::Start(g.root)
        }
        _ => Outcome::Reject,
    }
}

fn arr_step(g: &Grammar, node: u32, count: u32, st: &mut ArrSt, ws: &mut u8, b: u8) -> Outcome {
    let Node::Arr { items, min, max } = g.nodes[node as usize] else { return Outcome::Reject };
    if is_ws(b) && matches!(*st, ArrSt::Open | ArrSt::AfterValue | ArrSt::AfterComma) {
        return take_ws(ws);
    }
    *ws = 0;
    match (*st, b) {
        (ArrSt::Start, b'[') => {
            *st = ArrSt::Open;
            Outcome::Consumed
        }
        (ArrSt::Open, b']') if min == 0 => Outcome::Done(NONE),
        (ArrSt::Open, _) if max > 0 => {
            *st = ArrSt::InValue;
            Outcome::Start(items)
        }
        (ArrSt::AfterComma, _) => {
            *st = ArrSt::InValue;
            Outcome::Start(items)
        }
        (ArrSt::AfterValue, b',') if count < max => {
            *st = ArrSt::AfterComma;
            Outcome::Consumed
        }
        (ArrSt::AfterValue, b']') if count >= min => Outcome::Done(NONE),
        _ => Outcome::Reject,
    }
}

#[allow(clippy::too_many_arguments)]
fn obj_step(
    g: &Grammar,
    obj: u32,
    seen: u64,
    cur: &mut u32,
    tag: u32,
    at: &mut u32,
    st: &mut ObjSt,
    ws: &mut u8,
    b: u8,
) -> Outcome {
    let o = &g.objs[obj as usize];
    if is_ws(b)
        && matches!(*st, ObjSt::Open | ObjSt::AfterKey | ObjSt::AfterColon | ObjSt::AfterValue | ObjSt::AfterComma)
    {
        return take_ws(ws);
    }
    *ws = 0;
    let allowed = o.allowed(seen, tag);
    match (*st, b) {
        (ObjSt::Start, b'{') => {
            *st = ObjSt::Open;
            Outcome::Consumed
        }
        (ObjSt::Open | ObjSt::AfterValue, b'}') if o.required & !seen == 0 => Outcome::Done(NONE),
        (ObjSt::Open | ObjSt::AfterComma, b'"') if o.free.is_some() => {
            *st = ObjSt::InFreeKey;
            Outcome::StartKey
        }
        (ObjSt::Open | ObjSt::AfterComma | ObjSt::InKey, _) => {
            if *st != ObjSt::InKey {
                *st = ObjSt::InKey;
                *at = 0;
            }
            let trie = &g.tries[o.keys as usize];
            match trie.child(*at, b) {
                Some(next) if trie.nodes[next as usize].mask & allowed != 0 => {
                    *at = next;
                    let terminal = trie.nodes[next as usize].terminal;
                    if terminal != NONE {
                        *cur = terminal;
                        *st = ObjSt::AfterKey;
                    }
                    Outcome::Consumed
                }
                _ => Outcome::Reject,
            }
        }
        (ObjSt::AfterValue, b',') if o.free.is_some() || allowed != 0 => {
            *st = ObjSt::AfterComma;
            Outcome::Consumed
        }
        (ObjSt::AfterKey, b':') => {
            *st = ObjSt::AfterColon;
            Outcome::Consumed
        }
        (ObjSt::AfterColon, _) => {
            *st = ObjSt::InValue;
            match o.free {
                Some(free) => Outcome::Start(free),
                None => o.props.get(*cur as usize).map_or(Outcome::Reject, |p| Outcome::Start(p.node)),
            }
        }
        _ => Outcome::Reject,
    }
}

fn lit_step(trie: &Trie, at: &mut u32, b: u8) -> Outcome {
    match trie.child(*at, b) {
        Some(next) => {
            let node = &trie.nodes[next as usize];
            if node.terminal != NONE && node.children.is_empty() {
                Outcome::Done(node.terminal)
            } else {
                *at = next;
                Outcome::Consumed
            }
        }
        None => match trie.nodes[*at as usize].terminal {
            NONE => Outcome::Reject,
            terminal => Outcome::EndRefeed(terminal),
        },
    }
}

fn num_can_end(st: NumSt) -> bool {
    matches!(st, NumSt::Zero | NumSt::Int | NumSt::Frac | NumSt::ExpDigits)
}

fn num_step(integer: bool, st: &mut NumSt, digits: &mut u8, b: u8) -> Outcome {
    let digit = b.is_ascii_digit();
    let next = match (*st, b) {
        (NumSt::Start, b'-') => Some((NumSt::Minus, 0)),
        // `-0` parses as a float (serde_json reads it as -0.0): not an integer.
        (NumSt::Start, b'0') => Some((NumSt::Zero, 1)),
        (NumSt::Minus, b'0') if !integer => Some((NumSt::Zero, 1)),
        (NumSt::Start | NumSt::Minus, b'1'..=b'9') => Some((NumSt::Int, 1)),
        (NumSt::Int, _) if digit && *digits < MAX_INT_DIGITS => Some((NumSt::Int, *digits + 1)),
        (NumSt::Zero | NumSt::Int, b'.') if !integer => Some((NumSt::Dot, 0)),
        (NumSt::Zero | NumSt::Int | NumSt::Frac, b'e' | b'E') if !integer => Some((NumSt::Exp, 0)),
        (NumSt::Dot, _) if digit => Some((NumSt::Frac, 1)),
        (NumSt::Frac, _) if digit && *digits < MAX_FRAC_DIGITS => Some((NumSt::Frac, *digits + 1)),
        (NumSt::Exp, b'+' | b'-') => Some((NumSt::ExpSign, 0)),
        (NumSt::Exp | NumSt::ExpSign, _) if digit => Some((NumSt::ExpDigits, 1)),
        (NumSt::ExpDigits, _) if digit && *digits < MAX_EXP_DIGITS => Some((NumSt::ExpDigits, *digits + 1)),
        _ => None,
    };
    match next {
        Some((s, d)) => {
            *st = s;
            *digits = d;
            Outcome::Consumed
        }
        None if num_can_end(*st) => Outcome::EndRefeed(NONE),
        None => Outcome::Reject,
    }
}

fn str_step(g: &Grammar, node: u32, count: &mut u32, st: &mut StrSt, b: u8) -> Outcome {
    let (min, max) = match g.nodes[node as usize] {
        Node::Str { min, max } => (min, max),
        _ => (0, u32::MAX),
    };
    let hex = b.is_ascii_hexdigit();
    match *st {
        StrSt::Open if b == b'"' => *st = StrSt::Body,
        StrSt::Open => return Outcome::Reject,
        StrSt::Body => {
            if b == b'"' {
                return if *count >= min { Outcome::Done(NONE) } else { Outcome::Reject };
            }
            if *count >= max {
                return Outcome::Reject;
            }
            let next = match b {
                b'\\' => StrSt::Esc,
                0x00..=0x1f => return Outcome::Reject,
                0x20..=0x7f => StrSt::Body,
                0xc2..=0xdf => StrSt::Utf8 { rem: 1, lo: 0x80, hi: 0xbf },
                0xe0 => StrSt::Utf8 { rem: 2, lo: 0xa0, hi: 0xbf },
                0xed => StrSt::Utf8 { rem: 2, lo: 0x80, hi: 0x9f },
                0xe1..=0xef => StrSt::Utf8 { rem: 2, lo: 0x80, hi: 0xbf },
                0xf0 => StrSt::Utf8 { rem: 3, lo: 0x90, hi: 0xbf },
                0xf1..=0xf3 => StrSt::Utf8 { rem: 3, lo: 0x80, hi: 0xbf },
                0xf4 => StrSt::Utf8 { rem: 3, lo: 0x80, hi: 0x8f },
                _ => return Outcome::Reject,
            };
            *count += 1;
            *st = next;
        }
        StrSt::Utf8 { rem, lo, hi } => {
            if b < lo || b > hi {
                return Outcome::Reject;
            }
            *st = if rem == 1 { StrSt::Body } else { StrSt::Utf8 { rem: rem - 1, lo: 0x80, hi: 0xbf } };
        }
        StrSt::Esc => match b {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => *st = StrSt::Body,
            b'u' => *st = StrSt::Hex { n: 0, flags: 0 },
            _ => return Outcome::Reject,
        },
        StrSt::LowBackslash if b == b'\\' => *st = StrSt::LowU,
        StrSt::LowU if b == b'u' => *st = StrSt::Hex { n: 0, flags: HEX_LOW },
        StrSt::LowBackslash | StrSt::LowU => return Outcome::Reject,
        StrSt::Hex { n, mut flags } => {
            if !hex {
                return Outcome::Reject;
            }
            let d = b.to_ascii_lowercase();
            if flags & HEX_LOW != 0 {
                // The low half of a surrogate pair: DC00..DFFF.
                if (n == 0 && d != b'd') || (n == 1 && !matches!(d, b'c'..=b'f')) {
                    return Outcome::Reject;
                }
            } else if n == 0 && d == b'd' {
                flags |= HEX_FIRST_D;
            } else if n == 1 && flags & HEX_FIRST_D != 0 {
                match d {
                    b'8'..=b'b' => flags |= HEX_HIGH,
                    b'c'..=b'f' => return Outcome::Reject, // a lone low surrogate
                    _ => {}
                }
            }
            *st = if n < 3 {
                StrSt::Hex { n: n + 1, flags }
            } else if flags & HEX_HIGH != 0 {
                StrSt::LowBackslash
            } else {
                StrSt::Body
            };
        }
    }
    Outcome::Consumed
}

fn thread_complete(g: &Grammar, t: &[Frame]) -> bool {
    match t {
        [Frame::Root { st: RootSt::After, .. }] => true,
        [Frame::Root { st: RootSt::InValue, .. }, top] => match top {
            Frame::Num { st, .. } => num_can_end(*st),
            Frame::Lit { trie, at } => g.tries[*trie as usize].nodes[*at as usize].terminal != NONE,
            _ => false,
        },
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Completion

/// The bytes that complete one thread (each frame closed, top first, with the least it needs).
fn completion(g: &Grammar, stack: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut lit = NONE;
    for frame in stack.iter().rev() {
        lit = complete_frame(g, frame, lit, &mut out);
    }
    out
}

/// Appends what closes `frame` (its child, if any, already closed with literal `child_lit`);
/// returns the index of the literal it completed, for its parent.
fn complete_frame(g: &Grammar, frame: &Frame, child_lit: u32, out: &mut Vec<u8>) -> u32 {
    match *frame {
        Frame::Root { st: RootSt::Before, .. } => out.extend_from_slice(&g.min[g.root as usize]),
        Frame::Root { .. } => {}
        Frame::Num { st, .. } => match st {
            NumSt::Start | NumSt::Minus => out.push(b'1'),
            _ if !num_can_end(st) => out.push(b'0'),
            _ => {}
        },
        Frame::Lit { trie, at } => {
            let t = &g.tries[trie as usize];
            let node = &t.nodes[at as usize];
            let lit = node.shortest;
            if let Some(l) = t.literals.get(lit as usize) {
                out.extend_from_slice(&l[node.depth as usize..]);
            }
            return lit;
        }
        Frame::Str { node, count, st } => {
            let min = match g.nodes[node as usize] {
                Node::Str { min, .. } => min,
                _ => 0,
            };
            match st {
                StrSt::Open => out.push(b'"'),
                StrSt::Body => {}
                StrSt::Esc => out.push(b'n'),
                StrSt::Hex { n, flags } => {
                    for i in n..4 {
                        out.push(match i {
                            0 if flags & HEX_LOW != 0 => b'd',
                            1 if flags & HEX_LOW != 0 => b'c',
                            _ => b'0',
                        });
                    }
                    if flags & HEX_HIGH != 0 {
                        out.extend_from_slice(b"\\udc00");
                    }
                }
                StrSt::LowBackslash => out.extend_from_slice(b"\\udc00"),
                StrSt::LowU => out.extend_from_slice(b"udc00"),
                StrSt::Utf8 { rem, lo, .. } => {
                    out.push(lo);
                    out.extend(std::iter::repeat_n(0x80, rem as usize - 1));
                }
            }
            out.extend(std::iter::repeat_n(b'a', min.saturating_sub(count) as usize));
            out.push(b'"');
        }
        Frame::Arr { node, count, st, .. } => {
            let Node::Arr { items, min, .. } = g.nodes[node as usize] else { return NONE };
            let item = &g.min[items as usize];
            let mut count = count;
            match st {
                ArrSt::Start | ArrSt::Open => {
                    if st == ArrSt::Start {
                        out.push(b'[');
                    }
                    if min == 0 {
                        out.push(b']');
                        return NONE;
                    }
                    out.extend_from_slice(item);
                    count = 1;
                }
                ArrSt::InValue => count += 1,
                ArrSt::AfterValue => {}
                ArrSt::AfterComma => {
                    out.extend_from_slice(item);
                    count += 1;
                }
            }
            while count < min {
                out.push(b',');
                out.extend_from_slice(item);
                count += 1;
            }
            out.push(b']');
        }
        Frame::Obj { obj, seen, cur, tag, at, st, .. } => {
            if st == ObjSt::Start {
                out.push(b'{');
            }
            complete_object(g, obj, st, seen, cur, tag, at, child_lit, out);
        }
    }
    NONE
}

/// The shortest value of a property (with the literal it is, for a tag).
fn prop_value<'g>(g: &'g Grammar, o: &ObjNode, j: usize, tag: u32) -> (&'g [u8], u32) {
    let p = &o.props[j];
    match &g.nodes[p.node as usize] {
        Node::Switch(cases) => match cases.get(tag as usize) {
            Some(&case) => (&g.min[case as usize], NONE),
            None => (&g.min[p.node as usize], NONE),
        },
        Node::Lit { trie } if p.tag => (&g.min[p.node as usize], g.tries[*trie as usize].nodes[0].shortest),
        _ => (&g.min[p.node as usize], NONE),
    }
}

#[allow(clippy::too_many_arguments)]
fn complete_object(
    g: &Grammar,
    obj: u32,
    st: ObjSt,
    mut seen: u64,
    cur: u32,
    mut tag: u32,
    at: u32,
    child_lit: u32,
    out: &mut Vec<u8>,
) {
    let o = &g.objs[obj as usize];
    let trie = &g.tries[o.keys as usize];
    let mut has_member = true;
    // Writes property j's value and records it.
    let value = |j: usize, seen: &mut u64, tag: &mut u32, out: &mut Vec<u8>| {
        let (bytes, lit) = prop_value(g, o, j, *tag);
        out.extend_from_slice(bytes);
        *seen |= bit(j);
        if o.props[j].tag {
            *tag = lit;
        }
    };
    let free_value = |out: &mut Vec<u8>| {
        if let Some(free) = o.free {
            out.extend_from_slice(&g.min[free as usize]);
        }
    };
    match st {
        ObjSt::Start | ObjSt::Open => has_member = false,
        ObjSt::InKey | ObjSt::AfterComma => {
            if o.free.is_some() {
                out.extend_from_slice(b"\"\":");
                free_value(out);
            } else {
                let at = if st == ObjSt::InKey { at } else { 0 };
                let node = &trie.nodes[at as usize];
                let allowed = node.mask & o.allowed(seen, tag);
                // Prefer a required property (it has to be written anyway), then the shortest.
                let pick = (0..o.props.len()).filter(|&j| allowed & bit(j) != 0).min_by_key(|&j| {
                    (o.required & bit(j) == 0, o.props[j].key.len() + prop_value(g, o, j, tag).0.len())
                });
                if let Some(j) = pick {
                    out.extend_from_slice(&o.props[j].key[node.depth as usize..]);
                    out.push(b':');
                    value(j, &mut seen, &mut tag, out);
                }
            }
        }
        ObjSt::InFreeKey => {
            out.push(b':');
            free_value(out);
        }
        ObjSt::AfterKey | ObjSt::AfterColon => {
            if st == ObjSt::AfterKey {
                out.push(b':');
            }
            if o.free.is_some() {
                free_value(out);
            } else if (cur as usize) < o.props.len() {
                value(cur as usize, &mut seen, &mut tag, out);
            }
        }
        ObjSt::InValue => {
            if let Some(p) = o.props.get(cur as usize) {
                seen |= bit(cur as usize);
                if p.tag {
                    tag = child_lit;
                }
            }
        }
        ObjSt::AfterValue => {}
    }
    for j in 0..o.props.len() {
        if o.required & bit(j) != 0 && seen & bit(j) == 0 {
            if has_member {
                out.push(b',');
            }
            out.extend_from_slice(&o.props[j].key);
            out.push(b':');
            value(j, &mut seen, &mut tag, out);
            has_member = true;
        }
    }
    out.push(b'}');
}

// ---------------------------------------------------------------------------------------------
// Sampling

/// Checks many candidate tokens against one matcher state, cheaply: rejects by first byte from a
/// lazily filled table, and reuses one scratch matcher (no allocation per token after the
/// first). An empty token stands for end of generation: accepted only when the value is complete.
#[derive(Debug)]
pub struct TokenChecker<'m> {
    base: &'m Matcher,
    scratch: Matcher,
    /// Per first byte: 0 unknown, 1 accepted, 2 rejected.
    first: [u8; 256],
    /// Per first byte, once needed: the state after it.
    after: Vec<Option<Matcher>>,
    complete: bool,
}

impl<'m> TokenChecker<'m> {
    pub fn new(matcher: &'m Matcher) -> TokenChecker<'m> {
        TokenChecker {
            base: matcher,
            scratch: matcher.clone(),
            first: [0; 256],
            after: Vec::new(),
            complete: matcher.is_complete(),
        }
    }

    /// Would the matcher accept this token's bytes?
    pub fn accepts(&mut self, bytes: &[u8]) -> bool {
        let Some((&b0, rest)) = bytes.split_first() else { return self.complete };
        match self.first[b0 as usize] {
            2 => return false,
            1 if rest.is_empty() => return true,
            _ => {}
        }
        // Fast path: with one thread, a token that stays inside the top frame (text of a string,
        // digits, a literal, whitespace or punctuation of a container) needs only that frame;
        // a rejection there is final (strings and containers never end implicitly; numbers and
        // literals end instead of rejecting when they can).
        if self.base.live == 1
            && let Some(&top) = self.base.threads[0].last()
        {
            let mut frame = top;
            let mut inside = true;
            for (i, &b) in bytes.iter().enumerate() {
                match frame_step(&self.base.g, &mut frame, b) {
                    Outcome::Consumed => {
                        if i == 0 {
                            self.first[b0 as usize] = 1;
                        }
                    }
                    Outcome::Reject => {
                        if i == 0 {
                            self.first[b0 as usize] = 2;
                        }
                        return false;
                    }
                    _ => {
                        inside = false;
                        break;
                    }
                }
            }
            if inside {
                return true;
            }
        }
        // The state after the first byte is computed once per first byte.
        if self.after.is_empty() {
            self.after.resize_with(256, || None);
        }
        match &self.after[b0 as usize] {
            Some(after) => self.scratch.copy_from(after),
            None => {
                self.scratch.copy_from(self.base);
                let ok = self.scratch.feed(b0);
                self.first[b0 as usize] = if ok { 1 } else { 2 };
                if !ok {
                    return false;
                }
                self.after[b0 as usize] = Some(self.scratch.clone());
            }
        }
        rest.iter().all(|&b| self.scratch.feed(b))
    }
}

/// The first candidate (best first) whose bytes the matcher accepts. A candidate with empty bytes
/// is an end-of-generation token, accepted only when the value is complete; an engine maps its
/// EOS/EOT tokens to empty bytes and leaves other special tokens out. `None` only if no candidate
/// fits (a full vocabulary always has one: the grammar has no dead ends).
///
/// The bytes of a token are those it adds to the decoded text (a byte-fallback token `<0xC3>` is
/// that one byte, SentencePiece's `▁` a space).
///
/// Cost: see the module documentation; at most about a millisecond for a whole 49k-token
/// vocabulary (release build), usually a few candidates when the model's best tokens fit.
pub fn pick<'a>(matcher: &Matcher, candidates: impl IntoIterator<Item = (u32, &'a [u8])>) -> Option<u32> {
    let mut checker = TokenChecker::new(matcher);
    candidates.into_iter().find(|(_, bytes)| checker.accepts(bytes)).map(|(id, _)| id)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use serde_json::json;

    fn grammar(schema: Value) -> JsonGrammar {
        JsonGrammar::from_schema(&schema).unwrap()
    }

    fn full(g: &JsonGrammar, text: &str) -> bool {
        let mut m = g.start();
        m.advance(text.as_bytes()) && m.is_complete()
    }

    fn prefix(g: &JsonGrammar, text: &str) -> bool {
        g.start().accepts(text.as_bytes())
    }

    #[test]
    fn strings_escapes_and_utf8() {
        let g = grammar(json!({"type": "string"}));
        assert!(full(&g, r#""hello""#));
        assert!(full(&g, r#""a\"b\\c\/d\n\t\u00e9\uD83D\uDE00""#));
        assert!(full(&g, "\"é€😀\""));
        assert!(!prefix(&g, r#""\x"#));
        assert!(!prefix(&g, r#""\u00g"#));
        assert!(!prefix(&g, r#""\uDE00"#), "a lone low surrogate");
        assert!(!prefix(&g, r#""\uD83D""#), "a high surrogate without its pair");
        assert!(!prefix(&g, r#""\uD83D\u0041"#));
        assert!(!prefix(&g, "\"a\nb"), "raw control character");
        assert!(!g.start().accepts(b"\"\xc3\x28"), "bad continuation byte");
        assert!(!g.start().accepts(b"\"\xc0\x80"), "overlong");
        assert!(!g.start().accepts(b"\"\xed\xa0\x80"), "encoded surrogate");
        assert!(!g.start().accepts(b"\"\xf4\x90\x80\x80"), "above U+10FFFF");
        // A character split across tokens.
        let mut m = g.start();
        assert!(m.advance(b"\"\xc3"));
        assert!(!m.is_complete());
        assert!(m.advance(b"\xa9\""));
        assert!(m.is_complete());
        assert!(!prefix(&g, "\"a\" x"));
        assert!(!prefix(&g, "1"));
    }

    #[test]
    fn string_lengths_count_characters() {
        let g = grammar(json!({"type": "string", "minLength": 2, "maxLength": 3}));
        assert!(!full(&g, r#""a""#));
        assert!(full(&g, r#""ab""#));
        assert!(full(&g, r#""é\n😀""#));
        assert!(full(&g, r#""a\uD83D\uDE00b""#), "a surrogate pair is one character");
        assert!(!prefix(&g, r#""abcd"#));
        assert!(!prefix(&g, r#""ab\n\"#));
    }

    #[test]
    fn numbers_and_integers() {
        let g = grammar(json!({"type": "number"}));
        for ok in ["0", "-0", "-0.5", "12", "-3.25", "1e5", "1E-2", "0.5e+10"] {
            assert!(full(&g, ok), "{ok}");
        }
        for bad in ["01", "-", "1.", ".5", "1e", "+1", "1.2.3", "--1"] {
            assert!(!full(&g, bad), "{bad}");
        }
        assert!(!prefix(&g, "1234567890123456"), "bounded digits");
        assert!(!prefix(&g, "1e123"), "bounded exponent");
        let g = grammar(json!({"type": "integer"}));
        assert!(full(&g, "-42") && full(&g, "0"));
        assert!(!prefix(&g, "-0"), "-0 parses as a float");
        assert!(!prefix(&g, "4.2"));
        assert!(!prefix(&g, "4e2"));
    }

    #[test]
    fn literals_bool_null_enum_const() {
        let g = grammar(json!({"type": "boolean"}));
        assert!(full(&g, "true") && full(&g, "false"));
        assert!(!prefix(&g, "tru3") && !prefix(&g, "null"));
        let g = grammar(json!({"type": "null"}));
        assert!(full(&g, "null"));
        let g = grammar(json!({"enum": ["read", "readme", 1, 12, null, {"a": [1]}]}));
        for ok in [r#""read""#, r#""readme""#, "1", "12", "null", r#"{"a":[1]}"#] {
            assert!(full(&g, ok), "{ok}");
        }
        assert!(!prefix(&g, r#""reae"#));
        assert!(!prefix(&g, "13"));
        let mut m = g.start();
        assert!(m.advance(b"1"));
        assert!(m.is_complete(), "1 is a value and 12 could follow");
        assert!(m.accepts(b"2"));
        let g = grammar(json!({"const": "x"}));
        assert!(full(&g, r#""x""#) && !prefix(&g, r#""y"#));
        // Enum values are filtered by type.
        let g = grammar(json!({"type": "string", "enum": ["a", 1]}));
        assert!(!prefix(&g, "1"));
        assert_eq!(
            JsonGrammar::from_schema(&json!({"type": "string", "enum": [1]})).err(),
            Some(GrammarError::Unsatisfiable)
        );
    }

    #[test]
    fn objects_required_optional_any_order() {
        let g = grammar(json!({
            "type": "object",
            "properties": {"path": {"type": "string"}, "limit": {"type": "integer"}, "all": {"type": "boolean"}},
            "required": ["path"],
            "additionalProperties": false
        }));
        assert!(full(&g, r#"{"path":"a"}"#));
        assert!(full(&g, r#"{ "limit": 3, "path" : "a", "all": true }"#));
        assert!(!full(&g, r#"{"limit":3}"#), "required missing");
        assert!(!prefix(&g, r#"{"limit":3}"#));
        assert!(!prefix(&g, r#"{"other""#), "unknown key");
        assert!(!prefix(&g, r#"{"path":"a","path""#), "duplicate key");
        assert!(!prefix(&g, r#"{"path":1"#), "wrong type");
        assert!(!prefix(&g, r#"{"path":"a",}"#), "trailing comma");
        assert!(!prefix(&g, r#"{"path":"a"}}"#));
        let g = grammar(
            json!({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "null"}}, "required": ["b"]}}}),
        );
        assert!(full(&g, r#"{}"#));
        assert!(full(&g, r#"{"a":{"b":null}}"#));
        assert!(!prefix(&g, r#"{"a":{}"#));
    }

    #[test]
    fn free_form_objects_and_any_values() {
        let g = grammar(json!({"type": "object"}));
        assert!(full(&g, r#"{"x": [1, {"y": null}], "z": "é"}"#));
        let g = grammar(json!({"type": "object", "additionalProperties": {"type": "integer"}}));
        assert!(full(&g, r#"{"x": 1, "y": 2}"#));
        assert!(!prefix(&g, r#"{"x": "1""#));
        let g = grammar(json!({"type": "object", "additionalProperties": false}));
        assert!(full(&g, "{}") && !prefix(&g, "{\""));
        for schema in [json!({}), json!(true), json!({"description": "anything"})] {
            let g = grammar(schema);
            assert!(full(&g, r#"[1, "a", {"b": [true, false, null]}, -2.5e3]"#));
        }
        assert_eq!(JsonGrammar::from_schema(&json!(false)).err(), Some(GrammarError::Unsatisfiable));
    }

    #[test]
    fn any_value_nesting_is_bounded() {
        let g = grammar(json!({}));
        let mut m = g.start();
        let mut depth = 0;
        while m.advance(b"[") {
            depth += 1;
            assert!(depth < 100);
        }
        assert!(depth >= 8, "{depth}");
        assert!(m.advance(b"1"));
        let rest = m.shortest_completion();
        assert!(m.advance(&rest) && m.is_complete());
    }

    #[test]
    fn arrays_items_and_bounds() {
        let g = grammar(json!({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}));
        assert!(!full(&g, "[]"));
        assert!(full(&g, "[1]") && full(&g, "[ 1 , 2 ]"));
        assert!(!prefix(&g, "[1,2,"));
        assert!(!prefix(&g, "[\"a\""));
        let g = grammar(json!({"type": "array", "items": false}));
        assert!(full(&g, "[]") && !prefix(&g, "[1"));
        assert!(JsonGrammar::from_schema(&json!({"type": "array", "minItems": 3, "maxItems": 2})).is_err());
    }

    #[test]
    fn type_arrays_any_of_one_of_all_of() {
        let g = grammar(json!({"type": ["string", "null"]}));
        assert!(full(&g, "null") && full(&g, r#""a""#) && !prefix(&g, "1"));
        let g = grammar(json!({"type": "string", "nullable": true}));
        assert!(full(&g, "null"));
        let g = grammar(json!({"anyOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": false},
            {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "null"}}, "required": ["a", "b"], "additionalProperties": false}
        ]}));
        assert!(full(&g, r#"{"a":1}"#));
        assert!(full(&g, r#"{"a":"x","b":null}"#));
        assert!(!prefix(&g, r#"{"a":1,"b""#));
        assert!(!full(&g, r#"{"a":"x"}"#));
        let g = grammar(json!({"oneOf": [{"type": "integer"}, {"type": "boolean"}]}));
        assert!(full(&g, "3") && full(&g, "true") && !prefix(&g, "\""));
        // Sibling keywords merged into each branch.
        let g = grammar(json!({
            "type": "object", "properties": {"op": {"type": "string"}}, "required": ["op"], "additionalProperties": false,
            "anyOf": [{"properties": {"x": {"type": "integer"}}, "required": ["x"]}, {"properties": {"y": {"type": "null"}}, "required": ["y"]}]
        }));
        assert!(full(&g, r#"{"op":"a","x":1}"#) && full(&g, r#"{"y":null,"op":"a"}"#));
        assert!(!full(&g, r#"{"op":"a"}"#));
        let g = grammar(json!({"allOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"properties": {"b": {"type": "integer"}}, "required": ["b"]}
        ]}));
        assert!(full(&g, r#"{"b":1,"a":2}"#) && !full(&g, r#"{"a":2}"#));
        // Unsatisfiable branches are pruned.
        let g = grammar(json!({"anyOf": [{"type": "string", "enum": []}, {"type": "integer"}]}));
        assert!(!prefix(&g, "\"") && full(&g, "1"));
    }

    #[test]
    fn refs_and_recursion() {
        let g = grammar(json!({
            "$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}, "next": {"$ref": "#/$defs/node"}}, "required": ["v"], "additionalProperties": false}},
            "$ref": "#/$defs/node"
        }));
        assert!(full(&g, r#"{"v":1,"next":{"v":2}}"#));
        assert!(!prefix(&g, r#"{"v":1,"next":{"v":2,"next":{"v":3,"next":{"v":4,"next":{"v":5,"next""#));
        let g = grammar(json!({"$ref": "#/nowhere"}));
        assert!(full(&g, "[1]"));
    }

    #[test]
    fn whitespace_is_bounded() {
        let g = grammar(json!({"type": "array"}));
        let ws = " ".repeat(MAX_WHITESPACE as usize);
        assert!(full(&g, &format!("{ws}[{ws}1{ws},{ws}2{ws}]{ws}")));
        assert!(!prefix(&g, &format!("[{ws} ")));
        let mut m = g.start();
        assert!(m.advance(b"[]"));
        assert!(m.is_complete() && m.accepts(b"\n") && !m.accepts(b"x"));
    }

    #[test]
    fn tool_calls() {
        let tools = vec![
            ToolSpec {
                name: "read".into(),
                description: String::new(),
                input_schema: json!({"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}),
            },
            ToolSpec {
                name: "read_all".into(),
                description: String::new(),
                input_schema: json!({"type": "object", "properties": {"n": {"type": "integer"}}}),
            },
            ToolSpec { name: "never".into(), description: String::new(), input_schema: json!(false) },
        ];
        let g = JsonGrammar::for_tool_call(&tools).unwrap();
        assert!(full(&g, r#"{"name": "read", "arguments": {"path": "x"}}"#));
        assert!(full(&g, r#"{"name":"read_all","arguments":{}}"#));
        assert!(!full(&g, r#"{"name":"read","arguments":{}}"#));
        assert!(!prefix(&g, r#"{"name":"read_all","arguments":{"path""#));
        assert!(!prefix(&g, r#"{"arguments""#), "the name comes first");
        assert!(!prefix(&g, r#"{"name":"never""#));
        assert!(!prefix(&g, r#"{"name":"write""#));
        let mut m = g.start();
        let done = m.shortest_completion();
        assert_eq!(done, br#"{"name":"read","arguments":{"path":""}}"#.to_vec());
        assert!(m.advance(&done) && m.is_complete());
        let g = JsonGrammar::for_tools([("f", &json!({"type": "object"}))], "name", "parameters").unwrap();
        assert!(full(&g, r#"{"name":"f","parameters":{"a":1}}"#));
        assert_eq!(JsonGrammar::for_tool_call(&[]).err(), Some(GrammarError::NoTools));
    }

    #[test]
    fn pick_takes_the_best_accepted_candidate() {
        let g = grammar(json!({"type": "boolean"}));
        let m = g.start();
        let vocab: Vec<(u32, &[u8])> = vec![(0, b"yes"), (1, b""), (2, b"tr"), (3, b"true")];
        assert_eq!(pick(&m, vocab.iter().copied()), Some(2));
        let mut m2 = m.clone();
        assert!(m2.advance(b"true"));
        assert_eq!(pick(&m2, vocab.iter().copied()), Some(1), "end of generation once complete");
        assert_eq!(pick(&m, [(0, &b"no"[..])]), None);
    }

    #[test]
    fn invalid_schemas() {
        assert!(matches!(JsonGrammar::from_schema(&json!({"type": "text"})), Err(GrammarError::InvalidSchema(_))));
        assert!(matches!(JsonGrammar::from_schema(&json!(3)), Err(GrammarError::InvalidSchema(_))));
        assert!(matches!(JsonGrammar::from_schema(&json!({"anyOf": 1})), Err(GrammarError::InvalidSchema(_))));
    }
}
