//! The task-store behaviour every `TaskStore` implementation must have, run against each one
//! (SQLite in `crates/store/tests`, PostgreSQL in `crates/store-pg/tests`).
//!
//! `run_all(factory)` runs every case on a fresh store made by `factory(clock)`; the clock is
//! manual so leases expire and backoffs pass without sleeping.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use descartes_core::audit::{AuditStore, plan_sync, verify_chain};
use descartes_core::routing::{AgentStore, agent_stream};
use descartes_core::testing::ManualClock;
use descartes_core::{EventStore, TaskError, TaskFilter, TaskStore};
use descartes_protocol::{
    AgentRecord, AgentRegistered, AgentStats, AgentUpdated, NewTask, Requirements, RunId, TaskStatus, Timestamp,
};

/// What a factory returns: the task store, and the event log it writes to.
pub struct Stores {
    pub tasks: Arc<dyn TaskStore>,
    pub events: Arc<dyn EventStore>,
    pub agents: Arc<dyn AgentStore>,
    pub audit: Arc<dyn AuditStore>,
    pub clock: Arc<ManualClock>,
    /// Keeps whatever the store needs alive (a temp dir, a test database).
    pub guard: Box<dyn std::any::Any + Send>,
}

fn new(title: &str) -> NewTask {
    NewTask { title: title.into(), ..Default::default() }
}

const TTL: Duration = Duration::from_secs(2);

/// Runs every case; panics with the case's name on the first failure.
pub async fn run_all<F, Fut>(factory: F)
where
    F: Fn(Arc<ManualClock>) -> Fut,
    Fut: Future<Output = Stores>,
{
    macro_rules! case {
        ($name:ident) => {{
            let clock = Arc::new(ManualClock::new(Timestamp(1_800_000_000_000_000)));
            let s = factory(clock).await;
            eprintln!("task suite: {}", stringify!($name));
            $name(&s).await;
        }};
    }
    case!(priorities_and_dependencies);
    case!(cycles_missing_dependencies_and_bad_input);
    case!(leases_expire_and_stale_tokens_are_refused);
    case!(heartbeats_keep_a_lease_alive);
    case!(path_locks_exclude_each_other);
    case!(failures_back_off_then_fail_for_good_and_block_dependents);
    case!(cancel_blocks_and_retry_unblocks);
    case!(illegal_transitions_are_errors);
    case!(release_charges_no_attempt);
    case!(batch_claims_are_distinct_with_increasing_tokens);
    case!(expiry_after_the_last_attempt_fails_for_good);
    case!(every_transition_is_an_event);
    case!(complete_many_completes_each_and_refuses_stale_tokens);
    case!(concurrent_workers_complete_each_task_once);
    case!(routed_claims_respect_capacity_and_readiness);
    case!(agents_are_stored_with_their_events);
    case!(audit_records_chain_and_refuse_duplicates);
}

async fn claim_one(s: &Stores, worker: &str) -> Option<descartes_protocol::Claim> {
    let mut c = s.tasks.claim(worker, TTL, 1).await.unwrap();
    assert!(c.len() <= 1);
    c.pop()
}

async fn priorities_and_dependencies(s: &Stores) {
    let a = s.tasks.create_task(NewTask { priority: 1, ..new("A") }).await.unwrap();
    let b = s.tasks.create_task(NewTask { priority: 5, ..new("B") }).await.unwrap();
    let c = s.tasks.create_task(NewTask { depends_on: vec![a.id.clone()], priority: 9, ..new("C") }).await.unwrap();
    let first = claim_one(s, "w").await.unwrap();
    assert_eq!(first.task.id, b.id, "highest priority first");
    let second = claim_one(s, "w").await.unwrap();
    assert_eq!(second.task.id, a.id);
    assert!(claim_one(s, "w").await.is_none(), "C waits for A");
    s.tasks.complete(&a.id, second.token, Some("ok".into())).await.unwrap();
    let third = claim_one(s, "w").await.unwrap();
    assert_eq!(third.task.id, c.id, "C once A is done");
    // Oldest first among equals.
    let x = s.tasks.create_task(new("X")).await.unwrap();
    s.clock.advance(Duration::from_millis(1));
    let _y = s.tasks.create_task(new("Y")).await.unwrap();
    assert_eq!(claim_one(s, "w").await.unwrap().task.id, x.id);
}

