//! The tool trait and registry.
//!
//! The registry keeps each tool's spec (computed once), validates a call's arguments against
//! the spec's JSON Schema before it runs ([`ToolRegistry::validate`]), applies the tool's
//! timeout and the run's cancellation ([`call_with_timeout`]) and keeps per-tool statistics
//! ([`ToolRegistry::record`], [`ToolRegistry::stats`]). [`ToolRegistry::execute`] does all of
//! it in one call.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
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
    spec: Arc<ToolSpec>,
    stats: Arc<StatCells>,
}

impl Entry {
    fn new(tool: Arc<dyn Tool>) -> Self {
        let spec = Arc::new(tool.spec());
        Self { tool, spec, stats: Arc::default() }
    }
}

/// A set of tools that can change while a run goes on: an MCP server's tools, which the server
/// may change (`notifications/tools/list_changed`).
#[async_trait]
pub trait ToolSource: Send + Sync {
    /// Names the source in errors and notices, e.g. `MCP server `github``.
    fn describe(&self) -> String;
    /// A number that changes whenever the set changes.
    fn generation(&self) -> u64;
    /// The current tools, re-listed first if the source learned that they changed (cheap
    /// otherwise).
    async fn tools(&self) -> Result<Vec<Arc<dyn Tool>>, String>;
}

struct SourceEntry {
    source: Arc<dyn ToolSource>,
    generation: u64,
    tools: BTreeMap<String, Entry>,
}

/// The tools offered to a run, by name: fixed tools ([`ToolRegistry::register`]) and the tools
/// of [`ToolSource`]s, brought up to date by [`ToolRegistry::refresh`]. Clones share the
/// statistics and the sources.
#[derive(Clone, Default)]
pub struct ToolRegistry {
    tools: BTreeMap<String, Entry>,
    sources: Arc<RwLock<Vec<SourceEntry>>>,
    /// Bumped whenever a source's tools change.
    version: Arc<AtomicU64>,
}

impl std::fmt::Debug for ToolRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl ToolRegistry {
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds (or replaces) a tool under its spec's name.
    pub fn register(&mut self, tool: Arc<dyn Tool>) {
        let entry = Entry::new(tool);
        self.tools.insert(entry.spec.name.clone(), entry);
    }
    /// Removes a fixed tool; true if it was there.
    pub fn unregister(&mut self, name: &str) -> bool {
        self.tools.remove(name).is_some()
    }

    /// Adds a source and lists its tools now. A source that cannot list them is kept (with no
    /// tools: a later [`refresh`](Self::refresh) may get them) and its error returned.
    pub async fn add_source(&self, source: Arc<dyn ToolSource>) -> Result<(), String> {
        let listed = source.tools().await;
        let generation = source.generation();
        let (tools, result) = match listed {
            Ok(list) => (list.into_iter().map(Entry::new).map(|e| (e.spec.name.clone(), e)).collect(), Ok(())),
            Err(e) => (BTreeMap::new(), Err(e)),
        };
        self.write_sources().push(SourceEntry { source, generation, tools });
        self.version.fetch_add(1, Ordering::SeqCst);
        result
    }

    /// Brings the sources' tools up to date. Returns a notice for each source whose tools
    /// changed. A source that fails keeps its last tools (their calls report the failure).
    pub async fn refresh(&self) -> Vec<String> {
        let sources: Vec<(usize, Arc<dyn ToolSource>, u64)> =
            self.read_sources().iter().enumerate().map(|(i, s)| (i, s.source.clone(), s.generation)).collect();
        let mut notices = Vec::new();
        for (i, source, known) in sources {
            let Ok(list) = source.tools().await else { continue };
            let generation = source.generation();
            if generation == known {
                continue;
            }
            let mut guard = self.write_sources();
            let Some(slot) = guard.get_mut(i) else { continue };
            let mut tools = BTreeMap::new();
            for tool in list {
                let mut entry = Entry::new(tool);
                if let Some(old) = slot.tools.get(&entry.spec.name) {
                    entry.stats = old.stats.clone();
                }
                tools.insert(entry.spec.name.clone(), entry);
            }
            let added = tools.keys().filter(|k| !slot.tools.contains_key(*k)).count();
            let removed = slot.tools.keys().filter(|k| !tools.contains_key(*k)).count();
            notices.push(format!(
                "the tools of {} changed ({} now: {added} added, {removed} removed)",
                source.describe(),
                tools.len()
            ));
            slot.tools = tools;
            slot.generation = generation;
            self.version.fetch_add(1, Ordering::SeqCst);
        }
        notices
    }

