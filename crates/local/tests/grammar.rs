//! The grammar sampler against random schemas: random walks over a synthetic byte-level
//! vocabulary always end in JSON that parses and satisfies the schema, and never reach a state
//! where no token is accepted before the value is complete (no dead ends).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use descartes_local::grammar::{GrammarError, JsonGrammar, Matcher, TokenChecker, pick};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

// ---------------------------------------------------------------------------------------------
// A validator for the schema subset the generator below produces.

fn valid(schema: &Value, v: &Value) -> bool {
    let map = match schema {
        Value::Bool(b) => return *b,
        Value::Object(map) => map,
        _ => return false,
    };
    if let Some(Value::Array(alts)) = map.get("anyOf")
        && !alts.iter().any(|alt| valid(alt, v))
    {
        return false;
    }
    if let Some(c) = map.get("const")
        && c != v
    {
        return false;
    }
    if let Some(Value::Array(values)) = map.get("enum")
        && !values.contains(v)
    {
        return false;
    }
    match map.get("type") {
        Some(Value::String(t)) if !has_type(v, t) => return false,
        Some(Value::Array(ts)) if !ts.iter().any(|t| has_type(v, t.as_str().unwrap())) => return false,
        _ => {}
    }
    match v {
        Value::String(s) => {
            let n = s.chars().count() as u64;
            let min = map.get("minLength").and_then(Value::as_u64).unwrap_or(0);
            let max = map.get("maxLength").and_then(Value::as_u64).unwrap_or(u64::MAX);
            n >= min && n <= max
        }
        Value::Array(items) => {
            let n = items.len() as u64;
            let min = map.get("minItems").and_then(Value::as_u64).unwrap_or(0);
            let max = map.get("maxItems").and_then(Value::as_u64).unwrap_or(u64::MAX);
            let item_schema = map.get("items").cloned().unwrap_or(Value::Bool(true));
            n >= min && n <= max && items.iter().all(|i| valid(&item_schema, i))
        }
        Value::Object(obj) => {
            let empty = Map::new();
            let props = map.get("properties").and_then(Value::as_object).unwrap_or(&empty);
            let additional = map.get("additionalProperties").cloned().unwrap_or(Value::Bool(true));
            let required_ok = match map.get("required") {
                Some(Value::Array(names)) => names.iter().all(|n| obj.contains_key(n.as_str().unwrap())),
                _ => true,
            };
            required_ok
                && obj.iter().all(|(k, val)| match props.get(k) {
                    Some(s) => valid(s, val),
                    None => valid(&additional, val),
                })
        }
        _ => true,
    }
}

fn has_type(v: &Value, t: &str) -> bool {
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

// ---------------------------------------------------------------------------------------------
// Random schemas

fn literal() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec!["a", "ab", "abc", "é", "x\"y", "read", "readme", "", "tab\there", "😀"])
            .prop_map(|s| json!(s)),
        prop::sample::select(vec![json!(1), json!(12), json!(-3), json!(1.5), json!(0), json!(120)]),
        prop::sample::select(vec![json!(true), json!(false), json!(null), json!([1, "a"]), json!({"k": [null]})]),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0u64..4, prop::option::of(0u64..5)).prop_map(|(min, extra)| {
            let mut s = json!({"type": "string"});
            if min > 0 {
                s["minLength"] = json!(min);
            }
            if let Some(extra) = extra {
                s["maxLength"] = json!(min + extra);
            }
            s
        }),
        Just(json!({"type": "string"})),
        Just(json!({"type": "integer"})),
        Just(json!({"type": "number"})),
        Just(json!({"type": "boolean"})),
        Just(json!({"type": "null"})),
        Just(json!({})),
        Just(json!(true)),
        Just(json!({"type": ["string", "null"]})),
        Just(json!({"type": ["integer", "boolean"]})),
        prop::collection::vec(literal(), 1..5).prop_map(|values| json!({"enum": values})),
        prop::collection::vec(literal(), 1..5)
            .prop_map(|values| json!({"type": ["string", "integer"], "enum": values})),
        literal().prop_map(|c| json!({"const": c})),
    ]
}

