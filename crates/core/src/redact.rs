//! The one redactor: every secret value Descartes knows (API keys from the environment or
//! config, passwords in URLs) is registered once, and everything Descartes writes or prints
//! (events, errors, `config show`) passes through [`redact`], which replaces each occurrence with
//! `[REDACTED]`. A registry for the process (secrets are facts of the process's environment, not
//! of one component); no IO.

use std::borrow::Cow;
use std::sync::RwLock;

use descartes_protocol::{EventData, NewEvent};

/// What a secret is replaced with.
pub const MASK: &str = "[REDACTED]";

/// Shorter values are not registered: they would mask ordinary words.
const MIN_LEN: usize = 8;

static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Registers a secret value (ignored when shorter than 8 characters or already known).
pub fn register(secret: &str) {
    let secret = secret.trim();
    if secret.len() < MIN_LEN {
        return;
    }
    if let Ok(mut list) = SECRETS.write()
        && !list.iter().any(|s| s == secret)
    {
        list.push(secret.to_owned());
        // Longest first, so a secret containing another is masked whole.
        list.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }
}

/// Registers the password (and a user name that looks like a key) of a URL such as
/// `http://user:KEY@host`.
pub fn register_url(url: &str) {
    let Some((_, rest)) = url.split_once("://") else { return };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let Some((userinfo, _)) = authority.rsplit_once('@') else { return };
    match userinfo.split_once(':') {
        Some((user, password)) => {
            register(password);
            register(user);
        }
        None => register(userinfo),
    }
}

/// Whether any secret is registered.
pub fn active() -> bool {
    SECRETS.read().map(|l| !l.is_empty()).unwrap_or(false)
}

/// `text` with every registered secret replaced by [`MASK`].
pub fn redact(text: &str) -> Cow<'_, str> {
    let Ok(list) = SECRETS.read() else { return Cow::Borrowed(text) };
    let mut out = Cow::Borrowed(text);
    for secret in list.iter() {
        if out.contains(secret.as_str()) {
            out = Cow::Owned(out.replace(secret.as_str(), MASK));
        }
    }
    out
}

/// Removes the credentials of a URL (`http://user:KEY@host` → `http://[REDACTED]@host`).
pub fn redact_url(url: &str) -> Cow<'_, str> {
    let Some((scheme, rest)) = url.split_once("://") else { return redact(url) };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => Cow::Owned(format!("{scheme}://{MASK}{}", &rest[at..])),
        None => redact(url),
    }
}

/// The event with every registered secret in its payload masked (the payload is rebuilt from
/// its redacted JSON; unchanged when it holds no secret).
pub fn redact_event(mut event: NewEvent) -> NewEvent {
    if !active() {
        return event;
    }
    let Ok(json) = event.data.to_json() else { return event };
    if let Cow::Owned(clean) = redact(&json)
        && let Ok(data) = EventData::from_parts(event.data.kind(), &clean)
    {
        event.data = data;
    }
    event
}

/// An event store whose appended events pass through [`redact_event`] first: how no secret
/// reaches the log (and everything read from it: `logs`, `providers`, the audit trail).
pub struct RedactingStore(pub std::sync::Arc<dyn crate::EventStore>);

#[async_trait::async_trait]
impl crate::EventStore for RedactingStore {
    async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<descartes_protocol::Event>, crate::StoreError> {
        self.0.append(events.into_iter().map(redact_event).collect()).await
    }

    fn append_deferred(&self, events: Vec<NewEvent>) -> crate::DeferredAppend {
        self.0.append_deferred(events.into_iter().map(redact_event).collect())
    }

    async fn read_run(
        &self,
        run_id: &descartes_protocol::RunId,
        after: descartes_protocol::Seq,
    ) -> Result<Vec<descartes_protocol::Event>, crate::StoreError> {
        self.0.read_run(run_id, after).await
    }

    async fn read_all(
        &self,
        after: descartes_protocol::Seq,
        limit: usize,
    ) -> Result<Vec<descartes_protocol::Event>, crate::StoreError> {
        self.0.read_all(after, limit).await
    }

    async fn last_seq(&self) -> Result<descartes_protocol::Seq, crate::StoreError> {
        self.0.last_seq().await
    }

    async fn list_runs(&self) -> Result<Vec<crate::RunSummary>, crate::StoreError> {
        self.0.list_runs().await
    }

    async fn find_runs(&self, prefix: &str) -> Result<Vec<descartes_protocol::RunId>, crate::StoreError> {
        self.0.find_runs(prefix).await
    }

    async fn run_summary(
        &self,
        run_id: &descartes_protocol::RunId,
    ) -> Result<Option<crate::RunSummary>, crate::StoreError> {
        self.0.run_summary(run_id).await
    }

    async fn wait_for_events(&self, after: descartes_protocol::Seq, timeout: std::time::Duration) {
        self.0.wait_for_events(after, timeout).await
    }

    async fn replay_run(&self, run_id: &descartes_protocol::RunId) -> Result<crate::RunState, crate::CoreError> {
        self.0.replay_run(run_id).await
    }

    async fn flush(&self) -> Result<(), crate::StoreError> {
        self.0.flush().await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn registered_secrets_are_masked_everywhere() {
        register("sk-redact-test-0123456789");
        register("short");
        register_url("http://someone:pw-redact-test-987654@host:1/v1");
        let text = "Authorization: Bearer sk-redact-test-0123456789; url http://someone:pw-redact-test-987654@host";
        let out = redact(text);
        assert!(!out.contains("sk-redact-test") && !out.contains("pw-redact-test"), "{out}");
        assert!(out.contains("Bearer [REDACTED]"), "{out}");
        assert_eq!(redact("short words stay"), "short words stay");
        assert_eq!(redact_url("http://a:b@h:1/x?y"), "http://[REDACTED]@h:1/x?y");
        assert_eq!(redact_url("https://h/p@q"), "https://h/p@q");
        let e = NewEvent::new(
            &descartes_protocol::RunId::from("r"),
            descartes_protocol::RunFailed {
                error: "401: key sk-redact-test-0123456789 invalid".into(),
                kind: "provider".into(),
                retryable: false,
            },
        );
        let e = redact_event(e);
        assert!(e.data.to_json().unwrap().contains("key [REDACTED] invalid"));
    }
}
