//! The tool trait and registry.
//!
//! The registry keeps each tool's spec (computed once), validates a call's arguments against
//! the spec's JSON Schema before it runs ([`ToolRegistry::validate`]), applies the tool's
//! timeout and the run's cancellation ([`call_with_timeout`]) and keeps per-tool statistics
//! ([`ToolRegistry::record`], [`ToolRegistry::stats`]). [`ToolRegistry::execute`] does all of
//! it in one call.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use descartes_protocol::{RunId, ToolSpec};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Everything a tool call may use besides its arguments.
#[derive(Debug, Clone)]
pub struct ToolContext {
    /// Working directory of the run.
    pub cwd: PathBuf,
    pub run_id: RunId,
    /// The model's id for this call.
    pub call_id: String,
    /// A directory private to this call where a tool keeps what it needs to recover after a
    /// crash (see [`Tool::recover`]). Not created in advance.
    pub spool_dir: PathBuf,
    /// Cancelled when the user stops the run: tools stop their work (kill children) promptly.
    pub cancel: CancellationToken,
}

/// The result of a tool call, as the model will see it.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolOutput {
    pub content: String,
    pub is_error: bool,
    /// Structured details recorded in the event (exit code, truncation, ...).
    pub details: Option<Value>,
}

impl ToolOutput {
    pub fn ok(content: impl Into<String>) -> Self {
        Self { content: content.into(), is_error: false, details: None }
    }
    pub fn error(content: impl Into<String>) -> Self {
        Self { content: content.into(), is_error: true, details: None }
    }
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }
}

/// A tool a model can call.
#[async_trait]
pub trait Tool: Send + Sync {
    fn spec(&self) -> ToolSpec;

    /// Read-only tools change nothing and are allowed without asking.
    fn read_only(&self) -> bool;

    /// Running the call twice is harmless: on resume an interrupted call is simply run again.
    fn idempotent(&self) -> bool;

    /// Runs the call. Failures the model should see are `ToolOutput::error`, never a panic.
    async fn call(&self, input: Value, ctx: &ToolContext) -> ToolOutput;

    /// On resume, for a non-idempotent call whose intent is logged without a result: what the
    /// tool can tell about it (for example from files it kept in `ctx.spool_dir`). The default
    /// is [`Recovery::Unknown`]: the call is not run again and the model is told.
    async fn recover(&self, _input: &Value, _ctx: &ToolContext) -> Recovery {
        Recovery::Unknown
    }

    /// How long a call may take before [`call_with_timeout`] stops it with an error output.
    /// `None` (the default): the tool bounds its own calls (as `shell` does with its own timeout
    /// and kill), only cancellation stops it.
    fn timeout(&self) -> Option<Duration> {
        None
    }
}

/// Runs `tool` on `input`, stopped with an error output when `timeout` passes or `ctx.cancel`
/// fires first (the call's future is dropped: tools keep no state that dropping corrupts).
pub async fn call_with_timeout(
    tool: &dyn Tool,
    input: Value,
    ctx: &ToolContext,
    timeout: Option<Duration>,
) -> ToolOutput {
    let name = || tool.spec().name;
    let call = tool.call(input, ctx);
    let sleep = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        out = call => out,
        () = ctx.cancel.cancelled() => ToolOutput::error(format!("`{}` was cancelled: the run was stopped", name()))
            .with_details(serde_json::json!({"cancelled": true})),
        () = sleep => ToolOutput::error(format!(
            "`{}` timed out after {:.1}s and was stopped",
            name(),
            timeout.map(|t| t.as_secs_f64()).unwrap_or_default()
        ))
        .with_details(serde_json::json!({"timed_out": true})),
    }
}

/// What a tool knows about an interrupted call.
#[derive(Debug, Clone, PartialEq)]
pub enum Recovery {
    /// The call never started: it is safe to run it.
    NotStarted,
    /// The call ran; here is its result.
    Completed(ToolOutput),
    /// The tool cannot tell. The call is not run again; the model is told.
    Unknown,
}

/// Statistics of one tool since the registry was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ToolStats {
    pub calls: u64,
    /// Calls whose output was an error (including invalid arguments, timeouts, cancellations).
    pub errors: u64,
    pub total: Duration,
}

impl ToolStats {
    /// Average duration of a call; zero without calls.
    pub fn avg(&self) -> Duration {
        if self.calls == 0 {
            Duration::ZERO
        } else {
            Duration::from_nanos(u64::try_from(self.total.as_nanos() / u128::from(self.calls)).unwrap_or(u64::MAX))
        }
    }
}

