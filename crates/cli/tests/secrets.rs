//! Secrets coming back are redacted: a server that echoes the key, a key inside a base URL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

#[test]
fn a_401_that_echoes_the_authorization_header_leaks_the_key_nowhere() {
    let env = Env::new(|req: &RecordedRequest| {
        let auth = req.header("authorization").unwrap_or_default().to_owned();
        Reply::openai_error(401, "invalid_request_error", Some("invalid_api_key"), &format!("Bad header: {auth}"))
    });
    env.init();
    let human = env.run(&["run", "-p", "openai", "hello"]);
    assert_eq!(human.status.code(), Some(1), "{}", stderr(&human));
    assert!(stderr(&human).contains("Bad header: Bearer [REDACTED]"), "{}", stderr(&human));
    let json = env.run(&["run", "--json", "-p", "openai", "hello"]);
    let logs = env.run(&["logs", "--json"]);
    let providers = env.run(&["providers", "--json"]);
    for out in [&human, &json, &logs, &providers] {
        assert!(
            !stdout(out).contains(&openai_key()) && !stderr(out).contains(&openai_key()),
            "{}{}",
            stdout(out),
            stderr(out)
        );
    }
    assert!(stdout(&logs).contains("[REDACTED]"), "{}", stdout(&logs));
    let db = std::fs::read(env.project().join(".descartes/descartes.db")).unwrap();
    let wal = std::fs::read(env.project().join(".descartes/descartes.db-wal")).unwrap_or_default();
    for bytes in [db, wal] {
        assert!(!bytes.windows(openai_key().len()).any(|w| w == openai_key().as_bytes()), "the key is in the database");
    }
}

#[test]
fn config_show_hides_credentials_in_urls() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["fine"])));
    env.init();
    let url = env.server.openai_base_url().replace("http://", "http://user:pw-in-the-url-123@");
    let out = env.cmd(&["config", "show"]).env("OPENAI_BASE_URL", &url).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).contains("pw-in-the-url-123"), "{}", stdout(&out));
    assert!(stdout(&out).contains("http://[REDACTED]@"), "{}", stdout(&out));
}

#[test]
#[should_panic(expected = "leaked into")]
fn the_scan_of_a_test_s_files_finds_a_leaked_key() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["fine"])));
    std::fs::write(env.project().join("leak.log"), format!("Authorization: Bearer {}", openai_key())).unwrap();
    drop(env);
}
