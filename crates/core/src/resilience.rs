//! Retries, circuit breakers and fallback chains for model calls: the pure rules. The agent loop
//! applies them ([`crate::agent`]); the breakers' state is also rebuilt from the event log
//! ([`BreakerFold`]) so that every process (and `descartes providers`) sees the same health.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use descartes_protocol::{EventData, Timestamp};

use crate::cost::{ByteEstimate, PriceTable, TokenCounter};
use crate::provider::Provider;
use crate::task::{Clock, SystemClock};

/// Everything the agent loop needs to survive failing providers and to count money.
#[derive(Clone)]
pub struct Resilience {
    pub retry: RetryPolicy,
    /// Providers that continue the run when the primary fails after its retries, in order.
    pub fallbacks: Vec<ChainEntry>,
    pub breakers: Arc<Breakers>,
    pub prices: Arc<PriceTable>,
    /// Estimates the tokens of the next call (for budgets).
    pub counter: Arc<dyn TokenCounter>,
    pub clock: Arc<dyn Clock>,
}

impl Default for Resilience {
    fn default() -> Self {
        Self {
            retry: RetryPolicy::default(),
            fallbacks: Vec::new(),
            breakers: Arc::new(Breakers::default()),
            prices: Arc::new(PriceTable::with_defaults()),
            counter: Arc::new(ByteEstimate),
            clock: Arc::new(SystemClock),
        }
    }
}

impl std::fmt::Debug for Resilience {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resilience").field("retry", &self.retry).field("fallbacks", &self.fallbacks).finish()
    }
}

/// How failed model calls are retried.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0: never retry).
    pub max_retries: u32,
    /// The first backoff; each retry doubles it.
    pub base_delay: Duration,
    /// The longest computed backoff (a server's `retry-after` may ask for more).
    pub max_delay: Duration,
    /// A wait longer than this (a rate limit that resets later) parks the run: it is recorded as
    /// `run_parked` and the run continues when the limit resets.
    pub park_after: Duration,
    /// The longest a run waits for a rate limit to reset; a longer reset fails the call.
    pub max_park: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 4,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            park_after: Duration::from_secs(60),
            max_park: Duration::from_secs(6 * 3600),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1-based). A server's `retry-after` is honoured
    /// exactly (plus up to 10% jitter, capped at 1 s, so that many clients do not return at
    /// once); otherwise exponential backoff with full jitter: a uniform wait in
    /// `[d/2, d]` where `d = min(base * 2^(retry-1), max_delay)`. `unit` is a random number
    /// in `[0, 1)`.
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>, unit: f64) -> Duration {
        let unit = unit.clamp(0.0, 1.0);
        if let Some(after) = retry_after {
            let jitter = (after.mul_f64(0.1)).min(Duration::from_secs(1)).mul_f64(unit);
            return after + jitter;
        }
        let exp = self.base_delay.saturating_mul(1u32.checked_shl(retry.saturating_sub(1)).unwrap_or(u32::MAX));
        let cap = exp.min(self.max_delay);
        cap.mul_f64(0.5 + 0.5 * unit)
    }
}

/// One provider in a run's chain: the primary first, then its fallbacks.
#[derive(Clone)]
pub struct ChainEntry {
    pub provider: Arc<dyn Provider>,
    pub model: String,
}

impl std::fmt::Debug for ChainEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainEntry").field("provider", &self.provider.name()).field("model", &self.model).finish()
    }
}

/// State of one provider's circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BreakerState {
    /// Calls go through; `failures` in a row so far.
    Closed { failures: u32 },
    /// Calls are refused until `until`; then one trial call is let through.
    Open { until: Timestamp },
    /// The trial call after an open period is in flight (or due).
    HalfOpen,
}

impl BreakerState {
    pub fn name(&self) -> &'static str {
        match self {
            BreakerState::Closed { .. } => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }
}

/// When a breaker opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerPolicy {
    /// Consecutive failed calls (after their retries) that open the breaker.
    pub failure_threshold: u32,
    /// How long an open breaker refuses calls.
    pub open_for: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self { failure_threshold: 5, open_for: Duration::from_secs(60) }
    }
}

/// A circuit breaker: closed → (threshold failures) → open → (after `open_for`) → half-open →
/// closed on success, open again on failure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CircuitBreaker {
    pub state: BreakerState,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self { state: BreakerState::Closed { failures: 0 } }
    }
}

impl CircuitBreaker {
    /// The state as of `now` (an open breaker whose time is up is half-open).
    pub fn current(&self, now: Timestamp) -> BreakerState {
        match self.state {
            BreakerState::Open { until } if now >= until => BreakerState::HalfOpen,
            s => s,
        }
    }

    /// Whether a call may be made now.
    pub fn allows(&self, now: Timestamp) -> bool {
        !matches!(self.current(now), BreakerState::Open { .. })
    }

    pub fn record_success(&mut self) {
        self.state = BreakerState::Closed { failures: 0 };
    }

    pub fn record_failure(&mut self, now: Timestamp, policy: &BreakerPolicy) {
        let open = BreakerState::Open { until: now.plus(policy.open_for) };
        self.state = match self.current(now) {
            BreakerState::Closed { failures } if failures + 1 >= policy.failure_threshold => open,
            BreakerState::Closed { failures } => BreakerState::Closed { failures: failures + 1 },
            BreakerState::HalfOpen | BreakerState::Open { .. } => open,
        };
    }
}

