//! Connections: URL parsing and redaction, error mapping, prepared-statement caches and a small
//! blocking pool.
//!
//! Every call into the synchronous `postgres` client must run outside the async runtime's worker
//! threads (it blocks on a runtime of its own): on the writer thread, in `spawn_blocking`, or on a
//! plain thread. That includes dropping a `postgres::Client`, which closes it by blocking.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use descartes_core::StoreError;
use postgres::error::SqlState;
use postgres::{Client, Config, GenericClient, NoTls, Statement};

/// How a store talks to the server.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Most connections the pool opens for reads and task operations (the event writer has one
    /// more of its own).
    pub pool_size: usize,
    /// `synchronous_commit` of every connection. `true` (the default): a commit returns once its
    /// WAL is flushed, so appends and task changes are durable on return. `false`: the server
    /// may lose the last few hundred milliseconds of commits in a server crash (never
    /// corrupting anything); for tests that do not test durability.
    pub synchronous_commit: bool,
    /// How long opening a connection may take (unless the URL says `connect_timeout`).
    pub connect_timeout: Duration,
    /// How long an operation waits for a free pooled connection.
    pub pool_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            pool_size: 8,
            synchronous_commit: true,
            connect_timeout: Duration::from_secs(10),
            pool_timeout: Duration::from_secs(30),
        }
    }
}

/// Where the store connects, and how to keep the password out of messages.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub config: Config,
    /// `postgres://user@host:port/db`, never with the password.
    pub display: String,
    secret: Option<String>,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, StoreError> {
        let mut config = Config::from_str(url).map_err(|e| StoreError::Open {
            path: redact_url(url),
            message: format!(
                "invalid PostgreSQL URL ({}); expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE",
                scrub(&e.to_string(), password_in(url).as_deref())
            ),
        })?;
        if config.get_application_name().is_none() {
            config.application_name("descartes");
        }
        let secret = config.get_password().map(|p| String::from_utf8_lossy(p).into_owned()).filter(|p| !p.is_empty());
        let display = describe(&config);
        Ok(Target { config, display, secret })
    }

    /// `message` with the password (if any) replaced.
    pub fn scrub(&self, message: &str) -> String {
        scrub(message, self.secret.as_deref())
    }

    /// A `postgres::Error` as a store error, with a hint for connection failures.
    pub fn error(&self, e: &postgres::Error) -> StoreError {
        let busy = is_transient(e);
        let mut message = self.scrub(&describe_error(e));
        if is_connection_error(e) {
            message.push_str(&format!(
                " (PostgreSQL at {}: check that the server is running and reachable and that the URL is right)",
                self.display
            ));
        }
        StoreError::Io { message, busy }
    }

    pub fn open_error(&self, e: &postgres::Error) -> StoreError {
        let mut message = self.scrub(&describe_error(e));
        if is_connection_error(e) {
            message.push_str(
                "; check that the server is running and reachable, and the user, password and database in the URL",
            );
        }
        StoreError::Open { path: self.display.clone(), message }
    }
}

fn describe(config: &Config) -> String {
    let user = config.get_user().map(|u| format!("{u}@")).unwrap_or_default();
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config.get_dbname().or(config.get_user()).unwrap_or("postgres");
    format!("postgres://{user}{host}:{port}/{db}")
}

fn describe_error(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{}: {} ({})", db.severity(), db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                s.push_str(&format!("; {detail}"));
            }
            s
        }
        None => {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(inner) = source {
                let text = inner.to_string();
                if !s.contains(&text) {
                    s.push_str(&format!(": {text}"));
                }
                source = inner.source();
            }
            s
        }
    }
}

fn password_in(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let userinfo = authority.rsplit_once('@')?.0;
    userinfo.split_once(':').map(|(_, p)| p.to_owned()).filter(|p| !p.is_empty())
}

fn scrub(message: &str, secret: Option<&str>) -> String {
    match secret {
        Some(s) if !s.is_empty() => message.replace(s, "***"),
        _ => message.to_owned(),
    }
}

