//! The `runs` projection: what each lifecycle event changes in a run's summary.

use descartes_protocol::{Event, EventData};

/// The change one event makes to the runs projection.
pub(crate) enum RunChange<'a> {
    Insert { prompt: &'a str, provider: &'a str, model: &'a str },
    Status { status: &'static str, provider: Option<(&'a str, &'a str)> },
}

pub(crate) fn run_change(event: &Event) -> Option<RunChange<'_>> {
    match &event.data {
        EventData::RunStarted(s) => {
            Some(RunChange::Insert { prompt: &s.prompt, provider: &s.provider, model: &s.model })
        }
        EventData::RunResumed(r) => {
            Some(RunChange::Status { status: "running", provider: Some((&r.provider, &r.model)) })
        }
        EventData::RunCompleted(_) => Some(RunChange::Status { status: "completed", provider: None }),
        EventData::RunFailed(_) => Some(RunChange::Status { status: "failed", provider: None }),
        EventData::RunCancelled(_) => Some(RunChange::Status { status: "cancelled", provider: None }),
        _ => None,
    }
}
