//! JSON-RPC over stdio lines, as Codex's `app-server` (no `"jsonrpc"` member) and Gemini CLI's
//! Agent Client Protocol (`"jsonrpc": "2.0"`) speak it: one message per line, requests both
//! ways, each side numbering its own.

use descartes_core::CliEvent;
use serde_json::{Map, Value, json};

use crate::session::{Decoded, parse_json_line};

/// What a JSON-RPC backend does with each kind of message; [`decode_line`] dispatches.
pub trait Handler {
    /// The answer to our request `id`: lines to send next.
    fn response(&mut self, id: u64, result: Result<Value, String>, out: &mut Vec<CliEvent>) -> Vec<String>;
    /// The CLI's request: lines to answer it with now (none when Descartes answers later).
    fn request(&mut self, id: &Value, method: &str, params: &Value, out: &mut Vec<CliEvent>) -> Vec<String>;
    fn notification(&mut self, method: &str, params: &Value, out: &mut Vec<CliEvent>);
}

/// One line of a JSON-RPC CLI: its events and the lines to send back. A line that is not the
/// protocol (a warning printed on stdout) is a notice, not the end of the run.
pub fn decode_line(program: &str, line: &str, handler: &mut dyn Handler) -> Decoded {
    let v = match parse_json_line(program, line) {
        Ok(v) => v,
        Err(message) => return Decoded::events(vec![CliEvent::Notice(message)]),
    };
    let mut events = Vec::new();
    let replies = match classify(v) {
        Some(Incoming::Response { id, result }) => handler.response(id, result, &mut events),
        Some(Incoming::Request { id, method, params }) => handler.request(&id, &method, &params, &mut events),
        Some(Incoming::Notification { method, params }) => {
            handler.notification(&method, &params, &mut events);
            Vec::new()
        }
        None => Vec::new(),
    };
    Decoded { events, replies }
}

/// One line from the CLI.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// The answer to one of our requests.
    Response {
        id: u64,
        result: Result<Value, String>,
    },
    /// The CLI asks us (a permission request): answer with [`Rpc::response`] and its `id`.
    Request {
        id: Value,
        method: String,
        params: Value,
    },
    Notification {
        method: String,
        params: Value,
    },
}

/// The message kind of a parsed line; `None` for a JSON object that is none of them.
pub fn classify(mut v: Map<String, Value>) -> Option<Incoming> {
    let params = v.remove("params").unwrap_or(Value::Null);
    let method = v.get("method").and_then(Value::as_str).map(str::to_owned);
    match (v.remove("id"), method) {
        (Some(id), Some(method)) => Some(Incoming::Request { id, method, params }),
        (None, Some(method)) => Some(Incoming::Notification { method, params }),
        (Some(id), None) => {
            let id = id.as_u64()?;
            let result = match v.remove("error") {
                Some(e) => Err(e.get("message").and_then(Value::as_str).map_or_else(|| e.to_string(), str::to_owned)),
                None => Ok(v.remove("result").unwrap_or(Value::Null)),
            };
            Some(Incoming::Response { id, result })
        }
        (None, None) => None,
    }
}

/// Our side of the conversation: numbers our requests and writes the lines.
#[derive(Debug, Clone, Default)]
pub struct Rpc {
    /// Whether lines carry `"jsonrpc": "2.0"`.
    pub versioned: bool,
    next_id: u64,
}

impl Rpc {
    pub fn new(versioned: bool) -> Self {
        Self { versioned, next_id: 0 }
    }

    fn line(&self, mut m: Map<String, Value>) -> String {
        if self.versioned {
            m.insert("jsonrpc".into(), json!("2.0"));
        }
        Value::Object(m).to_string()
    }

    /// A request: its id and its line.
    pub fn request(&mut self, method: &str, params: Value) -> (u64, String) {
        self.next_id += 1;
        let id = self.next_id;
        let mut m = Map::new();
        m.insert("id".into(), json!(id));
        m.insert("method".into(), json!(method));
        m.insert("params".into(), params);
        (id, self.line(m))
    }

    pub fn notification(&self, method: &str, params: Option<Value>) -> String {
        let mut m = Map::new();
        m.insert("method".into(), json!(method));
        if let Some(p) = params {
            m.insert("params".into(), p);
        }
        self.line(m)
    }

    /// The answer to the CLI's request `id`.
    pub fn response(&self, id: &Value, result: Value) -> String {
        let mut m = Map::new();
        m.insert("id".into(), id.clone());
        m.insert("result".into(), result);
        self.line(m)
    }

    /// An error answer to a request we do not serve.
    pub fn error(&self, id: &Value, code: i64, message: &str) -> String {
        let mut m = Map::new();
        m.insert("id".into(), id.clone());
        m.insert("error".into(), json!({"code": code, "message": message}));
        self.line(m)
    }
}

/// The request id of a CLI request as Descartes keeps it (a string), and back.
pub fn id_key(id: &Value) -> String {
    match id {
        Value::String(s) => format!("s:{s}"),
        other => other.to_string(),
    }
}

/// What the decoders' tests share.
#[cfg(test)]
pub(crate) mod testing {
    use descartes_core::CliRequest;
    use serde_json::Value;

    /// A request in `/w`, continuing `resume` if given.
    pub fn request(resume: Option<&str>, model: Option<&str>) -> CliRequest {
        CliRequest {
            prompt: "please do it".into(),
            resume_session: resume.map(str::to_owned),
            cwd: "/w".into(),
            model: model.map(str::to_owned),
            system_prompt: None,
            auto_approve: false,
            max_cost_usd: None,
        }
    }

    /// A line sent to the CLI, parsed.
    pub fn sent(line: &str) -> Value {
        serde_json::from_str(line).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(s: &str) -> Map<String, Value> {
        serde_json::from_str(s).unwrap_or_default()
    }

    #[test]
    fn classifies_and_writes() {
        assert_eq!(
            classify(obj(r#"{"id":2,"result":{"a":1}}"#)),
            Some(Incoming::Response { id: 2, result: Ok(json!({"a":1})) })
        );
        assert_eq!(
            classify(obj(r#"{"jsonrpc":"2.0","id":3,"error":{"code":-1,"message":"no"}}"#)),
            Some(Incoming::Response { id: 3, result: Err("no".into()) })
        );
        assert!(matches!(classify(obj(r#"{"id":0,"method":"x","params":{}}"#)), Some(Incoming::Request { .. })));
        assert!(matches!(classify(obj(r#"{"method":"n"}"#)), Some(Incoming::Notification { .. })));
        assert_eq!(classify(obj(r#"{"other":1}"#)), None);
        let mut r = Rpc::new(true);
        let (id, line) = r.request("initialize", json!({}));
        assert_eq!(id, 1);
        assert_eq!(serde_json::from_str::<Value>(&line).unwrap()["jsonrpc"], "2.0");
        assert!(!Rpc::new(false).notification("initialized", None).contains("jsonrpc"));
        assert_eq!(id_key(&json!(4)), "4");
        assert_eq!(id_key(&json!("4")), "s:4");
    }
}