/// The URL with any password replaced by `***` (for messages about URLs that do not parse).
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        if let Some((userinfo, host)) = authority.rsplit_once('@') {
            let user = userinfo.split_once(':').map(|(u, _)| format!("{u}:***")).unwrap_or_else(|| userinfo.to_owned());
            return format!("{scheme}://{user}@{host}{}", redact_params(tail));
        }
        return format!("{scheme}://{authority}{}", redact_params(tail));
    }
    redact_params(url)
}

/// `password=...` (key-value strings and URL query parameters) replaced by `password=***`.
fn redact_params(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("password=") {
        out.push_str(&rest[..i + "password=".len()]);
        out.push_str("***");
        let after = &rest[i + "password=".len()..];
        let end = after.find([' ', '&']).unwrap_or(after.len());
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// Errors a retry may fix: serialization failures, deadlocks, lock timeouts, unique violations
/// of concurrent inserts, and connection trouble.
pub(crate) fn is_transient(e: &postgres::Error) -> bool {
    is_conflict(e) || is_connection_error(e)
}

/// Errors that mean "another transaction got in the way; this one was rolled back".
pub(crate) fn is_conflict(e: &postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE
            || *c == SqlState::T_R_DEADLOCK_DETECTED
            || *c == SqlState::LOCK_NOT_AVAILABLE
            || *c == SqlState::UNIQUE_VIOLATION
    )
}

pub(crate) fn is_connection_error(e: &postgres::Error) -> bool {
    match e.code() {
        Some(c) => {
            c.code().starts_with("08")
                || *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
                || *c == SqlState::TOO_MANY_CONNECTIONS
        }
        // No SQLSTATE: the client's own error kinds, told apart by their fixed messages.
        None => {
            let text = e.to_string();
            e.is_closed()
                || [
                    "error communicating with the server",
                    "error connecting to server",
                    "timeout waiting for server",
                    "error performing TLS handshake",
                ]
                .iter()
                .any(|k| text.starts_with(k))
        }
    }
}

/// One connection and its prepared statements.
pub(crate) struct Conn {
    pub client: Client,
    pub stmts: StmtCache,
    /// When the connection was last known to work.
    pub last_used: std::time::Instant,
}

/// A statement: fixed SQL text, or a template whose row limit is written into the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sql {
    Fixed(&'static str),
    /// A template containing [`LIMIT_MARK`] once, and the limit to write there.
    ///
    /// Statements are planned once per connection (`force_generic_plan`), and a generic plan
    /// cannot know a `LIMIT $n`: PostgreSQL then plans for 10% of the rows, which for a queue
    /// scan means reading and sorting the whole queue (an external sort of tens of thousands
    /// of rows on every claim) instead of walking the queue's index for the first few. With the
    /// limit in the text the plan is the right one for it.
    Limit(&'static str, i64),
}

/// Where [`Sql::Limit`] writes its limit.
pub(crate) const LIMIT_MARK: &str = "{limit}";

/// How many [`Sql::Limit`] statements a connection keeps prepared (most recently used).
const MAX_LIMITED: usize = 32;

impl Sql {
    /// The SQL text to prepare.
    pub fn text(self) -> std::borrow::Cow<'static, str> {
        match self {
            Sql::Fixed(sql) => sql.into(),
            Sql::Limit(template, limit) => template.replace(LIMIT_MARK, &limit.max(0).to_string()).into(),
        }
    }
}

impl From<&'static str> for Sql {
    fn from(sql: &'static str) -> Sql {
        Sql::Fixed(sql)
    }
}

