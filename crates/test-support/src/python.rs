//! Python clients for tests: whether `python3` can import `websockets` (13 or newer, the
//! `websockets.asyncio` API). `.ci/run` installs it; without it [`websockets`] prints a loud
//! skip notice and returns false, unless `DESCARTES_TEST_REQUIRE_WS=1`, which makes it panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::OnceLock;

/// Whether the Python WebSocket client can run.
pub fn websockets() -> bool {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    let ready = READY.get_or_init(|| {
        match std::process::Command::new("python3").args(["-c", "import websockets.asyncio.client"]).output() {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().lines().last().unwrap_or("").to_owned()),
            Err(e) => Err(format!("cannot run python3: {e}")),
        }
    });
    match ready {
        Ok(()) => true,
        Err(why) => {
            let message = format!(
                "the Python WebSocket client cannot run ({why}); install it with `python3 -m pip install websockets`"
            );
            if std::env::var("DESCARTES_TEST_REQUIRE_WS").as_deref() == Ok("1") {
                panic!("{message} and DESCARTES_TEST_REQUIRE_WS=1");
            }
            eprintln!(
                "\n!!!!!!!! SKIPPED: {message}; set DESCARTES_TEST_REQUIRE_WS=1 to make this a failure !!!!!!!!\n"
            );
            false
        }
    }
}