fn schema() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        let key = prop::sample::select(vec!["a", "ab", "b", "name", "é", "x y", "\"q\""]);
        prop_oneof![
            (
                prop::collection::vec((key, inner.clone(), any::<bool>()), 0..5),
                prop::sample::select(vec![None, Some(json!(false)), Some(json!(true))]),
            )
                .prop_map(|(props, additional)| {
                    let mut properties = Map::new();
                    let mut required = Vec::new();
                    for (k, s, req) in props {
                        if properties.contains_key(k) {
                            continue;
                        }
                        properties.insert(k.to_owned(), s);
                        if req {
                            required.push(json!(k));
                        }
                    }
                    let mut s = json!({"type": "object", "properties": properties, "required": required});
                    if let Some(a) = additional {
                        s["additionalProperties"] = a;
                    }
                    s
                }),
            prop::option::of(inner.clone()).prop_map(|additional| match additional {
                Some(a) => json!({"type": "object", "additionalProperties": a}),
                None => json!({"type": "object"}),
            }),
            (inner.clone(), 0u64..3, prop::option::of(0u64..3)).prop_map(|(items, min, extra)| {
                let mut s = json!({"type": "array", "items": items});
                if min > 0 {
                    s["minItems"] = json!(min);
                }
                if let Some(extra) = extra {
                    s["maxItems"] = json!(min + extra);
                }
                s
            }),
            prop::collection::vec(inner, 1..4).prop_map(|alts| json!({"anyOf": alts})),
        ]
    })
}

// ---------------------------------------------------------------------------------------------
// The synthetic vocabulary and the walk

/// Every single byte (as a byte-level BPE vocabulary has), so `é` also comes split into its
/// two bytes, plus multi-byte pieces that cross JSON's structure.
fn vocabulary() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for piece in [
        "{\"", "\":", "\": ", "\",", "\", \"", "\"}", "\"]", "\"name", "\"a", "ab", "name\":", "true", "false", "null",
        "tr", "ue", "nul", "12", "-3", "0.", ".5", "e+", "E-1", "1e", "\\u00e9", "\\uD83D", "\\uDE00", "\\u", "00",
        "D8", "\\n", "\\\"", "\\\\", "é", "€", "😀", "  ", "\n  ", "\n", " \"", "}}", "]}", "}]", "[]", "{}", "[{",
        "[\"", ", ", ",\"", "x y", "readme", "read", "\"read", "\"é", "é\"", "\\t", "tab", "120", "\"\"", "[[", "]]",
        "},",
    ] {
        v.push(piece.as_bytes().to_vec());
    }
    // Multi-byte characters cut mid-way, the way tokens cut them.
    v.push(b"a\xc3".to_vec());
    v.push(b"\xa9b".to_vec());
    v.push(b"\xe2\x82".to_vec());
    v.push(b"\xf0\x9f".to_vec());
    v.push(b"\x98\x80\"".to_vec());
    v
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const MAX_STEPS: usize = 5_000;

/// Walks from the start: picks random accepted tokens for `free_steps` steps, then follows the
/// matcher's shortest completion (with the longest vocabulary token that is a prefix of it).
/// Checks at every step that some token is accepted unless the value is complete, and that the
/// completion completes. Returns the bytes produced.
fn walk(grammar: &JsonGrammar, vocab: &[Vec<u8>], seed: u64, free_steps: usize) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut m: Matcher = grammar.start();
    let mut out = Vec::new();
    for step in 0..MAX_STEPS {
        let done = m.shortest_completion();
        let mut probe = m.clone();
        assert!(probe.advance(&done) && probe.is_complete(), "completion {:?} of {:?} fails", bstr(&done), bstr(&out));
        let complete = m.is_complete();
        assert_eq!(complete, done.is_empty());
        let mut checker = TokenChecker::new(&m);
        let accepted: Vec<usize> = (0..vocab.len()).filter(|&i| checker.accepts(&vocab[i])).collect();
        assert!(complete || !accepted.is_empty(), "dead end after {:?}", bstr(&out));
        assert!(checker.accepts(b"") == complete, "end of generation allowed only when complete");
        if complete && (step >= free_steps || rng.below(8) == 0 || accepted.is_empty()) {
            return out;
        }
        let token = if step < free_steps {
            accepted[rng.below(accepted.len())]
        } else {
            accepted
                .iter()
                .copied()
                .filter(|&i| done.starts_with(&vocab[i]))
                .max_by_key(|&i| vocab[i].len())
                .unwrap_or_else(|| accepted[rng.below(accepted.len())])
        };
        assert!(m.advance(&vocab[token]));
        out.extend_from_slice(&vocab[token]);
    }
    panic!("the walk did not finish in {MAX_STEPS} steps: {:?}", bstr(&out));
}