/// Prepared statements of one connection, by SQL text.
#[derive(Default)]
pub(crate) struct StmtCache {
    fixed: HashMap<&'static str, Statement>,
    /// By template and limit, the most recently used last.
    limited: Vec<((&'static str, i64), Statement)>,
}

impl StmtCache {
    pub fn get(&mut self, c: &mut impl GenericClient, sql: impl Into<Sql>) -> Result<Statement, postgres::Error> {
        let sql = sql.into();
        match sql {
            Sql::Fixed(sql) => {
                if let Some(s) = self.fixed.get(sql) {
                    return Ok(s.clone());
                }
                let s = c.prepare(sql)?;
                self.fixed.insert(sql, s.clone());
                Ok(s)
            }
            Sql::Limit(template, limit) => {
                let key = (template, limit);
                if let Some(i) = self.limited.iter().position(|(k, _)| *k == key) {
                    let entry = self.limited.remove(i);
                    let s = entry.1.clone();
                    self.limited.push(entry);
                    return Ok(s);
                }
                debug_assert!(template.contains(LIMIT_MARK), "a limited statement without {LIMIT_MARK}");
                let s = c.prepare(&sql.text())?;
                if self.limited.len() >= MAX_LIMITED {
                    // Dropping the statement closes it on the server.
                    self.limited.remove(0);
                }
                self.limited.push((key, s.clone()));
                Ok(s)
            }
        }
    }
}

impl Conn {
    /// Opens a connection (blocking: call off the async runtime).
    pub fn open(target: &Target, options: &PgOptions) -> Result<Conn, postgres::Error> {
        let mut config = target.config.clone();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.connect_timeout);
        }
        let mut client = config.connect(NoTls)?;
        if !options.synchronous_commit {
            client.batch_execute("SET synchronous_commit = off")?;
        }
        // Our statements are prepared once per connection and look rows up by key: plan them
        // once (re-planning the larger ones on every execution costs more than running them),
        // and never compile them (JIT costs hundreds of milliseconds, and the task groups'
        // index-walk settings raise plan costs past its threshold; see `tasks::BEGIN`). Each
        // setting on its own: a server that lacks one (before 11 or 12) still gets the other.
        for setting in ["SET plan_cache_mode = force_generic_plan", "SET jit = off"] {
            if let Err(e) = client.batch_execute(setting) {
                if client.is_closed() {
                    return Err(e);
                }
                tracing::debug!(error = %e, setting, "connection setting not applied");
            }
        }
        Ok(Conn { client, stmts: StmtCache::default(), last_used: std::time::Instant::now() })
    }

    /// After a pause, checks that the server still has the connection (a restart or an idle
    /// timeout may have ended it), so that work is not sent down a dead connection.
    pub fn alive(&mut self) -> bool {
        if self.last_used.elapsed() < IDLE_CHECK {
            return !self.client.is_closed();
        }
        let ok = self.client.is_valid(Duration::from_secs(5)).is_ok();
        if ok {
            self.last_used = std::time::Instant::now();
        }
        ok
    }
}

/// A connection idle for longer than this is checked before use.
pub(crate) const IDLE_CHECK: Duration = Duration::from_secs(1);

/// A small blocking pool: idle connections are reused, at most `size` are open at once.
pub(crate) struct Pool {
    pub target: Target,
    pub options: PgOptions,
    state: Mutex<PoolState>,
    freed: Condvar,
}

struct PoolState {
    idle: Vec<Conn>,
    open: usize,
}

impl Pool {
    pub fn new(target: Target, options: PgOptions) -> Pool {
        Pool { target, options, state: Mutex::new(PoolState { idle: Vec::new(), open: 0 }), freed: Condvar::new() }
    }

    /// Puts an already open connection in the pool.
    pub fn add(&self, conn: Conn) {
        if let Ok(mut s) = self.state.lock() {
            s.open += 1;
            s.idle.push(conn);
        }
    }

