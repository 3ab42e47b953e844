//! `when` conditions: CEL programs compiled once at load, evaluated against a decision's facts.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use cel::{Context, Env, Program, Value};

use crate::facts::{AgentFacts, DecisionInput, TaskFacts, ToolFacts, UsageFacts};

/// The variables a condition may read, as bits (see [`Condition::needs`]).
pub(crate) const VAR_TASK: u8 = 1;
pub(crate) const VAR_AGENT: u8 = 2;
pub(crate) const VAR_TOOL: u8 = 4;
pub(crate) const VAR_USAGE: u8 = 8;

/// The CEL environment shared by every policy: the standard library plus the `strings` and
/// `lists` extensions.
fn env() -> &'static Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Env::stdlib();
        // Adding an extension to a fresh environment cannot clash with anything; if it ever
        // did, conditions would merely lack those functions.
        let _ = env.add_extension(cel::extensions::strings);
        let _ = env.add_extension(cel::extensions::lists);
        Arc::new(env)
    })
}

/// A compiled `when`.
#[derive(Debug)]
pub(crate) struct Condition {
    pub(crate) source: String,
    program: Program,
    /// The fact variables it reads (`VAR_*` bits): a rule whose condition reads a fact the
    /// input does not have does not match.
    pub(crate) needs: u8,
}

/// A compile error: line and column in the expression (from 1), and the message.
pub(crate) type CompileError = (usize, usize, String);

impl Condition {
    pub(crate) fn compile(source: &str) -> Result<Self, Vec<CompileError>> {
        let program = env().compile(source).map_err(|errors| {
            errors
                .errors
                .iter()
                .map(|e| {
                    let line = usize::try_from(e.pos.0).unwrap_or(1).max(1);
                    let column = usize::try_from(e.pos.1).unwrap_or(1).max(1);
                    let msg = e.msg.strip_prefix("Syntax error: ").unwrap_or(&e.msg).to_owned();
                    (line, column, msg)
                })
                .collect::<Vec<_>>()
        })?;
        let refs = program.references();
        let mut needs = 0;
        for (name, bit) in [("task", VAR_TASK), ("agent", VAR_AGENT), ("tool", VAR_TOOL), ("usage", VAR_USAGE)] {
            if refs.has_variable(name) {
                needs |= bit;
            }
        }
        Ok(Self { source: source.to_owned(), program, needs })
    }

    /// The condition's value: `Err` when it cannot be evaluated or is not a boolean.
    pub(crate) fn eval(&self, ctx: &Context<'_, '_>) -> Result<bool, String> {
        match self.program.execute(ctx) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("it evaluated to {} instead of true or false", kind(&other))),
            Err(e) => Err(e.to_string()),
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::List(_) => "a list",
        Value::Map(_) => "a map",
        Value::Int(_) | Value::UInt(_) => "an integer",
        Value::Float(_) => "a number",
        Value::String(_) => "a string",
        Value::Bytes(_) => "bytes",
        Value::Null => "null",
        _ => "a value",
    }
}

/// Which fact variables an input provides (`VAR_*` bits).
pub(crate) fn available(input: &DecisionInput) -> u8 {
    let mut bits = 0;
    if input.task.is_some() {
        bits |= VAR_TASK;
    }
    if input.agent.is_some() {
        bits |= VAR_AGENT;
    }
    if input.tool.is_some() {
        bits |= VAR_TOOL;
    }
    if input.usage.is_some() {
        bits |= VAR_USAGE;
    }
    bits
}

/// The evaluation context of an input: `stage`, and those of `task`, `agent`, `tool`, `usage`
/// that are in `needs` (`VAR_*` bits) and that the input has. Optional tool fields are absent
/// keys when unknown (`has(tool.command)`).
pub(crate) fn context(input: &DecisionInput, needs: u8) -> Context<'static, 'static> {
    let mut ctx = Context::with_env(Arc::clone(env()));
    ctx.add_variable_from_value("stage", input.stage.as_str());
    if let Some(t) = input.task.as_ref().filter(|_| needs & VAR_TASK != 0) {
        ctx.add_variable_from_value("task", task_value(t));
    }
    if let Some(a) = input.agent.as_ref().filter(|_| needs & VAR_AGENT != 0) {
        ctx.add_variable_from_value("agent", agent_value(a));
    }
    if let Some(t) = input.tool.as_ref().filter(|_| needs & VAR_TOOL != 0) {
        ctx.add_variable_from_value("tool", tool_value(t));
    }
    if let Some(u) = input.usage.as_ref().filter(|_| needs & VAR_USAGE != 0) {
        ctx.add_variable_from_value("usage", usage_value(u));
    }
    ctx
}

fn s(v: &str) -> Value {
    Value::String(Arc::new(v.to_owned()))
}

fn list(v: &[String]) -> Value {
    Value::List(Arc::new(v.iter().map(|x| s(x)).collect()))
}

fn map(entries: Vec<(&str, Value)>) -> Value {
    let m: HashMap<String, Value> = entries.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    Value::from(m)
}

