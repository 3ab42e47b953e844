//! The task control plane's rules: state transitions, leases with fencing, readiness, the
//! dependency graph, path locks, retries with backoff.
//!
//! The rules are written once, here, as synchronous operations over a [`TaskTxn`]: one
//! database transaction as seen by the rules (read tasks, write tasks, append events). Each
//! store implements `TaskTxn` for its own transaction type and runs these operations inside a
//! transaction, so SQLite and PostgreSQL follow the very same rules. Every state change appends
//! an event to the task's stream (the stream id is the task id) in the same transaction.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use async_trait::async_trait;
use descartes_protocol::{
    Claim, EventData, NewTask, Seq, Task, TaskBlocked, TaskCancelled, TaskClaimed, TaskCompleted, TaskCreated,
    TaskDependencyAdded, TaskFailed, TaskLeaseExpired, TaskReleased, TaskRetried, TaskRouted, TaskStarted, TaskStatus,
    TaskUnblocked, Timestamp,
};

use crate::StoreError;

/// Default `max_attempts` of a task.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Longest backoff between attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Errors of task operations.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// Not retryable.
    #[error("no task with id {0}; `descartes task list` shows the tasks")]
    NotFound(String),
    /// The token is not the task's current lease (another worker took it over, or it was
    /// released). Not retryable: the caller lost the task. `current` says what holds the task
    /// now, never the live token.
    #[error("stale fencing token {given} for task {id} ({current}); this worker no longer holds the task")]
    StaleToken { id: String, given: i64, current: String },
    /// The lease ran out before this write. Not retryable.
    #[error("the lease of task {id} expired at {expired_at}; the task may be claimed by another worker")]
    LeaseExpired { id: String, expired_at: Timestamp },
    /// The operation is not allowed in the task's status. Not retryable.
    #[error("cannot {action} task {id}: it is {status}")]
    IllegalTransition { id: String, action: &'static str, status: TaskStatus },
    /// A dependency does not exist. Not retryable.
    #[error("dependency {0} does not exist")]
    MissingDependency(String),
    /// Adding the dependency would make a cycle (the path is given). Not retryable.
    #[error("dependency cycle refused: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
    /// A lock glob does not parse. Not retryable.
    #[error("invalid lock glob {glob:?}: {message}")]
    InvalidGlob { glob: String, message: String },
    /// Other invalid input (empty title, zero attempts, duplicate id, bad TTL). Not retryable.
    #[error("{0}")]
    Invalid(String),
    /// The store failed; retryable when the store says so.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl TaskError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, TaskError::Store(e) if e.is_retryable())
    }
}

/// The time, from outside (tests use a manual clock).
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// Filter of `task list`.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    pub status: Option<TaskStatus>,
    pub label: Option<String>,
}

/// Persistent tasks with leases. Implemented by each store; every implementation must follow
/// the rules of this module (the shared test suite checks it).
#[async_trait]
pub trait TaskStore: Send + Sync {
    async fn create_task(&self, new: NewTask) -> Result<Task, TaskError>;
    /// Makes `id` depend on `dependency`; refuses cycles.
    async fn add_dependency(&self, id: &str, dependency: &str) -> Result<Task, TaskError>;
    async fn get_task(&self, id: &str) -> Result<Task, TaskError>;
    /// Tasks, oldest first.
    async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<Task>, TaskError>;
    /// Claims up to `max` ready tasks, highest priority first (oldest first among equals),
    /// with a lease of `ttl`. Expired leases are reaped first.
    async fn claim(&self, worker: &str, ttl: Duration, max: usize) -> Result<Vec<Claim>, TaskError>;
    /// Claims the task `id` if it is ready now, routed to `agent` (name, most tasks at once)
    /// when given (see [`claim_one`]); None when it is not ready or the agent is full.
    async fn claim_one(
        &self,
        id: &str,
        worker: &str,
        ttl: Duration,
        agent: Option<(&str, u32)>,
    ) -> Result<Option<Claim>, TaskError>;
    /// Queued tasks past their backoff, highest priority first, oldest first among equals, at
    /// most `limit` (dependencies and locks are checked when one is claimed).
    async fn peek_queued(&self, limit: usize) -> Result<Vec<Task>, TaskError>;
    /// How many leased tasks each agent holds.
    async fn agent_load(&self) -> Result<std::collections::HashMap<String, u32>, TaskError>;
    async fn start(&self, id: &str, token: i64) -> Result<Task, TaskError>;
    async fn heartbeat(&self, id: &str, token: i64, ttl: Duration) -> Result<Task, TaskError>;
    async fn complete(&self, id: &str, token: i64, result: Option<String>) -> Result<Task, TaskError>;
    /// Completes several leased tasks, in one commit where the store can. Each task's own
    /// refusal (stale token, expired lease, ...) is in its place in the result and does not
    /// stop the others; the outer error is the store's.
    async fn complete_many(
        &self,
        items: Vec<(String, i64, Option<String>)>,
    ) -> Result<Vec<Result<Task, TaskError>>, TaskError> {
        let mut out = Vec::with_capacity(items.len());
        for (id, token, result) in items {
            match self.complete(&id, token, result).await {
                Err(e @ TaskError::Store(_)) => return Err(e),
                other => out.push(other),
            }
        }
        Ok(out)
    }
    async fn fail(&self, id: &str, token: i64, reason: &str) -> Result<Task, TaskError>;
    /// Gives a leased task back without charging an attempt (graceful shutdown).
    async fn release(&self, id: &str, token: i64) -> Result<Task, TaskError>;
    async fn cancel(&self, id: &str) -> Result<Task, TaskError>;
    async fn retry(&self, id: &str) -> Result<Task, TaskError>;
    /// Expires every lease that ran out; returns the tasks it changed.
    async fn reap_expired(&self) -> Result<Vec<Task>, TaskError>;
}