async fn cycles_missing_dependencies_and_bad_input(s: &Stores) {
    let a = s.tasks.create_task(new("A")).await.unwrap();
    let b = s.tasks.create_task(NewTask { depends_on: vec![a.id.clone()], ..new("B") }).await.unwrap();
    let c = s.tasks.create_task(NewTask { depends_on: vec![b.id.clone()], ..new("C") }).await.unwrap();
    match s.tasks.add_dependency(&a.id, &c.id).await {
        Err(TaskError::Cycle(path)) => assert_eq!(path, vec![a.id.clone(), c.id.clone(), b.id.clone(), a.id.clone()]),
        other => panic!("cycle not refused: {other:?}"),
    }
    assert!(s.tasks.get_task(&a.id).await.unwrap().depends_on.is_empty(), "nothing changed");
    let self_dep = NewTask { id: Some("selfish".into()), depends_on: vec!["selfish".into()], ..new("S") };
    assert!(matches!(s.tasks.create_task(self_dep).await, Err(TaskError::Cycle(_))));
    assert!(matches!(
        s.tasks.create_task(NewTask { depends_on: vec!["nope".into()], ..new("D") }).await,
        Err(TaskError::MissingDependency(d)) if d == "nope"
    ));
    assert!(matches!(
        s.tasks.create_task(NewTask { locks: vec!["src/[".into()], ..new("G") }).await,
        Err(TaskError::InvalidGlob { .. })
    ));
    assert!(matches!(s.tasks.create_task(new("  ")).await, Err(TaskError::Invalid(_))));
    assert!(matches!(
        s.tasks.create_task(NewTask { id: Some(a.id.clone()), ..new("dup") }).await,
        Err(TaskError::Invalid(_))
    ));
    assert!(matches!(s.tasks.get_task("nope").await, Err(TaskError::NotFound(_))));
    assert!(matches!(s.tasks.claim("w", Duration::ZERO, 1).await, Err(TaskError::Invalid(_))));
    assert!(matches!(s.tasks.claim(" ", TTL, 1).await, Err(TaskError::Invalid(_))));
}

async fn leases_expire_and_stale_tokens_are_refused(s: &Stores) {
    let t = s.tasks.create_task(new("T")).await.unwrap();
    let first = claim_one(s, "w1").await.unwrap();
    assert_eq!(first.task.status, TaskStatus::Claimed);
    assert!(claim_one(s, "w2").await.is_none(), "leased");
    s.clock.advance(Duration::from_millis(2100));
    // The lease expired: another worker takes over (after the 1 s backoff).
    assert!(claim_one(s, "w2").await.is_none(), "backoff after the expired attempt");
    // Queued again, nobody holds it: the first worker's token is stale all the same.
    match s.tasks.complete(&t.id, first.token, None).await {
        Err(e @ TaskError::StaleToken { .. }) => assert!(e.to_string().contains("lease ended"), "{e}"),
        other => panic!("expected a stale token while queued again: {other:?}"),
    }
    assert!(matches!(s.tasks.heartbeat(&t.id, first.token, TTL).await, Err(TaskError::StaleToken { .. })));
    s.clock.advance(Duration::from_millis(1100));
    let second = claim_one(s, "w2").await.unwrap();
    assert_eq!(second.task.id, t.id);
    assert!(second.token > first.token, "fencing tokens increase");
    assert_eq!(second.task.attempts, 2);
    match s.tasks.complete(&t.id, first.token, None).await {
        Err(e @ TaskError::StaleToken { given, .. }) => {
            assert_eq!(given, first.token);
            // The live token is never told: whoever reads the error could write with it.
            let text = e.to_string();
            assert!(!text.contains("current token"), "{text}");
            assert!(text.contains("another lease holds it"), "{text}");
        }
        other => panic!("stale token accepted: {other:?}"),
    }
    assert!(matches!(s.tasks.heartbeat(&t.id, first.token, TTL).await, Err(TaskError::StaleToken { .. })));
    let done = s.tasks.complete(&t.id, second.token, Some("r".into())).await.unwrap();
    assert_eq!(done.status, TaskStatus::Done);
    assert_eq!(done.result.as_deref(), Some("r"));
}