    /// Changes whenever the set of tools changes through a source.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }

    fn read_sources(&self) -> std::sync::RwLockReadGuard<'_, Vec<SourceEntry>> {
        self.sources.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    fn write_sources(&self) -> std::sync::RwLockWriteGuard<'_, Vec<SourceEntry>> {
        self.sources.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The entry of `name`: a fixed tool first, then the sources in the order they were added.
    fn entry(&self, name: &str) -> Option<Entry> {
        if let Some(e) = self.tools.get(name) {
            return Some(e.clone());
        }
        self.read_sources().iter().find_map(|s| s.tools.get(name).cloned())
    }

    /// Every entry by name (a fixed tool hides a source's tool of the same name).
    fn entries(&self) -> BTreeMap<String, Entry> {
        let mut all = BTreeMap::new();
        for s in self.read_sources().iter().rev() {
            all.extend(s.tools.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        all.extend(self.tools.iter().map(|(k, v)| (k.clone(), v.clone())));
        all
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn Tool>> {
        self.entry(name).map(|e| e.tool)
    }
    /// The spec a tool had when it was registered (or last listed by its source).
    pub fn spec(&self, name: &str) -> Option<ToolSpec> {
        self.entry(name).map(|e| ToolSpec::clone(&e.spec))
    }
    pub fn names(&self) -> Vec<String> {
        self.entries().into_keys().collect()
    }
    pub fn specs(&self) -> Vec<ToolSpec> {
        self.entries().into_values().map(|e| ToolSpec::clone(&e.spec)).collect()
    }

    /// Checks a call's arguments against the tool's JSON Schema. The error is meant for the
    /// model: it names each offending field and what is wrong with it.
    pub fn validate(&self, name: &str, input: &Value) -> Result<(), String> {
        let Some(entry) = self.entry(name) else {
            return Err(format!("unknown tool `{name}`; available tools: {}", self.names().join(", ")));
        };
        validate_against(&entry.spec, name, input)
    }

    /// Counts one finished call of `name` (unknown names are ignored).
    pub fn record(&self, name: &str, ok: bool, duration: Duration) {
        if let Some(e) = self.tools.get(name) {
            e.stats.record(ok, duration);
        } else if let Some(e) = self.entry(name) {
            e.stats.record(ok, duration);
        }
    }

    /// Statistics of every tool, by name.
    pub fn stats(&self) -> BTreeMap<String, ToolStats> {
        self.entries().into_iter().map(|(name, e)| (name, e.stats.snapshot())).collect()
    }

    /// Looks the tool up, validates `input`, runs it under its timeout and the run's
    /// cancellation, and records the statistics. Never panics on bad input: every failure is
    /// an error output for the model.
    pub async fn execute(&self, name: &str, input: Value, ctx: &ToolContext) -> ToolOutput {
        let started = Instant::now();
        let output = match self.entry(name) {
            None => ToolOutput::error(format!("unknown tool `{name}`; available tools: {}", self.names().join(", "))),
            Some(e) => match validate_against(&e.spec, name, &input) {
                Err(message) => ToolOutput::error(message).with_details(serde_json::json!({"invalid_arguments": true})),
                Ok(()) => call_with_timeout(e.tool.as_ref(), input, ctx, e.tool.timeout()).await,
            },
        };
        self.record(name, !output.is_error, started.elapsed());
        output
    }
}

fn validate_against(spec: &ToolSpec, name: &str, input: &Value) -> Result<(), String> {
    let mut errors = Vec::new();
    schema::validate(&spec.input_schema, &spec.input_schema, input, &mut String::new(), &mut errors);
    if errors.is_empty() {
        return Ok(());
    }
    errors.truncate(8);
    Err(format!("invalid arguments for `{name}`: {}", errors.join("; ")))
}

impl StatCells {
    fn record(&self, ok: bool, duration: Duration) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        self.total_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
    fn snapshot(&self) -> ToolStats {
        ToolStats {
            calls: self.calls.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            total: Duration::from_nanos(self.total_nanos.load(Ordering::Relaxed)),
        }
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