/// One transaction, as the rules see it.
pub trait TaskTxn {
    fn get(&mut self, id: &str) -> Result<Option<Task>, TaskError>;
    /// Inserts or replaces a task.
    fn put(&mut self, task: &Task) -> Result<(), TaskError>;
    /// Ids of the tasks that depend on `id`.
    fn dependents(&mut self, id: &str) -> Result<Vec<String>, TaskError>;
    /// Tasks holding a lease (claimed or running).
    fn leased(&mut self) -> Result<Vec<Task>, TaskError>;
    /// The lock globs of leased tasks that hold any (stores can answer this without decoding
    /// whole tasks).
    fn leased_locks(&mut self) -> Result<Vec<Vec<String>>, TaskError> {
        Ok(self.leased()?.into_iter().filter(|t| !t.locks.is_empty()).map(|t| t.locks).collect())
    }
    /// Queued tasks whose `not_before` has passed, highest priority first, oldest first among
    /// equals, at most `limit` (dependencies and locks are checked by the rules).
    fn queued(&mut self, now: Timestamp, limit: usize) -> Result<Vec<Task>, TaskError>;
    /// Leased tasks whose lease ended before `now`.
    fn expired(&mut self, now: Timestamp) -> Result<Vec<Task>, TaskError>;
    /// Appends an event to the task's stream; returns its `seq`.
    fn append(&mut self, task_id: &str, data: EventData) -> Result<Seq, TaskError>;
    /// The next fencing token: strictly greater than every token handed out before.
    fn next_token(&mut self) -> Result<i64, TaskError>;
    /// How many leased tasks are routed to `agent`.
    fn leased_by_agent(&mut self, agent: &str) -> Result<u32, TaskError>;
    /// A hint that up to `n` tokens will be asked for: a store may take them from its counter
    /// at once (tokens it does not hand out are skipped; tokens only need to increase).
    fn reserve_tokens(&mut self, _n: usize) -> Result<(), TaskError> {
        Ok(())
    }
}

/// Backoff before attempt `attempts + 1`: 1 s, 2 s, 4 s, ... at most [`MAX_BACKOFF`].
pub fn backoff(attempts: u32) -> Duration {
    let secs = 1u64.checked_shl(attempts.saturating_sub(1)).unwrap_or(u64::MAX);
    Duration::from_secs(secs).min(MAX_BACKOFF)
}

fn plus(t: Timestamp, d: Duration) -> Timestamp {
    Timestamp(t.0.saturating_add(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)))
}

/// Whether two sets of path globs may cover a common path. Conservative: when in doubt, they
/// conflict (two tasks then simply do not run at once).
pub fn locks_conflict(a: &[String], b: &[String]) -> bool {
    a.iter().any(|x| b.iter().any(|y| globs_overlap(x, y)))
}