async fn heartbeats_keep_a_lease_alive(s: &Stores) {
    let t = s.tasks.create_task(new("T")).await.unwrap();
    let c = claim_one(s, "w1").await.unwrap();
    s.tasks.start(&t.id, c.token).await.unwrap();
    for _ in 0..5 {
        s.clock.advance(Duration::from_millis(1500));
        s.tasks.heartbeat(&t.id, c.token, TTL).await.unwrap();
        assert!(s.tasks.reap_expired().await.unwrap().is_empty());
        assert!(claim_one(s, "w2").await.is_none());
    }
    assert_eq!(s.tasks.get_task(&t.id).await.unwrap().status, TaskStatus::Running);
    s.clock.advance(Duration::from_millis(2500));
    assert!(matches!(s.tasks.heartbeat(&t.id, c.token, TTL).await, Err(TaskError::LeaseExpired { .. })));
    assert_eq!(s.tasks.reap_expired().await.unwrap().len(), 1);
    assert_eq!(s.tasks.get_task(&t.id).await.unwrap().status, TaskStatus::Queued);
}

async fn path_locks_exclude_each_other(s: &Stores) {
    let wide = s.tasks.create_task(NewTask { locks: vec!["src/**".into()], priority: 2, ..new("wide") }).await.unwrap();
    let narrow =
        s.tasks.create_task(NewTask { locks: vec!["src/a.rs".into()], priority: 1, ..new("narrow") }).await.unwrap();
    let other = s.tasks.create_task(NewTask { locks: vec!["docs/**".into()], ..new("docs") }).await.unwrap();
    let claims = s.tasks.claim("w", TTL, 3).await.unwrap();
    let ids: Vec<&str> = claims.iter().map(|c| c.task.id.as_str()).collect();
    assert_eq!(ids, vec![wide.id.as_str(), other.id.as_str()], "src/a.rs conflicts with src/**");
    assert!(claim_one(s, "w2").await.is_none());
    s.tasks.complete(&wide.id, claims[0].token, None).await.unwrap();
    assert_eq!(claim_one(s, "w2").await.unwrap().task.id, narrow.id);
}

async fn failures_back_off_then_fail_for_good_and_block_dependents(s: &Stores) {
    let a = s.tasks.create_task(NewTask { max_attempts: Some(2), ..new("A") }).await.unwrap();
    let d = s.tasks.create_task(NewTask { depends_on: vec![a.id.clone()], ..new("D") }).await.unwrap();
    let e = s.tasks.create_task(NewTask { depends_on: vec![d.id.clone()], ..new("E") }).await.unwrap();
    let c1 = claim_one(s, "w").await.unwrap();
    let after = s.tasks.fail(&a.id, c1.token, "exit code 1").await.unwrap();
    assert_eq!(after.status, TaskStatus::Queued);
    assert_eq!(after.error.as_deref(), Some("exit code 1"));
    assert!(after.not_before.is_some());
    assert!(claim_one(s, "w").await.is_none(), "backoff");
    s.clock.advance(Duration::from_millis(1100));
    let c2 = claim_one(s, "w").await.unwrap();
    assert_eq!(c2.task.attempts, 2);
    let failed = s.tasks.fail(&a.id, c2.token, "exit code 2").await.unwrap();
    assert_eq!(failed.status, TaskStatus::Failed);
    let blocked = s.tasks.get_task(&d.id).await.unwrap();
    assert_eq!(blocked.status, TaskStatus::Blocked);
    assert!(blocked.blocked_reason.unwrap().contains(&a.id));
    assert_eq!(s.tasks.get_task(&e.id).await.unwrap().status, TaskStatus::Blocked, "transitively");
    assert!(matches!(s.tasks.retry(&d.id).await, Err(TaskError::Invalid(_))), "retry the cause instead");
    let retried = s.tasks.retry(&a.id).await.unwrap();
    assert_eq!((retried.status, retried.attempts), (TaskStatus::Queued, 0));
    assert_eq!(s.tasks.get_task(&d.id).await.unwrap().status, TaskStatus::Queued);
    assert_eq!(s.tasks.get_task(&e.id).await.unwrap().status, TaskStatus::Queued);
}