#[derive(Default)]
struct StatCells {
    calls: AtomicU64,
    errors: AtomicU64,
    total_nanos: AtomicU64,
}

#[derive(Clone)]
struct Entry {
    tool: Arc<dyn Tool>,
    spec: ToolSpec,
    stats: Arc<StatCells>,
}

/// The tools offered to a run, by name. Clones share the statistics.
#[derive(Clone, Default)]
pub struct ToolRegistry {
    tools: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for ToolRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.tools.keys()).finish()
    }
}

impl ToolRegistry {
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds (or replaces) a tool under its spec's name.
    pub fn register(&mut self, tool: Arc<dyn Tool>) {
        let spec = tool.spec();
        self.tools.insert(spec.name.clone(), Entry { tool, spec, stats: Arc::default() });
    }
    /// Removes a tool; true if it was there.
    pub fn unregister(&mut self, name: &str) -> bool {
        self.tools.remove(name).is_some()
    }
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Tool>> {
        self.tools.get(name).map(|e| &e.tool)
    }
    /// The spec a tool had when it was registered.
    pub fn spec(&self, name: &str) -> Option<&ToolSpec> {
        self.tools.get(name).map(|e| &e.spec)
    }
    pub fn names(&self) -> Vec<String> {
        self.tools.keys().cloned().collect()
    }
    pub fn specs(&self) -> Vec<ToolSpec> {
        self.tools.values().map(|e| e.spec.clone()).collect()
    }

    /// Checks a call's arguments against the tool's JSON Schema. The error is meant for the
    /// model: it names each offending field and what is wrong with it.
    pub fn validate(&self, name: &str, input: &Value) -> Result<(), String> {
        let Some(entry) = self.tools.get(name) else {
            return Err(format!("unknown tool `{name}`; available tools: {}", self.names().join(", ")));
        };
        let mut errors = Vec::new();
        schema::validate(&entry.spec.input_schema, &entry.spec.input_schema, input, &mut String::new(), &mut errors);
        if errors.is_empty() {
            return Ok(());
        }
        errors.truncate(8);
        Err(format!("invalid arguments for `{name}`: {}", errors.join("; ")))
    }

    /// Counts one finished call of `name` (unknown names are ignored).
    pub fn record(&self, name: &str, ok: bool, duration: Duration) {
        if let Some(e) = self.tools.get(name) {
            e.stats.calls.fetch_add(1, Ordering::Relaxed);
            if !ok {
                e.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
            let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
            e.stats.total_nanos.fetch_add(nanos, Ordering::Relaxed);
        }
    }

    /// Statistics of every tool, by name.
    pub fn stats(&self) -> BTreeMap<String, ToolStats> {
        self.tools
            .iter()
            .map(|(name, e)| {
                let s = ToolStats {
                    calls: e.stats.calls.load(Ordering::Relaxed),
                    errors: e.stats.errors.load(Ordering::Relaxed),
                    total: Duration::from_nanos(e.stats.total_nanos.load(Ordering::Relaxed)),
                };
                (name.clone(), s)
            })
            .collect()
    }

    /// Looks the tool up, validates `input`, runs it under its timeout and the run's
    /// cancellation, and records the statistics. Never panics on bad input: every failure is
    /// an error output for the model.
    pub async fn execute(&self, name: &str, input: Value, ctx: &ToolContext) -> ToolOutput {
        let started = Instant::now();
        let output = match self.validate(name, &input) {
            Err(message) => ToolOutput::error(message).with_details(serde_json::json!({"invalid_arguments": true})),
            Ok(()) => match self.tools.get(name) {
                Some(e) => call_with_timeout(e.tool.as_ref(), input, ctx, e.tool.timeout()).await,
                None => ToolOutput::error(format!("unknown tool `{name}`")),
            },
        };
        self.record(name, !output.is_error, started.elapsed());
        output
    }
}

/// A small JSON Schema validator for tool arguments.
///
/// Supported keywords: `type` (a name or a list), `enum`, `const`, `properties`, `required`,
/// `additionalProperties` (bool or schema), `items`, `minItems`/`maxItems`,
/// `minLength`/`maxLength`, `minimum`/`maximum`/`exclusiveMinimum`/`exclusiveMaximum`,
/// `allOf`/`anyOf`/`oneOf`/`not`, and local `$ref`s (`#/...`). Other keywords (`pattern`,
/// `format`, ...) are ignored: the tool checks them itself. Kept small on purpose: tool
/// schemas use this subset, it compiles in no time and a validation takes microseconds.
mod schema {
    use serde_json::Value;

