//! Domain logic and traits of Descartes.
//!
//! Invariants: this crate does no IO of its own (no SQL, no HTTP, no terminal, no files).
//! Everything external comes in through a trait: [`EventStore`], [`Provider`], [`Tool`],
//! [`Prompter`], [`OutputSink`], [`AgentCli`]. The agent loop ([`agent`]), the coding-agent CLI
//! driver ([`external`]) and the run fold ([`state`]) are pure logic over those traits, which is
//! what makes them testable with in-memory fakes.

pub mod agent;
pub mod audit;
pub mod batch;
pub mod cost;
pub mod error;
pub mod external;
pub mod follow;
pub mod glob;
mod outbox;
pub mod permission;
pub mod policy;
pub mod provider;
pub mod redact;
pub mod resilience;
pub mod routing;
pub mod session;
pub mod state;
pub mod store;
pub mod task;
pub mod testing;
pub mod tool;

pub use agent::{Agent, AgentConfig, OutputSink, RunOutcome};
pub use cost::{Budget, ByteEstimate, Price, PriceTable, TokenCounter};
pub use error::{CoreError, Result};
pub use external::{
    AgentCli, CliAnswer, CliEvent, CliPermissionRequest, CliRequest, CliSession, ExternalAgent, ExternalOutcome,
};
pub use outbox::STOP_REASON;
pub use permission::{PermissionRequest, PromptAnswer, Prompter};
pub use provider::{ModelRequest, ModelStream, Provider, ProviderError, ResponseAssembler, StreamEvent};
pub use resilience::{
    BreakerFold, BreakerPolicy, BreakerState, Breakers, ChainEntry, CircuitBreaker, ProviderStats, Resilience,
    RetryPolicy,
};
pub use state::{RunState, RunStatus};
pub use store::{DeferredAppend, EventStore, RunSummary, StoreError};
pub use task::{Clock, SystemClock, TaskError, TaskFilter, TaskStore, TaskTxn};
pub use tool::{Recovery, Tool, ToolContext, ToolOutput, ToolRegistry, ToolStats, call_with_timeout};