async fn cancel_blocks_and_retry_unblocks(s: &Stores) {
    let a = s.tasks.create_task(new("A")).await.unwrap();
    let b = s.tasks.create_task(NewTask { depends_on: vec![a.id.clone()], ..new("B") }).await.unwrap();
    s.tasks.cancel(&a.id).await.unwrap();
    assert_eq!(s.tasks.get_task(&b.id).await.unwrap().status, TaskStatus::Blocked);
    // A new task depending on a cancelled one starts blocked.
    let c = s.tasks.create_task(NewTask { depends_on: vec![a.id.clone()], ..new("C") }).await.unwrap();
    assert_eq!(c.status, TaskStatus::Blocked);
    s.tasks.retry(&a.id).await.unwrap();
    assert_eq!(s.tasks.get_task(&b.id).await.unwrap().status, TaskStatus::Queued);
    assert_eq!(s.tasks.get_task(&c.id).await.unwrap().status, TaskStatus::Queued);
    // Cancelling a leased task ends its lease: the holder's token is refused.
    let claim = claim_one(s, "w").await.unwrap();
    s.tasks.cancel(&claim.task.id).await.unwrap();
    assert!(s.tasks.complete(&claim.task.id, claim.token, None).await.is_err());
}

async fn illegal_transitions_are_errors(s: &Stores) {
    let t = s.tasks.create_task(new("T")).await.unwrap();
    assert!(matches!(s.tasks.complete(&t.id, 1, None).await, Err(TaskError::IllegalTransition { .. })));
    assert!(matches!(s.tasks.start(&t.id, 1).await, Err(TaskError::IllegalTransition { .. })));
    assert!(matches!(s.tasks.retry(&t.id).await, Err(TaskError::IllegalTransition { .. })));
    let c = claim_one(s, "w").await.unwrap();
    s.tasks.complete(&t.id, c.token, None).await.unwrap();
    assert!(matches!(s.tasks.cancel(&t.id).await, Err(TaskError::IllegalTransition { .. })));
    assert!(matches!(s.tasks.retry(&t.id).await, Err(TaskError::IllegalTransition { .. })));
    assert!(matches!(s.tasks.complete(&t.id, c.token, None).await, Err(TaskError::IllegalTransition { .. })));
    assert_eq!(s.tasks.get_task(&t.id).await.unwrap().status, TaskStatus::Done, "unchanged by the refused writes");
}

async fn release_charges_no_attempt(s: &Stores) {
    let t = s.tasks.create_task(new("T")).await.unwrap();
    let c = claim_one(s, "w").await.unwrap();
    let r = s.tasks.release(&t.id, c.token).await.unwrap();
    assert_eq!((r.status, r.attempts), (TaskStatus::Queued, 0));
    assert!(matches!(s.tasks.complete(&t.id, c.token, None).await, Err(TaskError::StaleToken { .. })));
    let again = claim_one(s, "w2").await.unwrap();
    assert_eq!(again.task.attempts, 1);
}

async fn batch_claims_are_distinct_with_increasing_tokens(s: &Stores) {
    for i in 0..10 {
        s.tasks.create_task(new(&format!("t{i}"))).await.unwrap();
    }
    let first = s.tasks.claim("w", TTL, 4).await.unwrap();
    let second = s.tasks.claim("w", TTL, 4).await.unwrap();
    let third = s.tasks.claim("w", TTL, 4).await.unwrap();
    assert_eq!((first.len(), second.len(), third.len()), (4, 4, 2));
    let mut ids: Vec<&str> = first.iter().chain(&second).chain(&third).map(|c| c.task.id.as_str()).collect();
    let tokens: Vec<i64> = first.iter().chain(&second).chain(&third).map(|c| c.token).collect();
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 10);
    let leased = s.tasks.list_tasks(&TaskFilter { status: Some(TaskStatus::Claimed), label: None }).await.unwrap();
    assert_eq!(leased.len(), 10);
}

