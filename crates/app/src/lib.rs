//! Descartes' application library: what every front end calls. The CLI, the API server and
//! the daemon parse, print and call this crate; nothing a second front end would need lives in
//! one of them.
//!
//! - [`run`]: the one builder of a run's agent (provider, tools, MCP, permissions, policy,
//!   budgets), start, resume and wrap-up;
//! - [`executor`]: runs tasks on registered agents in git worktrees and records the evidence
//!   (the daemon's task runner);
//! - [`tasks`]: execute, merge, discard and approve a task;
//! - [`error`]: the kinds of problem, with their exit codes and HTTP statuses.

pub mod error;
pub mod executor;
pub mod run;
pub mod service;
pub mod tasks;

pub use error::{AppError, Problem, classify, fail};
