//! Python modules tests drive: whether `python3` can import one. `.ci/run` installs them; without
//! one, [`module`] prints a loud skip notice and returns false, unless the module's `REQUIRE`
//! variable is `1` (as in CI), which makes it panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// Whether `python3 -c "import IMPORT"` works (checked once per process). `what` names the
/// module for the messages, `pip` is what to install, `require` the variable that turns a
/// missing module into a failure.
pub fn module(import: &str, what: &str, pip: &str, require: &str) -> bool {
    static CHECKED: OnceLock<Mutex<HashMap<String, Result<(), String>>>> = OnceLock::new();
    let ready = CHECKED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .entry(import.to_owned())
        .or_insert_with(|| {
            match std::process::Command::new("python3").args(["-c", &format!("import {import}")]).output() {
                Ok(o) if o.status.success() => Ok(()),
                Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().lines().last().unwrap_or("").to_owned()),
                Err(e) => Err(format!("cannot run python3: {e}")),
            }
        })
        .clone();
    match ready {
        Ok(()) => true,
        Err(why) => {
            let message = format!("{what} cannot run ({why}); install it with `python3 -m pip install {pip}`");
            if std::env::var(require).as_deref() == Ok("1") {
                panic!("{message} and {require}=1");
            }
            eprintln!("\n!!!!!!!! SKIPPED: {message}; set {require}=1 to make this a failure !!!!!!!!\n");
            false
        }
    }
}

/// Whether the Python WebSocket client (`websockets` 13 or newer, the `websockets.asyncio` API)
/// can run; `DESCARTES_TEST_REQUIRE_WS=1` makes its absence a failure.
pub fn websockets() -> bool {
    module("websockets.asyncio.client", "the Python WebSocket client", "websockets", "DESCARTES_TEST_REQUIRE_WS")
}

/// Whether Python's `jinja2` (the reference renderer of chat templates) can run;
/// `DESCARTES_TEST_REQUIRE_JINJA2=1` makes its absence a failure.
pub fn jinja2() -> bool {
    module("jinja2", "the reference renderer (Python's jinja2)", "jinja2", "DESCARTES_TEST_REQUIRE_JINJA2")
}