async fn expiry_after_the_last_attempt_fails_for_good(s: &Stores) {
    let t = s.tasks.create_task(NewTask { max_attempts: Some(1), labels: vec!["x".into()], ..new("T") }).await.unwrap();
    claim_one(s, "w").await.unwrap();
    s.clock.advance(Duration::from_secs(3));
    let reaped = s.tasks.reap_expired().await.unwrap();
    assert_eq!(reaped.len(), 1);
    let t = s.tasks.get_task(&t.id).await.unwrap();
    assert_eq!(t.status, TaskStatus::Failed);
    assert!(t.error.unwrap().contains("expired"));
    let by_label = s.tasks.list_tasks(&TaskFilter { status: None, label: Some("x".into()) }).await.unwrap();
    assert_eq!(by_label.len(), 1);
    assert!(s.tasks.list_tasks(&TaskFilter { status: None, label: Some("y".into()) }).await.unwrap().is_empty());
}

async fn complete_many_completes_each_and_refuses_stale_tokens(s: &Stores) {
    for i in 0..5 {
        s.tasks.create_task(new(&format!("t{i}"))).await.unwrap();
    }
    let claims = s.tasks.claim("w", TTL, 5).await.unwrap();
    assert_eq!(claims.len(), 5);
    let mut items: Vec<(String, i64, Option<String>)> =
        claims.iter().map(|c| (c.task.id.clone(), c.token, Some(format!("r{}", c.task.title)))).collect();
    items[2].1 -= 1_000; // a stale token
    let results = s.tasks.complete_many(items.clone()).await.unwrap();
    assert_eq!(results.len(), 5);
    for (i, r) in results.iter().enumerate() {
        if i == 2 {
            assert!(matches!(r, Err(TaskError::StaleToken { .. })), "{r:?}");
        } else {
            assert_eq!(r.as_ref().unwrap().status, TaskStatus::Done);
        }
    }
    assert_eq!(
        s.tasks.get_task(&items[2].0).await.unwrap().status,
        TaskStatus::Claimed,
        "the refused one is untouched"
    );
    let events = s.events.read_run(&RunId::from(items[0].0.as_str()), 0).await.unwrap();
    assert_eq!(events.last().unwrap().kind(), "task_completed");
}

async fn every_transition_is_an_event(s: &Stores) {
    let t = s.tasks.create_task(new("T")).await.unwrap();
    let c = claim_one(s, "w").await.unwrap();
    s.tasks.start(&t.id, c.token).await.unwrap();
    s.tasks.heartbeat(&t.id, c.token, TTL).await.unwrap();
    s.tasks.fail(&t.id, c.token, "boom").await.unwrap();
    s.clock.advance(Duration::from_secs(2));
    let c2 = claim_one(s, "w").await.unwrap();
    s.tasks.complete(&t.id, c2.token, None).await.unwrap();
    let events = s.events.read_run(&RunId::from(t.id.as_str()), 0).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind()).collect();
    assert_eq!(
        kinds,
        ["task_created", "task_claimed", "task_started", "task_failed", "task_claimed", "task_completed"]
    );
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
}

async fn concurrent_workers_complete_each_task_once(s: &Stores) {
    let n = 200;
    for i in 0..n {
        s.tasks.create_task(new(&format!("t{i}"))).await.unwrap();
    }
    let mut workers = Vec::new();
    for w in 0..4 {
        let tasks = s.tasks.clone();
        workers.push(tokio::spawn(async move {
            let mut done = 0;
            loop {
                let claims = tasks.claim(&format!("w{w}"), Duration::from_secs(60), 1 + w % 2 * 7).await.unwrap();
                if claims.is_empty() {
                    break done;
                }
                for c in claims {
                    tasks.complete(&c.task.id, c.token, None).await.unwrap();
                    done += 1;
                }
            }
        }));
    }
    let mut total = 0;
    for w in workers {
        total += w.await.unwrap();
    }
    assert_eq!(total, n);
    let mut completed = BTreeMap::<String, usize>::new();
    let mut cursor = 0;
    loop {
        let batch = s.events.read_all(cursor, 10_000).await.unwrap();
        if batch.is_empty() {
            break;
        }
        for e in &batch {
            cursor = e.seq;
            if e.kind() == "task_completed" {
                *completed.entry(e.run_id.to_string()).or_default() += 1;
            }
        }
    }
    assert_eq!(completed.len(), n);
    assert!(completed.values().all(|&c| c == 1));
}

