//! The composition root of Descartes: finds where state lives (project or direct mode), loads
//! the layered configuration, and wires the store, providers and tools for the CLI (and later
//! the daemon).
//!
//! Invariants: no terminal IO here (the CLI prints); secrets (API keys) are read from the
//! environment or config only when a provider is built and never appear in `Debug`, errors or
//! `config show` output.

pub mod audit;
pub mod config;
pub mod context;
pub mod daemon;
pub mod guardrails;
pub mod locks;
pub mod mcp;
pub mod places;
pub mod policy_gate;
mod providers;
pub mod serve;
mod wiring;

pub use config::{Config, ConfigError, ProviderConfig};
/// What is known about provider kinds and the built-in providers (one table).
pub use descartes_providers::catalog;
pub use locks::RunLock;
pub use places::{Mode, Places};
pub use providers::Selection;
pub use wiring::{Runtime, RuntimeError, Stores, provider_env};
