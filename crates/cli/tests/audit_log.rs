//! The whole log is tamper-evident: runs and sessions too, not only tasks. Rows edited or
//! deleted by hand (the append-only triggers dropped first) make `audit verify` fail with the
//! seq concerned.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

fn run_two(env: &Env) {
    for goal in ["first goal", "second goal"] {
        let out = env.run(&["run", "-p", "openai", goal]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
}

fn tamper(env: &Env, sql: &str) {
    let db = rusqlite::Connection::open(env.project().join(".descartes/descartes.db")).unwrap();
    db.execute_batch(&format!(
        "DROP TRIGGER IF EXISTS events_append_only_update; DROP TRIGGER IF EXISTS events_append_only_delete; {sql}"
    ))
    .unwrap();
}

fn verify(env: &Env) -> std::process::Output {
    env.run(&["audit", "verify"])
}

#[test]
fn an_intact_log_verifies_and_counts_every_stream() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["fine"])));
    env.init();
    run_two(&env);
    let out = verify(&env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("audit trail intact:") && stdout(&out).contains("in 2 trails"), "{}", stdout(&out));
}

#[test]
fn a_deleted_run_event_is_found_with_its_seq() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["fine"])));
    env.init();
    run_two(&env);
    let events = env.events(env.runs()[1]["run_id"].as_str().unwrap());
    let seq = events[1]["seq"].as_i64().unwrap();
    tamper(&env, &format!("DELETE FROM events WHERE seq = {seq};"));
    let out = verify(&env);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains(&format!("event seq {seq} is missing from the log")), "{err}");
    assert!(err.contains(&format!("#{seq} is not in the log")), "{err}");
}

#[test]
fn an_edited_or_reordered_run_event_is_found_with_its_seq() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["the true answer"])));
    env.init();
    run_two(&env);
    let run = env.runs()[0]["run_id"].as_str().unwrap().to_owned();
    let events = env.events(&run);
    let message = events.iter().rfind(|e| e["type"] == "message").unwrap();
    let seq = message["seq"].as_i64().unwrap();
    tamper(
        &env,
        &format!("UPDATE events SET data = replace(data, 'the true answer', 'a false one') WHERE seq = {seq};"),
    );
    let out = verify(&env);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stderr(&out).contains(&format!("#{seq} was changed in the log")), "{}", stderr(&out));

    // Two events of a stream swapped (their seqs exchanged).
    let env = Env::new(|_| Reply::Stream(openai::text(&["fine"])));
    env.init();
    run_two(&env);
    let run = env.runs()[0]["run_id"].as_str().unwrap().to_owned();
    let events = env.events(&run);
    let (a, b) = (events[0]["seq"].as_i64().unwrap(), events[1]["seq"].as_i64().unwrap());
    tamper(
        &env,
        &format!(
            "UPDATE events SET seq = -1 WHERE seq = {a}; UPDATE events SET seq = {a} WHERE seq = {b}; \
             UPDATE events SET seq = {b} WHERE seq = -1;"
        ),
    );
    let out = verify(&env);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stderr(&out).contains(&format!("#{a} was changed in the log")), "{}", stderr(&out));
}