/// One step of a random interleaving (see [`check_interleaving`]).
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// Worker `w` claims a task.
    Claim(usize),
    /// Worker `w` heartbeats its n-th held task.
    Heartbeat(usize, usize),
    /// Worker `w` completes its n-th held task.
    Complete(usize, usize),
    /// Worker `w` fails its n-th held task.
    Fail(usize, usize),
    /// Time passes (milliseconds).
    Advance(u64),
    /// Expired leases are reaped.
    Reap,
}

/// Runs `ops` against a store with 3 tasks (2 of them locking overlapping paths) and 3 workers,
/// checking after every step: a claim never hands out a task whose previous lease is still live,
/// tokens strictly increase, a write succeeds only with the task's current live token, a task is
/// completed at most once, and two tasks with overlapping locks are never leased at once.
pub async fn check_interleaving(s: &Stores, ops: &[Op]) {
    const WORKERS: usize = 3;
    let ttl = Duration::from_millis(1000);
    let mut ids = Vec::new();
    for (i, locks) in [vec!["src/**".to_string()], vec!["src/a.rs".to_string()], vec![]].into_iter().enumerate() {
        let t = s
            .tasks
            .create_task(NewTask { title: format!("t{i}"), locks, max_attempts: Some(3), ..Default::default() })
            .await
            .unwrap();
        ids.push(t.id);
    }
    // Shadow: per task, the live lease (token, expiry in µs) as the test saw it, and completions.
    let mut live: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut completed: BTreeMap<String, usize> = BTreeMap::new();
    let mut held: Vec<Vec<(String, i64)>> = vec![Vec::new(); WORKERS];
    let mut last_token = i64::MIN;
    let now = |s: &Stores| descartes_core::Clock::now(&*s.clock).as_micros();
    let ttl_us = ttl.as_micros() as i64;
    for (step, op) in ops.iter().enumerate() {
        let ctx = format!("step {step}: {op:?}");
        match *op {
            Op::Claim(w) => {
                for c in s.tasks.claim(&format!("w{w}"), ttl, 1).await.unwrap() {
                    let t = now(s);
                    if let Some((_, exp)) = live.get(&c.task.id) {
                        assert!(*exp < t, "{ctx}: task claimed while its lease was live");
                    }
                    assert!(c.token > last_token, "{ctx}: token did not increase");
                    last_token = c.token;
                    assert_eq!(completed.get(&c.task.id), None, "{ctx}: a done task was claimed");
                    live.insert(c.task.id.clone(), (c.token, t + ttl_us));
                    held[w].push((c.task.id, c.token));
                }
            }
            Op::Heartbeat(w, n) | Op::Complete(w, n) | Op::Fail(w, n) => {
                let Some((id, token)) = held[w].get(n % held[w].len().max(1)).cloned() else { continue };
                let t = now(s);
                let valid = live.get(&id).is_some_and(|(tok, exp)| *tok == token && *exp >= t);
                let result = match *op {
                    Op::Heartbeat(..) => s.tasks.heartbeat(&id, token, ttl).await,
                    Op::Complete(..) => s.tasks.complete(&id, token, None).await,
                    _ => s.tasks.fail(&id, token, "boom").await,
                };
                assert_eq!(
                    result.is_ok(),
                    valid,
                    "{ctx}: write with {} token: {result:?}",
                    if valid { "a live" } else { "a dead" }
                );
                if result.is_ok() {
                    match *op {
                        Op::Heartbeat(..) => {
                            live.insert(id.clone(), (token, t + ttl_us));
                        }
                        Op::Complete(..) => {
                            *completed.entry(id.clone()).or_default() += 1;
                            live.remove(&id);
                        }
                        _ => {
                            live.remove(&id);
                        }
                    }
                }
                if !valid || !matches!(op, Op::Heartbeat(..)) {
                    held[w].retain(|(i, _)| i != &id);
                }
            }
            Op::Advance(ms) => s.clock.advance(Duration::from_millis(ms)),
            Op::Reap => {
                s.tasks.reap_expired().await.unwrap();
            }
        }
        assert!(completed.values().all(|&c| c <= 1), "{ctx}: completed twice");
        // Leased tasks in the store never have overlapping locks.
        let leased: Vec<descartes_protocol::Task> = s
            .tasks
            .list_tasks(&TaskFilter::default())
            .await
            .unwrap()
            .into_iter()
            .filter(|t| t.status.is_leased())
            .collect();
        for (i, a) in leased.iter().enumerate() {
            for b in &leased[i + 1..] {
                assert!(
                    !descartes_core::task::locks_conflict(&a.locks, &b.locks),
                    "{ctx}: {} and {} leased together",
                    a.id,
                    b.id
                );
            }
        }
    }
}

