//! The daemon: workers that claim tasks, run them with a [`TaskRunner`], keep their leases
//! alive by heartbeat, and complete or fail them; a reaper of expired leases; a graceful stop.
//!
//! Rules:
//! - A worker holds one task at a time. It claims with `claim(worker, ttl, 1)`, runs the task
//!   while `start` commits (the outcome is written only after `start`), and heartbeats every
//!   `ttl / 3` while it runs. A heartbeat refused for any reason but a store failure (stale
//!   token, expired lease, cancelled task) means the task was lost: its command is killed and
//!   nothing more is written for it.
//! - Idle workers wake when asked through [`DaemonHandle::wake`] (the control socket's `wake`,
//!   sent by `descartes task create`: the fast path), when the event log moves (polled every
//!   `idle_poll`, 5 ms, through [`EventStore::last_seq`], for tasks created elsewhere; the
//!   daemon's own writes wake it at once), and every `rescan` (retry backoffs end without an
//!   event).
//! - Store errors never end a worker: it logs, backs off (100 ms doubling to 5 s) and goes on.
//! - Stop: no more claims; in-flight tasks get `grace` to finish, then their commands are
//!   killed and the tasks `release`d (no attempt charged) for another worker.

pub mod control;
pub mod runner;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use descartes_core::{Clock, EventStore, TaskError, TaskStore};
use descartes_protocol::{Claim, Timestamp};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use control::{
    ControlSocket, DaemonPaths, PidLock, TOKEN_FILE, bind_control, poke, request, serve_control, terminate,
};
pub use runner::{CommandRunner, Outcome, TaskRunner};

/// Errors of starting and controlling a daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Another daemon holds this state directory. Not retryable: stop it first.
    #[error("a daemon is already running here (pid {pid}); `descartes daemon stop` stops it")]
    AlreadyRunning { pid: u32 },
    /// Not retryable: the path must be shorter.
    #[error(
        "the control socket path {} is too long for a Unix socket (over 100 bytes); use a shorter project path or \
         DESCARTES_HOME",
        .0.display()
    )]
    SocketPath(PathBuf),
    /// A file of the daemon could not be made or read. Retryable only if the cause goes away.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Settings of a daemon.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Prefix of the worker names (`NAME/w0`, `NAME/w1`, ...), recorded as the claim holder.
    pub name: String,
    pub workers: usize,
    pub lease_ttl: Duration,
    /// How long in-flight tasks may run on after a stop before they are killed and released.
    pub grace: Duration,
    /// How often idle workers look for changes in the log.
    pub idle_poll: Duration,
    /// How often idle workers try to claim even when nothing changed.
    pub rescan: Duration,
}

impl DaemonConfig {
    pub fn new(workers: usize, lease_ttl: Duration) -> Self {
        Self {
            name: default_name(),
            workers,
            lease_ttl,
            grace: Duration::from_secs(30),
            idle_poll: Duration::from_millis(5),
            rescan: Duration::from_millis(250),
        }
    }
}

/// `HOST-PID`: names this daemon's workers in claims.
pub fn default_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}-{}", std::process::id())
}

/// What `daemon status` shows (the control socket's answer to `{"cmd":"status"}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub name: String,
    pub workers: usize,
    pub lease_ttl_ms: u64,
    pub grace_ms: u64,
    /// What runs the tasks (e.g. `command: ...`).
    pub runner: String,
    pub started_at: Timestamp,
    pub uptime_secs: u64,
    /// A stop was asked for; in-flight tasks are finishing.
    pub stopping: bool,
    pub in_flight: Vec<InFlight>,
    /// Tasks completed by this daemon.
    pub done: u64,
    /// Attempts that failed.
    pub failed: u64,
    /// Tasks given back at a stop.
    pub released: u64,
    /// Tasks lost to another worker (lease expired or task cancelled while running).
    pub lost: u64,
}

/// A task a worker is running.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InFlight {
    pub task_id: String,
    pub title: String,
    pub worker: String,
    pub attempt: u32,
    pub since: Timestamp,
}

struct Shared {
    config: DaemonConfig,
    runner: String,
    clock: Arc<dyn Clock>,
    started_at: Timestamp,
    started: Instant,
    /// No more claims.
    stop: CancellationToken,
    /// The grace period is over: kill in-flight commands and release their tasks.
    kill: CancellationToken,
    /// Every worker has finished.
    stopped: CancellationToken,
    wake: watch::Sender<u64>,
    idle: AtomicUsize,
    idle_changed: Notify,
    in_flight: Mutex<BTreeMap<String, InFlight>>,
    done: AtomicU64,
    failed: AtomicU64,
    released: AtomicU64,
    lost: AtomicU64,
}

