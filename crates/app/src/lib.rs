//! Descartes' application library: what every front end calls. The CLI, the API server and
//! the daemon parse, print and call this crate; nothing a second front end would need lives in
//! one of them.
//!
//! - [`run`]: the one builder of a run's agent (provider, tools, MCP, permissions, policy,
//!   budgets), start, resume and wrap-up;
//! - [`executor`]: runs tasks on registered agents in git worktrees and records the evidence
//!   (the daemon's task runner);
//! - [`tasks`]: execute, merge, discard and approve a task; resolve, create and show one;
//! - [`audit`]: a task's audit trail and its verification, the log's verification, the
//!   policy decisions recorded for a task or a run;
//! - [`listings`]: the agents, chat sessions and providers, as the CLI's `--json` lists them;
//! - [`error`]: the kinds of problem, with their exit codes and HTTP statuses.

pub mod audit;
pub mod error;
pub mod executor;
pub mod listings;
pub mod run;
pub mod service;
pub mod tasks;

pub use error::{AppError, Problem, classify, fail};