/// A proptest strategy for interleavings.
pub fn ops() -> impl proptest::strategy::Strategy<Value = Vec<Op>> {
    use proptest::prelude::*;
    let op = prop_oneof![
        4 => (0..3usize).prop_map(Op::Claim),
        2 => (0..3usize, 0..3usize).prop_map(|(w, n)| Op::Heartbeat(w, n)),
        3 => (0..3usize, 0..3usize).prop_map(|(w, n)| Op::Complete(w, n)),
        1 => (0..3usize, 0..3usize).prop_map(|(w, n)| Op::Fail(w, n)),
        3 => (1..1500u64).prop_map(Op::Advance),
        1 => Just(Op::Reap),
    ];
    proptest::collection::vec(op, 1..60)
}

async fn routed_claims_respect_capacity_and_readiness(s: &Stores) {
    let a = s.tasks.create_task(NewTask { priority: 1, ..new("A") }).await.unwrap();
    let b = s.tasks.create_task(NewTask { priority: 5, ..new("B") }).await.unwrap();
    let c = s.tasks.create_task(NewTask { depends_on: vec![a.id.clone()], ..new("C") }).await.unwrap();
    // Same priority as C: older first (the clock moves, so "older" is not left to the ids).
    s.clock.advance(Duration::from_millis(1));
    let needs = Requirements { labels: vec!["rust".into()], ..Default::default() };
    let d = s.tasks.create_task(NewTask { needs: needs.clone(), ..new("D") }).await.unwrap();
    assert_eq!(s.tasks.get_task(&d.id).await.unwrap().needs, needs, "requirements are stored");
    let peek: Vec<String> = s.tasks.peek_queued(10).await.unwrap().into_iter().map(|t| t.id).collect();
    assert_eq!(peek, [b.id.clone(), a.id.clone(), c.id.clone(), d.id.clone()], "priority, then age");

    // C waits for A; a claim of it is refused without error.
    assert!(s.tasks.claim_one(&c.id, "w", TTL, Some(("x", 2))).await.unwrap().is_none());
    let cb = s.tasks.claim_one(&b.id, "w", TTL, Some(("x", 1))).await.unwrap().unwrap();
    assert_eq!(cb.task.agent.as_deref(), Some("x"));
    assert_eq!(cb.task.status, TaskStatus::Claimed);
    // x is full; y is not.
    assert!(s.tasks.claim_one(&a.id, "w", TTL, Some(("x", 1))).await.unwrap().is_none());
    let ca = s.tasks.claim_one(&a.id, "w", TTL, Some(("y", 1))).await.unwrap().unwrap();
    // Already claimed: refused.
    assert!(s.tasks.claim_one(&a.id, "w", TTL, Some(("y", 5))).await.unwrap().is_none());
    let load = s.tasks.agent_load().await.unwrap();
    assert_eq!((load.get("x"), load.get("y")), (Some(&1), Some(&1)));
    s.tasks.complete(&a.id, ca.token, None).await.unwrap();
    s.tasks.complete(&b.id, cb.token, None).await.unwrap();
    assert!(s.tasks.agent_load().await.unwrap().is_empty(), "finished tasks free their agent");
    let cc = s.tasks.claim_one(&c.id, "w", TTL, None).await.unwrap().unwrap();
    assert!(cc.token > ca.token && ca.token > cb.token, "tokens keep increasing");
    assert_eq!(cc.task.agent, None);
    let events = s.events.read_run(&RunId::from(b.id.as_str()), 0).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind()).collect();
    assert_eq!(kinds, ["task_created", "task_claimed", "task_routed", "task_completed"]);
    assert!(matches!(s.tasks.claim_one("nope", "w", TTL, None).await, Err(TaskError::NotFound(_))));
    assert!(matches!(s.tasks.claim_one(&d.id, "w", Duration::ZERO, None).await, Err(TaskError::Invalid(_))));
}