/// The breakers of every provider, shared by the runs of a process.
#[derive(Debug, Default)]
pub struct Breakers {
    pub policy: BreakerPolicy,
    states: Mutex<HashMap<String, CircuitBreaker>>,
}

impl Breakers {
    pub fn new(policy: BreakerPolicy) -> Self {
        Self { policy, states: Mutex::new(HashMap::new()) }
    }

    /// Breakers as rebuilt from the log.
    pub fn from_fold(policy: BreakerPolicy, fold: &BreakerFold) -> Self {
        let b = Self::new(policy);
        if let Ok(mut m) = b.states.lock() {
            m.extend(fold.breakers.iter().map(|(k, v)| (k.clone(), *v)));
        }
        b
    }

    pub fn get(&self, provider: &str) -> CircuitBreaker {
        self.states.lock().ok().and_then(|m| m.get(provider).copied()).unwrap_or_default()
    }

    pub fn allows(&self, provider: &str, now: Timestamp) -> bool {
        self.get(provider).allows(now)
    }

    pub fn record(&self, provider: &str, ok: bool, now: Timestamp) {
        if let Ok(mut m) = self.states.lock() {
            let b = m.entry(provider.to_owned()).or_default();
            if ok { b.record_success() } else { b.record_failure(now, &self.policy) }
        }
    }
}

/// Per-provider call statistics and breaker state, folded from model call events (any run).
#[derive(Debug, Default, Clone)]
pub struct BreakerFold {
    pub policy: BreakerPolicy,
    /// Provider of each model call still open.
    open_calls: HashMap<String, String>,
    pub breakers: HashMap<String, CircuitBreaker>,
    pub stats: HashMap<String, ProviderStats>,
}

/// What the log says about a provider's recent calls.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProviderStats {
    pub calls: u64,
    pub failures: u64,
    pub last_error: Option<String>,
    pub last_call_at: Option<Timestamp>,
}

impl BreakerFold {
    pub fn new(policy: BreakerPolicy) -> Self {
        Self { policy, ..Default::default() }
    }

    /// Applies one event (others than model calls are ignored). A failed attempt that is
    /// retried counts as one failure of the provider, like the live breakers do.
    pub fn apply(&mut self, at: Timestamp, data: &EventData) {
        match data {
            EventData::ModelCallStarted(s) => {
                self.open_calls.insert(s.call_id.clone(), s.provider.clone());
            }
            EventData::ModelCallCompleted(c) => {
                if let Some(p) = self.open_calls.remove(&c.call_id) {
                    self.breakers.entry(p.clone()).or_default().record_success();
                    let s = self.stats.entry(p).or_default();
                    s.calls += 1;
                    s.last_call_at = Some(at);
                }
            }
            EventData::ModelCallFailed(f) => {
                if let Some(p) = self.open_calls.remove(&f.call_id) {
                    // Only errors that say something about the provider's health count.
                    if f.retryable {
                        self.breakers.entry(p.clone()).or_default().record_failure(at, &self.policy);
                    }
                    let s = self.stats.entry(p).or_default();
                    s.calls += 1;
                    s.failures += 1;
                    s.last_error = Some(f.error.clone());
                    s.last_call_at = Some(at);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp(secs * 1_000_000)
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let p = RetryPolicy {
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            ..Default::default()
        };
        assert_eq!(p.delay(1, None, 0.999_999).as_millis(), 99);
        assert_eq!(p.delay(1, None, 0.0), Duration::from_millis(50));
        assert_eq!(p.delay(3, None, 0.0), Duration::from_millis(200));
        assert_eq!(p.delay(10, None, 0.0), Duration::from_millis(500));
        assert_eq!(p.delay(40, None, 0.0), Duration::from_millis(500), "no overflow");
    }

    #[test]
    fn retry_after_is_honoured() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay(1, Some(Duration::from_secs(1)), 0.0), Duration::from_secs(1));
        assert_eq!(p.delay(1, Some(Duration::from_secs(1)), 0.5), Duration::from_millis(1050));
        assert_eq!(p.delay(1, Some(Duration::from_secs(100)), 1.0), Duration::from_secs(101));
    }

    #[test]
    fn breaker_opens_half_opens_and_closes() {
        let policy = BreakerPolicy { failure_threshold: 2, open_for: Duration::from_secs(10) };
        let mut b = CircuitBreaker::default();
        b.record_failure(t(0), &policy);
        assert!(b.allows(t(0)));
        b.record_failure(t(1), &policy);
        assert_eq!(b.current(t(2)), BreakerState::Open { until: t(11) });
        assert!(!b.allows(t(5)));
        assert_eq!(b.current(t(11)), BreakerState::HalfOpen);
        b.record_failure(t(12), &policy);
        assert_eq!(b.current(t(12)), BreakerState::Open { until: t(22) }, "a failed trial opens again");
        b.record_success();
        assert_eq!(b.current(t(12)), BreakerState::Closed { failures: 0 });
    }
}