/// Controls a running daemon (cheap to clone).
#[derive(Clone)]
pub struct DaemonHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for DaemonHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonHandle").field("name", &self.shared.config.name).finish()
    }
}

impl DaemonHandle {
    /// Graceful stop: no more claims; in-flight tasks get the grace period.
    pub fn stop(&self) {
        if !self.shared.stop.is_cancelled() {
            let n = self.shared.in_flight.lock().map(|m| m.len()).unwrap_or(0);
            info!(in_flight = n, grace_ms = millis(self.shared.config.grace), "stopping: no more claims");
        }
        self.shared.stop.cancel();
    }

    /// Stops at once: in-flight commands are killed and their tasks released.
    pub fn stop_now(&self) {
        self.stop();
        self.shared.kill.cancel();
    }

    pub fn is_stopping(&self) -> bool {
        self.shared.stop.is_cancelled()
    }

    /// Idle workers look for work now.
    pub fn wake(&self) {
        self.shared.wake.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Resolves once every worker has finished.
    pub async fn stopped(&self) {
        self.shared.stopped.cancelled().await;
    }

    pub fn status(&self) -> DaemonStatus {
        let s = &self.shared;
        let in_flight = s.in_flight.lock().map(|m| m.values().cloned().collect()).unwrap_or_default();
        DaemonStatus {
            pid: std::process::id(),
            name: s.config.name.clone(),
            workers: s.config.workers,
            lease_ttl_ms: millis(s.config.lease_ttl),
            grace_ms: millis(s.config.grace),
            runner: s.runner.clone(),
            started_at: s.started_at,
            uptime_secs: s.started.elapsed().as_secs(),
            stopping: s.stop.is_cancelled(),
            in_flight,
            done: s.done.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            released: s.released.load(Ordering::Relaxed),
            lost: s.lost.load(Ordering::Relaxed),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A set of workers over a task store.
pub struct Daemon {
    tasks: Arc<dyn TaskStore>,
    events: Option<Arc<dyn EventStore>>,
    runner: Arc<dyn TaskRunner>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon").field("config", &self.shared.config).finish()
    }
}

struct Inner {
    tasks: Arc<dyn TaskStore>,
    runner: Arc<dyn TaskRunner>,
    shared: Arc<Shared>,
}

impl Daemon {
    pub fn new(
        tasks: Arc<dyn TaskStore>,
        runner: Arc<dyn TaskRunner>,
        clock: Arc<dyn Clock>,
        mut config: DaemonConfig,
    ) -> Self {
        config.workers = config.workers.max(1);
        config.lease_ttl = config.lease_ttl.max(Duration::from_millis(1));
        config.idle_poll = config.idle_poll.max(Duration::from_micros(100));
        config.rescan = config.rescan.max(config.idle_poll);
        let shared = Arc::new(Shared {
            runner: runner.describe(),
            started_at: clock.now(),
            clock,
            started: Instant::now(),
            config,
            stop: CancellationToken::new(),
            kill: CancellationToken::new(),
            stopped: CancellationToken::new(),
            wake: watch::Sender::new(0),
            idle: AtomicUsize::new(0),
            idle_changed: Notify::new(),
            in_flight: Mutex::new(BTreeMap::new()),
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            released: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        });
        Self { tasks, events: None, runner, shared }
    }

    /// Idle workers watch this log for changes (new tasks) instead of only polling the queue.
    pub fn with_events(mut self, events: Arc<dyn EventStore>) -> Self {
        self.events = Some(events);
        self
    }

    pub fn handle(&self) -> DaemonHandle {
        DaemonHandle { shared: self.shared.clone() }
    }

    /// Runs until stopped (see [`DaemonHandle::stop`]) and every worker has finished.
    pub async fn run(self) {
        let Daemon { tasks, events, runner, shared } = self;
        let inner = Arc::new(Inner { tasks, runner, shared: shared.clone() });
        let cfg = &shared.config;
        info!(
            name = %cfg.name,
            workers = cfg.workers,
            lease_ttl_ms = millis(cfg.lease_ttl),
            runner = %shared.runner,
            "daemon started"
        );
        let mut background = tokio::task::JoinSet::new();
        background.spawn(reaper(inner.clone()));
        if let Some(events) = events {
            background.spawn(watch_log(inner.clone(), events));
        }
        let grace_timer = {
            let shared = shared.clone();
            tokio::spawn(async move {
                shared.stop.cancelled().await;
                tokio::select! {
                    _ = tokio::time::sleep(shared.config.grace) => {
                        let n = shared.in_flight.lock().map(|m| m.len()).unwrap_or(0);
                        if n > 0 {
                            warn!(in_flight = n, "grace period over: killing the commands of in-flight tasks and releasing them");
                        }
                        shared.kill.cancel();
                    }
                    _ = shared.kill.cancelled() => {}
                }
            })
        };
        let mut workers = tokio::task::JoinSet::new();
        for i in 0..cfg.workers {
            workers.spawn(worker(inner.clone(), format!("{}/w{i}", cfg.name)));
        }
        while let Some(joined) = workers.join_next().await {
            if let Err(e) = joined {
                warn!(error = %e, "a worker ended abnormally");
            }
        }
        grace_timer.abort();
        background.abort_all();
        while background.join_next().await.is_some() {}
        let s = self::DaemonHandle { shared: shared.clone() }.status();
        info!(done = s.done, failed = s.failed, released = s.released, lost = s.lost, "daemon stopped");
        shared.stopped.cancel();
    }
}

/// Exponential backoff for store errors: 100 ms doubling to 5 s.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    fn new() -> Self {
        Self { next: Self::MIN }
    }

    fn reset(&mut self) {
        self.next = Self::MIN;
    }

    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }
}