fn globs_overlap(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    let matches = |glob: &str, path: &str| {
        globset::GlobBuilder::new(glob)
            .literal_separator(true)
            .build()
            .map(|g| g.compile_matcher().is_match(path))
            .unwrap_or(true)
    };
    if matches(a, b) || matches(b, a) {
        return true;
    }
    // Both have wildcards: they overlap when their literal prefixes are compatible.
    let prefix = |g: &str| g.find(['*', '?', '[', '{']).map(|i| g[..i].to_owned()).unwrap_or_else(|| g.to_owned());
    let (pa, pb) = (prefix(a), prefix(b));
    let both_wild = pa.len() < a.len() && pb.len() < b.len();
    both_wild && (pa.starts_with(&pb) || pb.starts_with(&pa))
}

/// Checks a new task's fields (not its dependencies, which need the store).
pub fn validate_new(new: &NewTask) -> Result<(), TaskError> {
    if new.title.trim().is_empty() {
        return Err(TaskError::Invalid("the task title is empty".into()));
    }
    if new.max_attempts == Some(0) {
        return Err(TaskError::Invalid("max attempts must be at least 1".into()));
    }
    if let Some(id) = &new.id
        && (id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
    {
        return Err(TaskError::Invalid(format!("invalid task id {id:?}: use letters, digits, - and _")));
    }
    for glob in &new.locks {
        if glob.trim().is_empty() {
            let message = "it is empty; a path lock names the files it covers, e.g. src/**".into();
            return Err(TaskError::InvalidGlob { glob: glob.clone(), message });
        }
        globset::Glob::new(glob)
            .map_err(|e| TaskError::InvalidGlob { glob: glob.clone(), message: e.kind().to_string() })?;
    }
    if let Some(id) = &new.id
        && new.depends_on.contains(id)
    {
        return Err(TaskError::Cycle(vec![id.clone(), id.clone()]));
    }
    Ok(())
}

fn load(txn: &mut dyn TaskTxn, id: &str) -> Result<Task, TaskError> {
    txn.get(id)?.ok_or_else(|| TaskError::NotFound(id.to_owned()))
}

/// Creates a task; its dependencies must exist.
pub fn create(txn: &mut dyn TaskTxn, new: NewTask, id: String, now: Timestamp) -> Result<Task, TaskError> {
    validate_new(&new)?;
    if txn.get(&id)?.is_some() {
        return Err(TaskError::Invalid(format!("a task with id {id} already exists")));
    }
    let mut depends_on = Vec::new();
    let mut blocked_by = None;
    for dep in &new.depends_on {
        let d = txn.get(dep)?.ok_or_else(|| TaskError::MissingDependency(dep.clone()))?;
        if matches!(d.status, TaskStatus::Failed | TaskStatus::Cancelled | TaskStatus::Blocked) && blocked_by.is_none()
        {
            blocked_by = Some(d.id.clone());
        }
        if !depends_on.contains(dep) {
            depends_on.push(dep.clone());
        }
    }
    let mut task = Task {
        id,
        title: new.title,
        prompt: new.prompt,
        kind: new.kind,
        priority: new.priority,
        labels: new.labels,
        status: TaskStatus::Queued,
        depends_on,
        locks: new.locks,
        claimed_by: None,
        lease_expires_at: None,
        token: None,
        attempts: 0,
        max_attempts: new.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
        not_before: None,
        result: None,
        error: None,
        blocked_reason: None,
        blocked_by: None,
        needs: new.needs,
        agent: None,
        test_command: new.test_command,
        created_at: now,
        updated_at: now,
    };
    txn.put(&task)?;
    txn.append(&task.id, TaskCreated { task: task.clone() }.into())?;
    if let Some(dep) = blocked_by {
        block(txn, &mut task, &dep, now)?;
    }
    Ok(task)
}

/// Adds a dependency edge `id -> dependency`, refusing cycles.
pub fn add_dependency(txn: &mut dyn TaskTxn, id: &str, dependency: &str, now: Timestamp) -> Result<Task, TaskError> {
    let mut task = load(txn, id)?;
    let dep = txn.get(dependency)?.ok_or_else(|| TaskError::MissingDependency(dependency.to_owned()))?;
    if task.depends_on.iter().any(|d| d == dependency) {
        return Ok(task);
    }
    if !matches!(task.status, TaskStatus::Queued | TaskStatus::Blocked) {
        return Err(TaskError::IllegalTransition {
            id: id.to_owned(),
            action: "add a dependency to",
            status: task.status,
        });
    }
    // A cycle exists if `dependency` already (transitively) depends on `id`.
    if let Some(mut path) = path_between(txn, dependency, id)? {
        path.insert(0, id.to_owned());
        return Err(TaskError::Cycle(path));
    }
    task.depends_on.push(dependency.to_owned());
    task.updated_at = now;
    txn.put(&task)?;
    txn.append(id, TaskDependencyAdded { dependency: dependency.to_owned() }.into())?;
    if matches!(dep.status, TaskStatus::Failed | TaskStatus::Cancelled | TaskStatus::Blocked)
        && task.status == TaskStatus::Queued
    {
        block(txn, &mut task, dependency, now)?;
    }
    Ok(task)
}

/// A dependency path from `from` to `to` (both included), if any.
fn path_between(txn: &mut dyn TaskTxn, from: &str, to: &str) -> Result<Option<Vec<String>>, TaskError> {
    let mut queue = VecDeque::from([vec![from.to_owned()]]);
    let mut seen = HashSet::from([from.to_owned()]);
    while let Some(path) = queue.pop_front() {
        let last = path.last().cloned().unwrap_or_default();
        if last == to {
            return Ok(Some(path));
        }
        if let Some(t) = txn.get(&last)? {
            for d in t.depends_on {
                if seen.insert(d.clone()) {
                    let mut next = path.clone();
                    next.push(d);
                    queue.push_back(next);
                }
            }
        }
    }
    Ok(None)
}

fn block(txn: &mut dyn TaskTxn, task: &mut Task, dependency: &str, now: Timestamp) -> Result<(), TaskError> {
    let reason = format!(
        "dependency {dependency} failed or was cancelled; `descartes task retry {dependency}` unblocks this task"
    );
    task.status = TaskStatus::Blocked;
    task.blocked_by = Some(dependency.to_owned());
    task.blocked_reason = Some(reason.clone());
    task.updated_at = now;
    txn.put(task)?;
    txn.append(&task.id, TaskBlocked { dependency: dependency.to_owned(), reason }.into())?;
    Ok(())
}

/// Blocks every queued task that (transitively) depends on `id`.
fn block_dependents(txn: &mut dyn TaskTxn, id: &str, now: Timestamp) -> Result<(), TaskError> {
    let mut queue = VecDeque::from([id.to_owned()]);
    while let Some(failed) = queue.pop_front() {
        for dep_id in txn.dependents(&failed)? {
            let Some(mut t) = txn.get(&dep_id)? else { continue };
            if t.status == TaskStatus::Queued {
                block(txn, &mut t, &failed, now)?;
                queue.push_back(dep_id);
            }
        }
    }
    Ok(())
}

/// Unblocks the tasks blocked by `id` (and, transitively, by them).
fn unblock_dependents(txn: &mut dyn TaskTxn, id: &str, now: Timestamp) -> Result<(), TaskError> {
    let mut queue = VecDeque::from([id.to_owned()]);
    while let Some(retried) = queue.pop_front() {
        for dep_id in txn.dependents(&retried)? {
            let Some(mut t) = txn.get(&dep_id)? else { continue };
            if t.status == TaskStatus::Blocked && t.blocked_by.as_deref() == Some(retried.as_str()) {
                t.status = TaskStatus::Queued;
                t.blocked_by = None;
                t.blocked_reason = None;
                t.updated_at = now;
                txn.put(&t)?;
                txn.append(&t.id, TaskUnblocked { dependency: retried.clone() }.into())?;
                queue.push_back(dep_id);
            }
        }
    }
    Ok(())
}

/// Checks that `token` is the task's live lease.
fn check_lease(task: &Task, token: i64, now: Timestamp, action: &'static str) -> Result<(), TaskError> {
    if task.status == TaskStatus::Queued && task.token == Some(token) {
        // This token's lease ended (it expired, or was released) and the task waits for its
        // next claim: the caller lost it, as with a stale token.
        return Err(TaskError::StaleToken {
            id: task.id.clone(),
            given: token,
            current: "its lease ended and it is queued again".into(),
        });
    }
    if !task.status.is_leased() {
        return Err(TaskError::IllegalTransition { id: task.id.clone(), action, status: task.status });
    }
    if task.token != Some(token) {
        return Err(TaskError::StaleToken {
            id: task.id.clone(),
            given: token,
            // Never the live token itself: whoever reads this error could then write with it.
            current: if task.token.is_some() {
                "another lease holds it now".into()
            } else {
                "no lease holds it".into()
            },
        });
    }
    if let Some(exp) = task.lease_expires_at
        && exp < now
    {
        return Err(TaskError::LeaseExpired { id: task.id.clone(), expired_at: exp });
    }
    Ok(())
}

/// Ends a lease that ran out: the task is queued again (with backoff) or fails for good.
fn expire_one(txn: &mut dyn TaskTxn, mut task: Task, now: Timestamp) -> Result<Task, TaskError> {
    let worker = task.claimed_by.take().unwrap_or_default();
    let token = task.token.unwrap_or_default();
    let is_final = task.attempts >= task.max_attempts;
    // The attempt ended when the lease ran out, not when someone noticed.
    let ended = task.lease_expires_at.unwrap_or(now).min(now);
    let retry_at = (!is_final).then(|| plus(ended, backoff(task.attempts)));
    task.lease_expires_at = None;
    task.error = Some(format!("lease of worker {worker} expired"));
    task.status = if is_final { TaskStatus::Failed } else { TaskStatus::Queued };
    task.not_before = retry_at;
    task.updated_at = now;
    txn.put(&task)?;
    txn.append(&task.id, TaskLeaseExpired { worker, token, attempt: task.attempts, is_final, retry_at }.into())?;
    if is_final {
        block_dependents(txn, &task.id, now)?;
    }
    Ok(task)
}

/// Expires every lease that ran out.
pub fn reap_expired(txn: &mut dyn TaskTxn, now: Timestamp) -> Result<Vec<Task>, TaskError> {
    let mut out = Vec::new();
    for t in txn.expired(now)? {
        out.push(expire_one(txn, t, now)?);
    }
    Ok(out)
}

/// Claims up to `max` ready tasks for `worker`.
pub fn claim(
    txn: &mut dyn TaskTxn,
    worker: &str,
    ttl: Duration,
    max: usize,
    now: Timestamp,
) -> Result<Vec<Claim>, TaskError> {
    if worker.trim().is_empty() {
        return Err(TaskError::Invalid("the worker name is empty".into()));
    }
    if ttl.is_zero() {
        return Err(TaskError::Invalid("the lease TTL must be positive".into()));
    }
    reap_expired(txn, now)?;
    let mut held: Vec<Vec<String>> = txn.leased_locks()?;
    let mut claims = Vec::new();
    if max > 1 {
        txn.reserve_tokens(max)?;
    }
    // Scan the queue in priority order; look a little further than `max` since some may not be
    // ready, and widen the window while too few are.
    let mut window = max + max / 4 + 4;
    loop {
        let candidates = txn.queued(now, window)?;
        let exhausted = candidates.len() < window;
        for task in candidates {
            if claims.len() >= max {
                break;
            }
            if claims.iter().any(|c: &Claim| c.task.id == task.id) {
                continue;
            }
            if let Some(claim) = take(txn, task, worker, ttl, None, &mut held, now)? {
                claims.push(claim);
            }
        }
        if claims.len() >= max || exhausted {
            break;
        }
        window *= 4;
    }
    Ok(claims)
}

/// Takes `task` (a queued one) if it is ready: every dependency done and no path-lock conflict
/// with `held` (the locks of leased tasks, to which its own are added). `agent`: the agent it
/// is routed to.
fn take(
    txn: &mut dyn TaskTxn,
    mut task: Task,
    worker: &str,
    ttl: Duration,
    agent: Option<&str>,
    held: &mut Vec<Vec<String>>,
    now: Timestamp,
) -> Result<Option<Claim>, TaskError> {
    for d in &task.depends_on {
        if txn.get(d)?.is_none_or(|t| t.status != TaskStatus::Done) {
            return Ok(None);
        }
    }
    if held.iter().any(|locks| locks_conflict(locks, &task.locks)) {
        return Ok(None);
    }
    task.attempts += 1;
    let expires = plus(now, ttl);
    let token = txn.next_token()?;
    txn.append(
        &task.id,
        TaskClaimed { worker: worker.to_owned(), token, lease_expires_at: expires, attempt: task.attempts }.into(),
    )?;
    task.status = TaskStatus::Claimed;
    task.claimed_by = Some(worker.to_owned());
    task.lease_expires_at = Some(expires);
    task.token = Some(token);
    task.not_before = None;
    task.updated_at = now;
    if let Some(agent) = agent {
        task.agent = Some(agent.to_owned());
        txn.append(&task.id, TaskRouted { agent: agent.to_owned(), attempt: task.attempts }.into())?;
    }
    txn.put(&task)?;
    if !task.locks.is_empty() {
        held.push(task.locks.clone());
    }
    Ok(Some(Claim { token, task }))
}

/// Claims the task `id` for `worker` if it is ready now (queued, past its backoff, every
/// dependency done, no path-lock conflict), routed to `agent` (name, most tasks at once) when
/// given: refused (None) when that agent already holds that many. None when it is not ready.
pub fn claim_one(
    txn: &mut dyn TaskTxn,
    id: &str,
    worker: &str,
    ttl: Duration,
    agent: Option<(&str, u32)>,
    now: Timestamp,
) -> Result<Option<Claim>, TaskError> {
    if worker.trim().is_empty() {
        return Err(TaskError::Invalid("the worker name is empty".into()));
    }
    if ttl.is_zero() {
        return Err(TaskError::Invalid("the lease TTL must be positive".into()));
    }
    reap_expired(txn, now)?;
    let task = load(txn, id)?;
    if task.status != TaskStatus::Queued || task.not_before.is_some_and(|t| t > now) {
        return Ok(None);
    }
    if let Some((name, max)) = agent
        && txn.leased_by_agent(name)? >= max
    {
        return Ok(None);
    }
    let mut held = txn.leased_locks()?;
    take(txn, task, worker, ttl, agent.map(|(name, _)| name), &mut held, now)
}

pub fn start(txn: &mut dyn TaskTxn, id: &str, token: i64, now: Timestamp) -> Result<Task, TaskError> {
    let mut task = load(txn, id)?;
    check_lease(&task, token, now, "start")?;
    if task.status == TaskStatus::Running {
        return Ok(task);
    }
    task.status = TaskStatus::Running;
    task.updated_at = now;
    txn.put(&task)?;
    txn.append(id, TaskStarted { token }.into())?;
    Ok(task)
}

pub fn heartbeat(
    txn: &mut dyn TaskTxn,
    id: &str,
    token: i64,
    ttl: Duration,
    now: Timestamp,
) -> Result<Task, TaskError> {
    if ttl.is_zero() {
        return Err(TaskError::Invalid("the lease TTL must be positive".into()));
    }
    let mut task = load(txn, id)?;
    check_lease(&task, token, now, "heartbeat")?;
    // Heartbeats extend the lease; they are not state transitions, so they add no event.
    task.lease_expires_at = Some(plus(now, ttl));
    task.updated_at = now;
    txn.put(&task)?;
    Ok(task)
}

pub fn complete(
    txn: &mut dyn TaskTxn,
    id: &str,
    token: i64,
    result: Option<String>,
    now: Timestamp,
) -> Result<Task, TaskError> {
    let mut task = load(txn, id)?;
    check_lease(&task, token, now, "complete")?;
    task.status = TaskStatus::Done;
    task.result = result.clone();
    task.error = None;
    task.claimed_by = None;
    task.lease_expires_at = None;
    task.updated_at = now;
    txn.put(&task)?;
    txn.append(id, TaskCompleted { token, result }.into())?;
    Ok(task)
}

pub fn fail(txn: &mut dyn TaskTxn, id: &str, token: i64, reason: &str, now: Timestamp) -> Result<Task, TaskError> {
    let mut task = load(txn, id)?;
    check_lease(&task, token, now, "fail")?;
    let is_final = task.attempts >= task.max_attempts;
    let retry_at = (!is_final).then(|| plus(now, backoff(task.attempts)));
    task.status = if is_final { TaskStatus::Failed } else { TaskStatus::Queued };
    task.error = Some(reason.to_owned());
    task.claimed_by = None;
    task.lease_expires_at = None;
    task.not_before = retry_at;
    task.updated_at = now;
    txn.put(&task)?;
    txn.append(id, TaskFailed { token, reason: reason.to_owned(), is_final, retry_at }.into())?;
    if is_final {
        block_dependents(txn, id, now)?;
    }
    Ok(task)
}

pub fn release(txn: &mut dyn TaskTxn, id: &str, token: i64, now: Timestamp) -> Result<Task, TaskError> {
    let mut task = load(txn, id)?;
    check_lease(&task, token, now, "release")?;
    let worker = task.claimed_by.take().unwrap_or_default();
    task.status = TaskStatus::Queued;
    task.attempts = task.attempts.saturating_sub(1);
    task.lease_expires_at = None;
    task.updated_at = now;
    txn.put(&task)?;
    txn.append(id, TaskReleased { worker, token }.into())?;
    Ok(task)
}

pub fn cancel(txn: &mut dyn TaskTxn, id: &str, now: Timestamp) -> Result<Task, TaskError> {
    let mut task = load(txn, id)?;
    if matches!(task.status, TaskStatus::Done | TaskStatus::Cancelled) {
        return Err(TaskError::IllegalTransition { id: id.to_owned(), action: "cancel", status: task.status });
    }
    task.status = TaskStatus::Cancelled;
    task.claimed_by = None;
    task.lease_expires_at = None;
    task.updated_at = now;
    txn.put(&task)?;
    txn.append(id, TaskCancelled::default().into())?;
    block_dependents(txn, id, now)?;
    Ok(task)
}

pub fn retry(txn: &mut dyn TaskTxn, id: &str, now: Timestamp) -> Result<Task, TaskError> {
    let mut task = load(txn, id)?;
    if !matches!(task.status, TaskStatus::Failed | TaskStatus::Cancelled | TaskStatus::Blocked) {
        return Err(TaskError::IllegalTransition { id: id.to_owned(), action: "retry", status: task.status });
    }
    if task.status == TaskStatus::Blocked
        && let Some(dep) = &task.blocked_by
        && let Some(d) = txn.get(dep)?
        && matches!(d.status, TaskStatus::Failed | TaskStatus::Cancelled | TaskStatus::Blocked)
    {
        return Err(TaskError::Invalid(format!(
            "task {id} is blocked by {dep}, which is {}; retry {dep} instead",
            d.status
        )));
    }
    task.status = TaskStatus::Queued;
    task.attempts = 0;
    task.not_before = None;
    task.blocked_by = None;
    task.blocked_reason = None;
    task.updated_at = now;
    txn.put(&task)?;
    txn.append(id, TaskRetried::default().into())?;
    unblock_dependents(txn, id, now)?;
    Ok(task)
}

/// Why a queued task is not being claimed (for `task show`), or `None` if it is ready.
pub fn waiting_reason(task: &Task, deps: &[Task], leased: &[Task], now: Timestamp) -> Option<String> {
    match task.status {
        TaskStatus::Blocked => return task.blocked_reason.clone(),
        TaskStatus::Queued => {}
        _ => return None,
    }
    if let Some(nb) = task.not_before
        && nb > now
    {
        return Some(format!("retry backoff until {nb}"));
    }
    let pending: Vec<String> =
        deps.iter().filter(|d| d.status != TaskStatus::Done).map(|d| format!("{} ({})", d.id, d.status)).collect();
    if !pending.is_empty() {
        return Some(format!("waiting for dependencies: {}", pending.join(", ")));
    }
    let holders: Vec<&str> = leased
        .iter()
        .filter(|l| l.id != task.id && locks_conflict(&l.locks, &task.locks))
        .map(|l| l.id.as_str())
        .collect();
    if !holders.is_empty() {
        return Some(format!("path locks held by {}", holders.join(", ")));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_overlap() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(locks_conflict(&s(&["src/**"]), &s(&["src/a.rs"])));
        assert!(locks_conflict(&s(&["src/a.rs"]), &s(&["src/**"])));
        assert!(locks_conflict(&s(&["src/*.rs"]), &s(&["src/**/mod.rs"])));
        assert!(locks_conflict(&s(&["docs/x.md"]), &s(&["docs/x.md"])));
        assert!(!locks_conflict(&s(&["src/**"]), &s(&["docs/**"])));
        assert!(!locks_conflict(&s(&["src/a.rs"]), &s(&["src/b.rs"])));
        assert!(!locks_conflict(&s(&[]), &s(&["src/**"])));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }

    #[test]
    fn invalid_globs_are_refused() {
        let new = NewTask { title: "t".into(), locks: vec!["src/[".into()], ..Default::default() };
        assert!(matches!(validate_new(&new), Err(TaskError::InvalidGlob { .. })));
        let new = NewTask { title: " ".into(), ..Default::default() };
        assert!(matches!(validate_new(&new), Err(TaskError::Invalid(_))));
        let new = NewTask { title: "t".into(), locks: vec!["src/**".into(), " ".into()], ..Default::default() };
        assert!(matches!(validate_new(&new), Err(TaskError::InvalidGlob { .. })), "an empty lock glob");
    }
}
