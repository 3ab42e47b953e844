//! Permission prompts. The decision logic lives in the agent loop; a [`Prompter`] asks a human.

use async_trait::async_trait;
use serde_json::Value;

/// What the user is asked about.
#[derive(Debug, Clone)]
pub struct PermissionRequest {
    pub tool: String,
    pub input: Value,
    /// A one-line human description, e.g. `shell: rm -rf build`.
    pub summary: String,
}

/// The user's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptAnswer {
    AllowOnce,
    AllowForRun,
    Deny,
    /// Nobody can be asked (no terminal).
    Unavailable,
}

/// Asks a human whether a sensitive action may proceed.
#[async_trait]
pub trait Prompter: Send + Sync {
    async fn ask(&self, request: &PermissionRequest) -> PromptAnswer;
}

/// A prompter for non-interactive use: nobody can be asked.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoPrompter;

#[async_trait]
impl Prompter for NoPrompter {
    async fn ask(&self, _request: &PermissionRequest) -> PromptAnswer {
        PromptAnswer::Unavailable
    }
}