async fn worker(ctx: Arc<Inner>, name: String) {
    let s = &ctx.shared;
    let mut wake = s.wake.subscribe();
    let mut backoff = Backoff::new();
    while !s.stop.is_cancelled() {
        wake.borrow_and_update();
        // Never abandon a claim half-way: its result would be lost until the lease expires.
        match ctx.runner.claim_next(&*ctx.tasks, &name, s.config.lease_ttl).await {
            Ok(claim) => {
                backoff.reset();
                match claim {
                    Some(claim) if s.stop.is_cancelled() => {
                        give_back(&ctx, &claim, Instant::now() + s.config.lease_ttl).await;
                    }
                    Some(claim) => run_claim(&ctx, &name, claim).await,
                    None => {
                        s.idle.fetch_add(1, Ordering::SeqCst);
                        s.idle_changed.notify_one();
                        tokio::select! {
                            _ = wake.changed() => {}
                            _ = tokio::time::sleep(s.config.rescan) => {}
                            _ = s.stop.cancelled() => {}
                        }
                        s.idle.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            }
            Err(e) => {
                let delay = backoff.next();
                warn!(worker = %name, error = %e, retry_in_ms = millis(delay), "cannot claim a task; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = s.stop.cancelled() => {}
                }
            }
        }
    }
}

/// Retries `op` while the store fails, until `deadline` (after it the lease has surely run
/// out, so the write would be refused anyway).
async fn retry_store<T, F, Fut>(what: &str, id: &str, deadline: Instant, mut op: F) -> Result<T, TaskError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, TaskError>>,
{
    let mut backoff = Backoff::new();
    loop {
        match op().await {
            Err(TaskError::Store(e)) if Instant::now() < deadline => {
                let delay = backoff.next();
                warn!(task = %id, error = %e, retry_in_ms = millis(delay), "cannot {what} the task; retrying");
                tokio::time::sleep(delay).await;
            }
            other => return other,
        }
    }
}

/// Releases a claimed task (graceful stop).
async fn give_back(ctx: &Inner, claim: &Claim, deadline: Instant) {
    let id = &claim.task.id;
    match retry_store("release", id, deadline, || ctx.tasks.release(id, claim.token)).await {
        Ok(_) => {
            ctx.shared.released.fetch_add(1, Ordering::Relaxed);
            info!(task = %id, "released for another worker");
        }
        Err(e) => warn!(task = %id, error = %e, "cannot release the task; it is taken over when its lease expires"),
    }
}

async fn run_claim(ctx: &Inner, worker: &str, claim: Claim) {
    let s = &ctx.shared;
    let ttl = s.config.lease_ttl;
    let (id, token) = (claim.task.id.clone(), claim.token);
    let mut lease_until = Instant::now() + ttl;
    info!(task = %id, worker, token, attempt = claim.task.attempts, title = %claim.task.title, "claimed");
    if let Ok(mut m) = s.in_flight.lock() {
        m.insert(
            id.clone(),
            InFlight {
                task_id: id.clone(),
                title: claim.task.title.clone(),
                worker: worker.to_owned(),
                attempt: claim.task.attempts,
                since: s.clock.now(),
            },
        );
    }
    let kill = CancellationToken::new();
    let period = (ttl / 3).max(Duration::from_millis(1));
    let mut beat = tokio::time::interval_at(Instant::now() + period, period);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The command starts while `start` commits (the claim already made the task ours), which
    // saves a commit's latency; the outcome is recorded only after `start`.
    let start = retry_store("start", &id, lease_until, || ctx.tasks.start(&id, token));
    tokio::pin!(start);
    let mut started = false;
    let run = ctx.runner.run(&claim.task, token, kill.clone());
    tokio::pin!(run);
    let mut lost: Option<TaskError> = None;
    let outcome = loop {
        tokio::select! {
            r = &mut start, if !started => {
                started = true;
                if let Err(e) = r {
                    warn!(task = %id, error = %e, "lost the task before it started; killing its command");
                    lost = Some(e);
                    kill.cancel();
                }
            }
            o = &mut run => break o,
            _ = beat.tick(), if lost.is_none() => {
                match ctx.tasks.heartbeat(&id, token, ttl).await {
                    Ok(_) => lease_until = Instant::now() + ttl,
                    Err(TaskError::Store(e)) => {
                        warn!(task = %id, error = %e, "heartbeat failed; retrying at the next beat");
                    }
                    Err(e) => {
                        warn!(task = %id, error = %e, "lost the task; killing its command");
                        lost = Some(e);
                        kill.cancel();
                    }
                }
            }
            _ = s.kill.cancelled(), if !kill.is_cancelled() => kill.cancel(),
        }
    };
    if !started
        && lost.is_none()
        && let Err(e) = start.await
    {
        warn!(task = %id, error = %e, "lost the task before it started");
        lost = Some(e);
    }
    if let Ok(mut m) = s.in_flight.lock() {
        m.remove(&id);
    }
    if lost.is_some() {
        s.lost.fetch_add(1, Ordering::Relaxed);
        return;
    }
    // Writes after the run are retried while the lease may still be ours (and a while more:
    // the store's clock decides).
    let deadline = lease_until.max(Instant::now()) + ttl;
    match outcome {
        Outcome::Cancelled => give_back(ctx, &claim, deadline).await,
        Outcome::Succeeded { result } => {
            match retry_store("complete", &id, deadline, || ctx.tasks.complete(&id, token, result.clone())).await {
                Ok(_) => {
                    s.done.fetch_add(1, Ordering::Relaxed);
                    info!(task = %id, "done");
                }
                Err(e) => {
                    s.lost.fetch_add(1, Ordering::Relaxed);
                    warn!(task = %id, error = %e, "cannot record the task as done; it will run again");
                }
            }
        }
        Outcome::Failed { reason } => {
            match retry_store("fail", &id, deadline, || ctx.tasks.fail(&id, token, &reason)).await {
                Ok(t) => {
                    s.failed.fetch_add(1, Ordering::Relaxed);
                    info!(task = %id, status = %t.status, %reason, "attempt failed");
                }
                Err(e) => {
                    s.lost.fetch_add(1, Ordering::Relaxed);
                    warn!(task = %id, error = %e, "cannot record the failed attempt; the task will run again");
                }
            }
        }
    }
}

/// Expires leases that ran out, every `ttl / 2` (claims reap too).
async fn reaper(ctx: Arc<Inner>) {
    let s = &ctx.shared;
    let period = (s.config.lease_ttl / 2).max(Duration::from_millis(10));
    let mut backoff = Backoff::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = s.stop.cancelled() => return,
        }
        match ctx.tasks.reap_expired().await {
            Ok(reaped) => {
                backoff.reset();
                if !reaped.is_empty() {
                    info!(count = reaped.len(), "expired leases reaped");
                    DaemonHandle { shared: s.clone() }.wake();
                }
            }
            Err(e) => {
                let delay = backoff.next();
                warn!(error = %e, "cannot reap expired leases; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = s.stop.cancelled() => return,
                }
            }
        }
    }
}

/// Wakes idle workers when the log moves. Polls only while some worker is idle.
async fn watch_log(ctx: Arc<Inner>, events: Arc<dyn EventStore>) {
    let s = &ctx.shared;
    let mut last = events.last_seq().await.unwrap_or(0);
    let mut backoff = Backoff::new();
    loop {
        if s.stop.is_cancelled() {
            return;
        }
        if s.idle.load(Ordering::SeqCst) == 0 {
            tokio::select! {
                _ = s.idle_changed.notified() => {}
                _ = s.stop.cancelled() => return,
            }
            continue;
        }
        events.wait_for_events(last, s.config.idle_poll).await;
        match events.last_seq().await {
            Ok(seq) => {
                backoff.reset();
                if seq != last {
                    last = seq;
                    s.wake.send_modify(|g| *g = g.wrapping_add(1));
                }
            }
            Err(e) => {
                let delay = backoff.next();
                tracing::debug!(error = %e, "cannot read the log's position; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = s.stop.cancelled() => return,
                }
            }
        }
    }
}