async fn agents_are_stored_with_their_events(s: &Stores) {
    let mut rec = AgentRecord {
        name: "coder".into(),
        backend: "command".into(),
        model: None,
        command: Some("make".into()),
        labels: vec!["rust".into()],
        capabilities: vec![],
        detected: vec![],
        max_concurrent: 2,
        disabled: false,
        stats: AgentStats::default(),
        created_at: Timestamp(1),
        updated_at: Timestamp(1),
    };
    assert!(s.agents.list_agents().await.unwrap().is_empty());
    s.agents.put_agent(&rec, AgentRegistered { agent: rec.clone() }.into()).await.unwrap();
    rec.disabled = true;
    s.agents.put_agent(&rec, AgentUpdated { change: "disabled".into(), agent: rec.clone() }.into()).await.unwrap();
    let mut other = rec.clone();
    other.name = "another".into();
    s.agents.put_agent(&other, AgentRegistered { agent: other.clone() }.into()).await.unwrap();
    let names: Vec<String> = s.agents.list_agents().await.unwrap().into_iter().map(|a| a.name).collect();
    assert_eq!(names, ["another", "coder"]);
    assert_eq!(s.agents.get_agent("coder").await.unwrap(), Some(rec));
    assert!(s.agents.remove_agent("coder").await.unwrap());
    assert!(!s.agents.remove_agent("coder").await.unwrap(), "removing twice is a no");
    assert_eq!(s.agents.get_agent("coder").await.unwrap(), None);
    let events = s.events.read_run(&RunId::from(agent_stream("coder").as_str()), 0).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind()).collect();
    assert_eq!(kinds, ["agent_registered", "agent_updated", "agent_removed"]);
    // Concurrent updates (workers recording outcomes) lose none.
    let updates = (0..20).map(|_| {
        s.agents.update_agent("another", "attempt succeeded", Box::new(|a: &mut AgentRecord| a.stats.succeeded += 1))
    });
    for r in futures::future::join_all(updates).await {
        assert!(r.unwrap().is_some());
    }
    assert_eq!(s.agents.get_agent("another").await.unwrap().unwrap().stats.succeeded, 20);
    assert!(s.agents.update_agent("nobody", "x", Box::new(|_: &mut AgentRecord| {})).await.unwrap().is_none());
    let events = s.events.read_run(&RunId::from(agent_stream("another").as_str()), 0).await.unwrap();
    assert_eq!(events.len(), 21, "each update is an event");
}

async fn audit_records_chain_and_refuse_duplicates(s: &Stores) {
    let t = s.tasks.create_task(new("audited")).await.unwrap();
    let c = claim_one(s, "w").await.unwrap();
    s.tasks.complete(&t.id, c.token, None).await.unwrap();
    let events = s.events.read_run(&RunId::from(t.id.as_str()), 0).await.unwrap();
    let first = plan_sync(&t.id, &[], &events[..2]);
    s.audit.audit_append(first.clone()).await.unwrap();
    assert!(s.audit.audit_append(first.clone()).await.is_err(), "a record is written once");
    let existing = s.audit.audit_records(Some(&t.id)).await.unwrap();
    assert_eq!(existing, first);
    let rest = plan_sync(&t.id, &existing, &events);
    assert_eq!(rest.len(), events.len() - 2);
    s.audit.audit_append(rest).await.unwrap();
    let all = s.audit.audit_records(None).await.unwrap();
    assert_eq!(all.len(), events.len());
    let find = |stream: &str, seq: i64| events.iter().find(|e| e.run_id.as_str() == stream && e.seq == seq).cloned();
    assert!(verify_chain(&all, &find).is_empty());
}