fn task_value(t: &TaskFacts) -> Value {
    map(vec![
        ("id", s(&t.id)),
        ("type", s(&t.task_type)),
        ("priority", Value::Int(t.priority)),
        ("labels", list(&t.labels)),
        ("title", s(&t.title)),
    ])
}

fn agent_value(a: &AgentFacts) -> Value {
    map(vec![("name", s(&a.name)), ("labels", list(&a.labels)), ("backend", s(&a.backend))])
}

fn tool_value(t: &ToolFacts) -> Value {
    let mut e = vec![("name", s(&t.name))];
    if let Some(c) = &t.command {
        e.push(("command", s(c)));
    }
    if let Some(p) = &t.path {
        e.push(("path", s(p)));
    }
    if let Some(h) = &t.host {
        e.push(("host", s(h)));
    }
    if let Some(a) = t.access {
        e.push(("access", s(a.as_str())));
    }
    map(e)
}

fn usage_value(u: &UsageFacts) -> Value {
    map(vec![
        ("tokens", Value::Int(i64::try_from(u.tokens).unwrap_or(i64::MAX))),
        ("cost_usd", Value::Float(u.cost_usd)),
        ("elapsed_secs", Value::Float(u.elapsed_secs)),
        ("attempts", Value::Int(i64::from(u.attempts))),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::Stage;

    fn input() -> DecisionInput {
        DecisionInput::new(Stage::Tool)
            .with_task(TaskFacts {
                id: "t1".into(),
                task_type: "deploy".into(),
                priority: 7,
                labels: vec!["prod".into(), "web".into()],
                title: "ship it".into(),
            })
            .with_tool(ToolFacts { name: "shell".into(), command: Some("ls".into()), ..ToolFacts::default() })
    }

    fn eval(src: &str) -> Result<bool, String> {
        Condition::compile(src).unwrap().eval(&context(&input(), 0xff))
    }

    #[test]
    fn the_issue_example_and_friends() {
        assert_eq!(eval(r#"task.priority > 5 && "prod" in task.labels"#), Ok(true));
        assert_eq!(eval(r#"task.priority > 7 && "prod" in task.labels"#), Ok(false));
        assert_eq!(eval(r#"task.type == "deploy" && stage == "tool""#), Ok(true));
        assert_eq!(eval(r#"has(tool.command) && !has(tool.path)"#), Ok(true));
        assert_eq!(eval(r#"task.labels.exists(l, l.startsWith("we"))"#), Ok(true));
        assert_eq!(eval(r#"tool.command.matches("^l")"#), Ok(true));
        assert_eq!(eval(r#"task.title.upperAscii() == "SHIP IT""#), Ok(true));
    }

    #[test]
    fn errors_are_errors() {
        assert!(eval("task.missing > 1").unwrap_err().contains("missing"));
        assert!(eval("usage.tokens > 1").unwrap_err().contains("usage"));
        assert!(eval("task.priority").unwrap_err().contains("integer"));
        assert!(eval("task.priority / 0 == 1").is_err());
    }

    proptest::proptest! {
        #[test]
        fn compiling_and_running_any_text_never_panics(src in "[a-z0-9_ .()\\[\\]{}<>=!&|+*/%?:,'\"-]{0,40}|\\PC{0,40}") {
            if let Ok(c) = Condition::compile(&src) {
                let _ = c.eval(&context(&input(), 0xff));
            }
        }

        #[test]
        fn running_any_expression_of_known_tokens_never_panics(
            tokens in proptest::collection::vec(proptest::sample::select(TOKENS), 1..12)
        ) {
            if let Ok(c) = Condition::compile(&tokens.join(" ")) {
                let _ = c.eval(&context(&input(), 0xff));
            }
        }
    }

    const TOKENS: &[&str] = &[
        "task.priority",
        "task.labels",
        "task.title",
        "tool.command",
        "tool.path",
        "usage.tokens",
        "stage",
        "1",
        "0",
        "-1",
        "9223372036854775807",
        "1.5",
        "'a'",
        "'[('",
        "true",
        "null",
        "&&",
        "||",
        ">",
        "<",
        "==",
        "in",
        "+",
        "-",
        "*",
        "/",
        "%",
        "!",
        "?",
        ":",
        "(",
        ")",
        "[",
        "]",
        "{",
        "}",
        ",",
        "size(",
        "has(",
        ".exists(x,",
        "x",
        ".matches(",
        ".startsWith(",
        "int(",
        "string(",
        "double(",
        ".split(",
        ".map(y,",
        "y",
    ];

    #[test]
    fn references_and_compile_errors() {
        let c = Condition::compile("usage.cost_usd > 1.0 && agent.name == 'x'").unwrap();
        assert_eq!(c.needs, VAR_USAGE | VAR_AGENT);
        let e = Condition::compile("task.priority > ").unwrap_err();
        assert_eq!((e[0].0, e[0].1), (1, 17));
        assert!(e[0].2.contains("mismatched input"), "{:?}", e);
    }
}