fn bstr(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn check_walk(schema: &Value, grammar: &JsonGrammar, vocab: &[Vec<u8>], seed: u64, free_steps: usize) {
    let out = walk(grammar, vocab, seed, free_steps);
    let value: Value =
        serde_json::from_slice(&out).unwrap_or_else(|e| panic!("{e}: output {:?} of schema {schema}", bstr(&out)));
    assert!(valid(schema, &value), "{value} does not satisfy {schema} (output {:?})", bstr(&out));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// 1,000 random schemas: a random walk always ends in JSON that parses and satisfies the
    /// schema, and no step of it is a dead end.
    #[test]
    fn random_walks_produce_valid_json(schema in schema(), seed in any::<u64>(), free_steps in 0usize..80) {
        match JsonGrammar::from_schema(&schema) {
            Ok(grammar) => check_walk(&schema, &grammar, &VOCAB, seed, free_steps),
            // Only a schema no value satisfies is refused (checked independently).
            Err(e) => prop_assert!(unsatisfiable(&schema), "{schema}: {e}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Tool calls over random tool sets: the output names one tool and its arguments satisfy
    /// that tool's schema.
    #[test]
    fn random_tool_calls_are_valid(
        tools in prop::collection::vec((prop::sample::select(vec!["read", "read_file", "sh", "s", "write"]), schema()), 1..4),
        seed in any::<u64>(),
        free_steps in 0usize..80,
    ) {
        let refs: Vec<(&str, &Value)> = tools.iter().map(|(n, s)| (*n, s)).collect();
        let Ok(grammar) = JsonGrammar::for_tools(refs.iter().copied(), "name", "arguments") else {
            prop_assert!(tools.iter().all(|(_, s)| unsatisfiable(s)));
            return Ok(());
        };
        let out = walk(&grammar, &VOCAB, seed, free_steps);
        let call: Value = serde_json::from_slice(&out).unwrap();
        let obj = call.as_object().unwrap();
        prop_assert_eq!(obj.len(), 2);
        let name = obj["name"].as_str().unwrap();
        // The first satisfiable tool of that name is the one called.
        let (_, schema) = tools.iter().find(|(n, s)| *n == name && !unsatisfiable(s)).unwrap();
        prop_assert!(valid(schema, &obj["arguments"]), "{} does not satisfy {}", obj["arguments"], schema);
    }
}

/// Whether some value satisfies a schema of the generated subset, decided independently of the
/// grammar compiler (which must refuse exactly the unsatisfiable ones).
fn satisfiable(schema: &Value) -> bool {
    let map = match schema {
        Value::Bool(b) => return *b,
        Value::Object(map) => map,
        _ => return false,
    };
    if let Some(Value::Array(alts)) = map.get("anyOf") {
        return alts.iter().any(satisfiable);
    }
    let literals = match (map.get("const"), map.get("enum")) {
        (Some(c), _) => Some(vec![c.clone()]),
        (None, Some(Value::Array(values))) => Some(values.clone()),
        _ => None,
    };
    if let Some(values) = literals {
        return values.iter().any(|v| valid(schema, v));
    }
    match map.get("type").and_then(Value::as_str) {
        Some("object") => match (map.get("properties"), map.get("required")) {
            (Some(Value::Object(props)), Some(Value::Array(required))) => {
                required.iter().all(|name| props.get(name.as_str().unwrap()).is_none_or(satisfiable))
            }
            _ => true,
        },
        Some("array") => {
            map.get("minItems").and_then(Value::as_u64).unwrap_or(0) == 0 || map.get("items").is_none_or(satisfiable)
        }
        _ => true,
    }
}

fn unsatisfiable(schema: &Value) -> bool {
    let refused = match JsonGrammar::from_schema(schema) {
        Ok(_) => false,
        Err(GrammarError::Unsatisfiable) => true,
        Err(e) => panic!("{schema}: {e}"),
    };
    assert_eq!(refused, !satisfiable(schema), "{schema}");
    refused
}

static VOCAB: std::sync::LazyLock<Vec<Vec<u8>>> = std::sync::LazyLock::new(vocabulary);

#[test]
fn tool_call_walk_example() {
    let schema = json!({
        "type": "object",
        "properties": {"path": {"type": "string"}, "mode": {"enum": ["r", "rw"]}},
        "required": ["path", "mode"],
        "additionalProperties": false
    });
    let grammar = JsonGrammar::for_tools([("read_file", &schema)], "name", "arguments").unwrap();
    for seed in 0..20 {
        let out = walk(&grammar, &VOCAB, seed, 30);
        let call: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(call["name"], "read_file");
        assert!(valid(&schema, &call["arguments"]));
    }
}

/// The cost of checking a whole 49k-token vocabulary against one state, in the worst cases:
/// most tokens rejected by their first byte (a key is expected); every token passing its first
/// byte and failing later (a string one character short of its maximum length, deep in nested
/// arrays); tokens that end a number or start values (each needs the whole stack). Prints the
/// figures (wall time); the bound asserted is loose (unoptimized builds are ~5-10x slower, and
/// the machine may be busy). Release build, 2 busy cores: 0.25 to 1 ms of CPU per scan.
#[test]
fn cost_of_a_full_scan() {
    let mut rng = Rng(7);
    let alphabet: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-.,:;(){}[]\"'\\/\n";
    let vocab: Vec<Vec<u8>> = (0..49_152)
        .map(|i| {
            if i < 256 {
                return vec![i as u8];
            }
            let len = 2 + rng.below(7);
            (0..len).map(|_| alphabet[rng.below(alphabet.len())]).collect()
        })
        .collect();
    let nested = json!({"type": "array", "items": {"type": "array", "items": {"type": "array", "items": {"type": "array", "items": {"type": "array", "items": {"type": "object", "properties": {"s": {"type": "string", "maxLength": 5}}}}}}}});
    let cases = [
        (
            "key expected",
            json!({"type": "object", "properties": {"path": {"type": "string"}, "mode": {"type": "integer"}}}),
            "{",
        ),
        ("string at its maximum length, 7 containers deep", nested, "[[[[[{\"s\": \"abcd"),
        ("number that may go on or end", json!({"type": "array", "items": {"type": "number"}}), "[12"),
        ("any value may start", json!({"type": "array"}), "[[{\"a\": ["),
    ];
    for (what, schema, prefix) in cases {
        let grammar = JsonGrammar::from_schema(&schema).unwrap();
        let mut m = grammar.start();
        assert!(m.advance(prefix.as_bytes()));
        let rounds = 5;
        let started = Instant::now();
        let mut accepted = 0;
        for _ in 0..rounds {
            let mut checker = TokenChecker::new(&m);
            accepted = vocab.iter().filter(|t| checker.accepts(t)).count();
        }
        let per_scan = started.elapsed() / rounds;
        eprintln!("full scan of {} tokens ({what}): {per_scan:?}, {accepted} accepted", vocab.len());
        assert!(per_scan.as_millis() < 500, "{per_scan:?}");
        // pick with the accepted tokens last: the same full scan.
        let candidates = vocab.iter().enumerate().map(|(i, t)| (i as u32, t.as_slice()));
        assert!(pick(&m, candidates).is_some());
    }
}
