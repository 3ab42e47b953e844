//! `descartes-sandbox`: restricts itself (Landlock, seccomp) and `exec`s a command; used by the
//! `shell` tool. See `descartes_tools::sandbox`.
//!
//! Exit codes: the command's own once it runs; 125 when the sandbox could not be set up; 127
//! when the command could not be started.

use std::process::ExitCode;

use descartes_tools::sandbox::{HelperOutcome, SandboxError, helper_main};

fn main() -> ExitCode {
    match helper_main(std::env::args_os().skip(1)) {
        Ok(HelperOutcome::Probed(status)) => match serde_json::to_string(&status) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("descartes-sandbox: {e}");
                ExitCode::from(125)
            }
        },
        Err(e) => {
            eprintln!("descartes-sandbox: {e}");
            ExitCode::from(if matches!(e, SandboxError::Exec { .. }) { 127 } else { 125 })
        }
    }
}