    /// A connection (blocking: call off the async runtime).
    pub fn get(&self) -> Result<Pooled<'_>, StoreError> {
        let closed = || StoreError::Closed;
        let mut state = self.state.lock().map_err(|_| closed())?;
        let deadline = std::time::Instant::now() + self.options.pool_timeout;
        loop {
            if let Some(mut conn) = state.idle.pop() {
                if conn.last_used.elapsed() >= IDLE_CHECK {
                    drop(state);
                    if conn.alive() {
                        return Ok(Pooled { pool: self, conn: Some(conn) });
                    }
                    drop_off_runtime(conn);
                    self.forget();
                    state = self.state.lock().map_err(|_| closed())?;
                    continue;
                }
                return Ok(Pooled { pool: self, conn: Some(conn) });
            }
            if state.open < self.options.pool_size.max(1) {
                state.open += 1;
                drop(state);
                return match Conn::open(&self.target, &self.options) {
                    Ok(conn) => Ok(Pooled { pool: self, conn: Some(conn) }),
                    Err(e) => {
                        self.forget();
                        Err(self.target.error(&e))
                    }
                };
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Err(StoreError::Io {
                    message: format!(
                        "all {} PostgreSQL connections of this store stayed busy for {:?}",
                        self.options.pool_size, self.options.pool_timeout
                    ),
                    busy: true,
                });
            }
            state = self.freed.wait_timeout(state, deadline - now).map_err(|_| closed())?.0;
        }
    }

    fn forget(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.open = s.open.saturating_sub(1);
        }
        self.freed.notify_one();
    }

    fn put_back(&self, mut conn: Conn) {
        if conn.client.is_closed() {
            drop(conn);
            self.forget();
            return;
        }
        conn.last_used = std::time::Instant::now();
        if let Ok(mut s) = self.state.lock() {
            s.idle.push(conn);
        }
        self.freed.notify_one();
    }

    /// Closes the idle connections (on a plain thread: closing blocks).
    pub fn close_idle(&self) {
        let idle = match self.state.lock() {
            Ok(mut s) => {
                let idle = std::mem::take(&mut s.idle);
                s.open = s.open.saturating_sub(idle.len());
                idle
            }
            Err(_) => return,
        };
        drop_off_runtime(idle);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.close_idle();
    }
}

/// Drops `value` on a plain thread (dropping a `postgres::Client` blocks, which must not happen
/// on an async runtime's thread).
pub(crate) fn drop_off_runtime<T: Send + 'static>(value: T) {
    if tokio::runtime::Handle::try_current().is_err() {
        drop(value);
        return;
    }
    match std::thread::Builder::new().name("descartes-pg-close".into()).spawn(move || drop(value)) {
        Ok(handle) => {
            let _ = handle.join();
        }
        // Cannot spawn a thread: leak rather than panic inside the runtime.
        Err(e) => tracing::warn!(error = %e, "cannot close PostgreSQL connections"),
    }
}

/// A pooled connection; goes back to the pool when dropped (unless it broke).
pub(crate) struct Pooled<'a> {
    pool: &'a Pool,
    conn: Option<Conn>,
}

impl std::ops::Deref for Pooled<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        // Always Some until drop.
        self.conn.as_ref().unwrap_or_else(|| unreachable!("pooled connection taken"))
    }
}

impl std::ops::DerefMut for Pooled<'_> {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn.as_mut().unwrap_or_else(|| unreachable!("pooled connection taken"))
    }
}

impl Pooled<'_> {
    /// Closes the connection instead of returning it to the pool.
    pub fn discard(mut self) {
        if let Some(conn) = self.conn.take() {
            drop(conn);
            self.pool.forget();
        }
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.put_back(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("postgres://u:hunter2@h:5/db"), "postgres://u:***@h:5/db");
        assert_eq!(redact_url("postgres://u@h/db?password=hunter2&x=1"), "postgres://u@h/db?password=***&x=1");
        assert_eq!(redact_url("host=h password=hunter2 user=u"), "host=h password=*** user=u");
        assert_eq!(password_in("postgres://u:pw@h/db").as_deref(), Some("pw"));
    }

    #[test]
    fn targets_describe_without_password() {
        let t = Target::parse("postgres://alice:s3cret@db.example:6543/tasks").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.display, "postgres://alice@db.example:6543/tasks");
        assert_eq!(t.scrub("auth failed for s3cret"), "auth failed for ***");
    }

    #[test]
    fn bad_urls_are_open_errors_without_password() {
        let err = Target::parse("postgres://alice:s3cret@host:notaport/db").err().map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(err.contains("invalid PostgreSQL URL"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
    }
}