    fn type_name(v: &Value) -> &'static str {
        match v {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        }
    }

    fn is_type(v: &Value, t: &str) -> bool {
        match t {
            "integer" => match v {
                Value::Number(n) => n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0),
                _ => false,
            },
            "number" => v.is_number(),
            other => type_name(v) == other,
        }
    }

    fn show(v: &Value) -> String {
        let s = v.to_string();
        if s.len() > 60 {
            let mut end = 57;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}...", &s[..end])
        } else {
            s
        }
    }

    fn field(path: &str) -> String {
        if path.is_empty() { "the arguments".into() } else { format!("argument `{path}`") }
    }

    fn resolve<'a>(root: &'a Value, r: &str) -> Option<&'a Value> {
        r.strip_prefix('#').and_then(|p| root.pointer(p))
    }

    pub(super) fn validate(root: &Value, schema: &Value, v: &Value, path: &mut String, errors: &mut Vec<String>) {
        let Value::Object(s) = schema else {
            if schema == &Value::Bool(false) {
                errors.push(format!("{} is not allowed", field(path)));
            }
            return;
        };
        if let Some(Value::String(r)) = s.get("$ref") {
            match resolve(root, r) {
                Some(target) => validate(root, target, v, path, errors),
                None => errors.push(format!("schema error: unresolvable $ref `{r}`")),
            }
        }
        match s.get("type") {
            Some(Value::String(t)) if !is_type(v, t) => {
                let article = if t.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
                errors.push(format!("{} must be {article} {t}, got {}", field(path), show(v)));
                return;
            }
            Some(Value::Array(ts)) if !ts.iter().any(|t| t.as_str().is_some_and(|t| is_type(v, t))) => {
                let names: Vec<String> = ts.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect();
                errors.push(format!("{} must be one of the types {}, got {}", field(path), names.join(", "), show(v)));
                return;
            }
            _ => {}
        }
        if let Some(Value::Array(allowed)) = s.get("enum")
            && !allowed.contains(v)
        {
            let list: Vec<String> = allowed.iter().map(show).collect();
            errors.push(format!("{} must be one of {}, got {}", field(path), list.join(", "), show(v)));
        }
        if let Some(c) = s.get("const")
            && c != v
        {
            errors.push(format!("{} must be {}, got {}", field(path), show(c), show(v)));
        }
        match v {
            Value::Object(obj) => {
                if let Some(Value::Array(req)) = s.get("required") {
                    for name in req.iter().filter_map(Value::as_str) {
                        if !obj.contains_key(name) {
                            let full = if path.is_empty() { name.to_owned() } else { format!("{path}.{name}") };
                            errors.push(format!("missing required argument `{full}`"));
                        }
                    }
                }
                let props = s.get("properties").and_then(Value::as_object);
                let extra = s.get("additionalProperties");
                for (k, item) in obj {
                    let sub = props.and_then(|p| p.get(k));
                    let len = path.len();
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(k);
                    match (sub, extra) {
                        (Some(sub), _) => validate(root, sub, item, path, errors),
                        (None, Some(Value::Bool(false))) => {
                            let known: Vec<&str> =
                                props.map(|p| p.keys().map(String::as_str).collect()).unwrap_or_default();
                            errors.push(format!(
                                "unknown argument `{path}` (expected: {})",
                                if known.is_empty() { "none".into() } else { known.join(", ") }
                            ));
                        }
                        (None, Some(extra @ Value::Object(_))) => validate(root, extra, item, path, errors),
                        (None, _) => {}
                    }
                    path.truncate(len);
                }
            }
            Value::Array(items) => {
                if let Some(n) = s.get("minItems").and_then(Value::as_u64)
                    && (items.len() as u64) < n
                {
                    errors.push(format!("{} must have at least {n} items, has {}", field(path), items.len()));
                }
                if let Some(n) = s.get("maxItems").and_then(Value::as_u64)
                    && (items.len() as u64) > n
                {
                    errors.push(format!("{} must have at most {n} items, has {}", field(path), items.len()));
                }
                if let Some(item_schema) = s.get("items") {
                    for (i, item) in items.iter().enumerate() {
                        let len = path.len();
                        path.push_str(&format!("[{i}]"));
                        validate(root, item_schema, item, path, errors);
                        path.truncate(len);
                    }
                }
            }
            Value::String(text) => {
                let chars = text.chars().count() as u64;
                if let Some(n) = s.get("minLength").and_then(Value::as_u64)
                    && chars < n
                {
                    errors.push(format!("{} must be at least {n} characters long", field(path)));
                }
                if let Some(n) = s.get("maxLength").and_then(Value::as_u64)
                    && chars > n
                {
                    errors.push(format!("{} must be at most {n} characters long, has {chars}", field(path)));
                }
            }
            Value::Number(n) => {
                let x = n.as_f64().unwrap_or_default();
                let bound = |k: &str| s.get(k).and_then(Value::as_f64);
                if let Some(m) = bound("minimum")
                    && x < m
                {
                    errors.push(format!("{} must be at least {m}, got {n}", field(path)));
                }
                if let Some(m) = bound("maximum")
                    && x > m
                {
                    errors.push(format!("{} must be at most {m}, got {n}", field(path)));
                }
                if let Some(m) = bound("exclusiveMinimum")
                    && x <= m
                {
                    errors.push(format!("{} must be greater than {m}, got {n}", field(path)));
                }
                if let Some(m) = bound("exclusiveMaximum")
                    && x >= m
                {
                    errors.push(format!("{} must be less than {m}, got {n}", field(path)));
                }
            }
            _ => {}
        }
        if let Some(Value::Array(all)) = s.get("allOf") {
            for sub in all {
                validate(root, sub, v, path, errors);
            }
        }
        let passes = |sub: &Value, path: &mut String| {
            let mut errs = Vec::new();
            validate(root, sub, v, path, &mut errs);
            errs.is_empty()
        };
        if let Some(Value::Array(any)) = s.get("anyOf")
            && !any.iter().any(|sub| passes(sub, path))
        {
            errors.push(format!("{} matches none of the allowed forms (anyOf)", field(path)));
        }
        if let Some(Value::Array(one)) = s.get("oneOf") {
            let n = one.iter().filter(|sub| passes(sub, path)).count();
            if n != 1 {
                errors.push(format!("{} must match exactly one allowed form (oneOf), matches {n}", field(path)));
            }
        }
        if let Some(not) = s.get("not")
            && passes(not, path)
        {
            errors.push(format!("{} matches a form that is not allowed", field(path)));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Fake {
        schema: Value,
        delay: Duration,
        timeout: Option<Duration>,
    }

    #[async_trait]
    impl Tool for Fake {
        fn spec(&self) -> ToolSpec {
            ToolSpec { name: "fake".into(), description: "test".into(), input_schema: self.schema.clone() }
        }
        fn read_only(&self) -> bool {
            true
        }
        fn idempotent(&self) -> bool {
            true
        }
        fn timeout(&self) -> Option<Duration> {
            self.timeout
        }
        async fn call(&self, input: Value, _ctx: &ToolContext) -> ToolOutput {
            tokio::time::sleep(self.delay).await;
            ToolOutput::ok(input.to_string())
        }
    }

    fn registry(schema: Value, delay: Duration, timeout: Option<Duration>) -> ToolRegistry {
        let mut r = ToolRegistry::new();
        r.register(Arc::new(Fake { schema, delay, timeout }));
        r
    }

    fn ctx() -> ToolContext {
        ToolContext {
            cwd: PathBuf::from("/"),
            run_id: RunId::from("run"),
            call_id: "c".into(),
            spool_dir: PathBuf::from("/nonexistent"),
            cancel: CancellationToken::new(),
        }
    }

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "path": {"type": "string", "minLength": 1},
                "limit": {"type": "integer", "minimum": 1, "maximum": 100},
                "mode": {"enum": ["a", "b"]},
                "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 2}
            },
            "required": ["path"],
            "additionalProperties": false,
            "$defs": {"tag": {"type": "string"}}
        })
    }

    #[test]
    fn valid_arguments_pass() {
        let r = registry(schema(), Duration::ZERO, None);
        let ok = json!({"path": "a", "limit": 3, "mode": "b", "headers": {"x": "y"}, "tags": ["t"]});
        assert_eq!(r.validate("fake", &ok), Ok(()));
        assert_eq!(r.validate("fake", &json!({"path": "a", "limit": 3.0})), Ok(()));
    }

    #[test]
    fn invalid_arguments_name_the_field_and_the_problem() {
        let r = registry(schema(), Duration::ZERO, None);
        let cases = [
            (json!({}), "missing required argument `path`"),
            (json!({"path": 1}), "argument `path` must be a string, got 1"),
            (json!({"path": ""}), "argument `path` must be at least 1 characters long"),
            (json!({"path": "a", "limit": 0}), "argument `limit` must be at least 1, got 0"),
            (json!({"path": "a", "limit": 1.5}), "argument `limit` must be an integer, got 1.5"),
            (json!({"path": "a", "limit": 101}), "argument `limit` must be at most 100"),
            (json!({"path": "a", "mode": "c"}), r#"argument `mode` must be one of "a", "b", got "c""#),
            (json!({"path": "a", "headers": {"x": 1}}), "argument `headers.x` must be a string, got 1"),
            (json!({"path": "a", "tags": ["t", 2]}), "argument `tags[1]` must be a string, got 2"),
            (json!({"path": "a", "tags": ["a", "b", "c"]}), "argument `tags` must have at most 2 items, has 3"),
            (json!({"path": "a", "extra": true}), "unknown argument `extra`"),
            (json!(null), "the arguments must be an object, got null"),
            (json!("raw text"), "the arguments must be an object"),
        ];
        for (input, expected) in cases {
            let err = r.validate("fake", &input).unwrap_err();
            assert!(err.starts_with("invalid arguments for `fake`: "), "{err}");
            assert!(err.contains(expected), "{input}: {err}");
        }
        let err = r.validate("nope", &json!({})).unwrap_err();
        assert!(err.contains("unknown tool `nope`; available tools: fake"), "{err}");
    }

    #[test]
    fn combinators_are_checked() {
        let r = registry(
            json!({"type": "object", "properties": {
                "v": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
                "w": {"anyOf": [{"type": "boolean"}, {"const": 0}]},
                "n": {"not": {"type": "null"}}
            }}),
            Duration::ZERO,
            None,
        );
        assert_eq!(r.validate("fake", &json!({"v": "x", "w": 0, "n": 1})), Ok(()));
        let err = r.validate("fake", &json!({"v": [], "w": 1, "n": null})).unwrap_err();
        assert!(err.contains("argument `v` must match exactly one allowed form (oneOf), matches 0"), "{err}");
        assert!(err.contains("argument `w` matches none of the allowed forms"), "{err}");
        assert!(err.contains("argument `n` matches a form that is not allowed"), "{err}");
    }

    #[tokio::test]
    async fn execute_validates_records_and_times_out() {
        let r = registry(schema(), Duration::from_millis(200), Some(Duration::from_millis(20)));
        let clone = r.clone();
        let out = r.execute("fake", json!({"path": 5}), &ctx()).await;
        assert!(out.is_error);
        assert!(out.content.contains("argument `path` must be a string"), "{}", out.content);
        let out = r.execute("fake", json!({"path": "p"}), &ctx()).await;
        assert!(out.is_error);
        assert!(out.content.contains("`fake` timed out after 0.0s"), "{}", out.content);
        assert_eq!(out.details, Some(json!({"timed_out": true})));

        let fast = registry(schema(), Duration::ZERO, None);
        let out = fast.execute("fake", json!({"path": "p"}), &ctx()).await;
        assert_eq!(out, ToolOutput::ok(r#"{"path":"p"}"#));
        fast.record("fake", true, Duration::from_millis(4));
        let s = fast.stats()["fake"];
        assert_eq!((s.calls, s.errors), (2, 0));
        assert!(s.total >= Duration::from_millis(4));
        assert!(s.avg() >= Duration::from_millis(2));

        // Clones share the statistics.
        let s = clone.stats()["fake"];
        assert_eq!((s.calls, s.errors), (2, 2));
        assert_eq!(ToolStats::default().avg(), Duration::ZERO);
    }

    #[tokio::test]
    async fn cancellation_stops_a_call() {
        let r = registry(json!({"type": "object"}), Duration::from_secs(30), None);
        let c = ctx();
        let cancel = c.cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            cancel.cancel();
        });
        let started = Instant::now();
        let out = r.execute("fake", json!({}), &c).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(out.is_error);
        assert!(out.content.contains("`fake` was cancelled"), "{}", out.content);
    }
}
