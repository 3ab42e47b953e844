//! The policy engine (docs written below, once the code settles).

mod cond;
mod error;
mod facts;
mod file;
mod pattern;
mod set;
#[cfg(test)]
mod tests;
mod yaml;

pub use error::{Diagnostic, DiagnosticKind, DisplayDiagnostics, PolicyError, Result};
pub use facts::{
    Access, AgentFacts, DecisionInput, Effect, Layer, PolicyDecision, Stage, TaskFacts, ToolFacts, UsageFacts,
};
pub use file::{BudgetKind, Budgets, Origin, Rule, VERSION};
pub use set::{
    AGENT_POLICIES, GLOBAL_POLICY, PROJECT_POLICY, PolicySet, agent_policy_path, validate_file, validate_str,
};
