//! Retries, rate limits, fallback, circuit breakers, budgets and costs, through the real binary
//! against fake model servers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn rate_limited(retry_after: &str) -> Reply {
    Reply::openai_error(429, "requests", Some("rate_limit_exceeded"), "Rate limit reached for requests")
        .with_header("retry-after", retry_after)
}

fn config(env: &Env, text: &str) {
    let path = env.project().join(".descartes/config.toml");
    let mut current = std::fs::read_to_string(&path).unwrap_or_default();
    current.push_str(text);
    std::fs::write(path, current).unwrap();
}

/// The newest run's id.
fn latest(env: &Env) -> String {
    env.runs()[0]["run_id"].as_str().unwrap().to_owned()
}

fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

#[test]
fn retry_after_is_honoured_and_the_run_succeeds() {
    let env = Env::new(sequence(vec![rate_limited("1"), rate_limited("1"), Reply::Stream(openai::text(&["made it"]))]));
    env.init();
    let started = Instant::now();
    let out = env.run(&["run", "-p", "openai", "hello"]);
    let elapsed = started.elapsed();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "made it\n");
    assert!(elapsed >= Duration::from_secs(2), "waited only {elapsed:?}");
    assert!(elapsed < Duration::from_secs(6), "waited {elapsed:?}");
    assert_eq!(env.server.request_count(), 3);
    assert!(stderr(&out).contains("retrying in 1."), "{}", stderr(&out));
    let events = env.events(&env.run_id());
    assert_log_invariants(&events);
    let failed = of_type(&events, "model_call_failed");
    assert_eq!(failed.len(), 2);
    for (i, f) in failed.iter().enumerate() {
        assert_eq!(f["data"]["attempt"], i as u64 + 1);
        let ms = f["data"]["retry_in_ms"].as_u64().unwrap();
        assert!((1000..=1100).contains(&ms), "retry-after 1 s honoured (with at most 10% jitter): {ms}");
        assert!(f["data"]["error"].as_str().unwrap().contains("429"));
    }
    assert_eq!(of_type(&events, "model_call_completed").len(), 1);
    assert_eq!(env.runs()[0]["status"], "completed");
}

#[test]
fn errors_that_retrying_cannot_fix_are_not_retried() {
    for (name, reply) in [
        (
            "insufficient_quota",
            Reply::openai_error(
                429,
                "insufficient_quota",
                Some("insufficient_quota"),
                "You exceeded your current quota",
            ),
        ),
        ("bad request", Reply::openai_error(400, "invalid_request_error", None, "Invalid 'messages'")),
        (
            "bad key",
            Reply::openai_error(401, "invalid_request_error", Some("invalid_api_key"), "Incorrect API key provided"),
        ),
    ] {
        let env = Env::new(move |_| reply.clone());
        env.init();
        let out = env.run(&["run", "-p", "openai", "hello"]);
        assert_eq!(out.status.code(), Some(1), "{name}: {}", stderr(&out));
        assert_eq!(env.server.request_count(), 1, "{name}: not retried");
        let events = env.events(&env.run_id());
        let failed = of_type(&events, "model_call_failed");
        assert_eq!(failed.len(), 1, "{name}");
        assert_eq!(failed[0]["data"]["retryable"], false, "{name}");
        assert!(failed[0]["data"]["retry_in_ms"].is_null(), "{name}");
        assert_eq!(env.runs()[0]["status"], "failed", "{name}");
    }
}

#[test]
fn a_long_rate_limit_parks_the_run_until_it_resets() {
    let env = Env::new(sequence(vec![rate_limited("2"), Reply::Stream(openai::text(&["after the reset"]))]));
    env.init();
    config(&env, "\n[retry]\npark_after_secs = 1\n");
    let started = Instant::now();
    let mut child = env.spawn(&["run", "-p", "openai", "hello"]);
    // While it waits, the run is `parked` in the list.
    let mut seen_parked = false;
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(50));
        if env.runs().first().is_some_and(|r| r["status"] == "parked") {
            seen_parked = true;
            break;
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success());
    assert!(seen_parked, "the run was listed as parked while it waited");
    assert!(started.elapsed() >= Duration::from_secs(2));
    let events = env.events(&env.run_id());
    let parked = of_type(&events, "run_parked");
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0]["data"]["provider"], "openai");
    assert_eq!(env.runs()[0]["status"], "completed");
}

#[test]
fn a_dead_primary_falls_back_and_the_run_finishes() {
    let env = Env::new(|req: &RecordedRequest| {
        if req.is_anthropic() {
            Reply::Stream(anthropic::text(&["answered by the fallback"]))
        } else {
            Reply::openai_error(503, "server_error", None, "unavailable")
        }
    });
    env.init();
    config(&env, "\n[retry]\nmax_retries = 1\nbase_delay_ms = 10\n");
    let out = env.run(&["run", "-p", "openai", "--fallback", "anthropic", "hello"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "answered by the fallback\n");
    assert!(stderr(&out).contains("continuing on anthropic"), "{}", stderr(&out));
    let events = env.events(&env.run_id());
    assert_log_invariants(&events);
    let switched = of_type(&events, "provider_switched");
    assert_eq!(switched.len(), 1);
    assert_eq!(switched[0]["data"]["from"], "openai");
    assert_eq!(switched[0]["data"]["to"], "anthropic");
    // Two attempts on the primary (one retry), then the fallback.
    let providers: Vec<&str> =
        of_type(&events, "model_call_started").iter().map(|e| e["data"]["provider"].as_str().unwrap()).collect();
    assert_eq!(providers, ["openai", "openai", "anthropic"]);
    let run = &env.runs()[0];
    assert_eq!(run["status"], "completed");
    assert_eq!(run["provider"], "anthropic");

    // A connection that is refused (nothing listening) falls back the same way.
    let out = env
        .cmd(&["run", "-p", "openai", "--fallback", "anthropic", "hello again"])
        .env("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "answered by the fallback\n");
}

#[test]
fn repeated_failures_open_the_circuit_breaker() {
    let env = Env::new(|req: &RecordedRequest| {
        if req.is_anthropic() {
            Reply::Stream(anthropic::text(&["fine"]))
        } else {
            Reply::openai_error(500, "server_error", None, "boom")
        }
    });
    env.init();
    config(&env, "\n[retry]\nmax_retries = 2\nbase_delay_ms = 5\nbreaker_failures = 3\nbreaker_open_secs = 600\n");
    let out = env.run(&["run", "-p", "openai", "hello"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(env.server.request_count(), 3);

    let shown = env.run(&["providers", "--json"]);
    assert!(shown.status.success(), "{}", stderr(&shown));
    let rows: Vec<Value> = serde_json::from_slice(&shown.stdout).unwrap();
    let openai = rows.iter().find(|r| r["name"] == "openai").unwrap();
    assert_eq!(openai["circuit"], "open", "{openai}");
    assert_eq!(openai["failures"], 3);
    let anthropic = rows.iter().find(|r| r["name"] == "anthropic").unwrap();
    assert_eq!(anthropic["circuit"], "closed");
    let human = stdout(&env.run(&["providers"]));
    assert!(human.lines().any(|l| l.starts_with("openai ") && l.contains("open")), "{human}");

    // The next run does not call the open provider: it goes straight to the fallback.
    let before = env.server.request_count();
    let out = env.run(&["run", "-p", "openai", "--fallback", "anthropic", "hello"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(env.server.request_count(), before + 1);
    assert!(env.server.last_request().unwrap().is_anthropic());
    let events = env.events(&latest(&env));
    let switched = of_type(&events, "provider_switched");
    assert!(switched[0]["data"]["reason"].as_str().unwrap().contains("circuit breaker"));
}

#[test]
fn a_token_cap_stops_the_run_and_resume_raises_it() {
    // Each call uses 10 + 5 tokens; the model calls a tool twice, then answers.
    let env = Env::new(|req: &RecordedRequest| match req.tool_results().len() {
        0 => Reply::Stream(openai::tool_call("c1", "read_file", &[r#"{"path":"a.txt"}"#])),
        1 => Reply::Stream(openai::tool_call("c2", "read_file", &[r#"{"path":"a.txt"}"#])),
        _ => Reply::Stream(openai::text(&["done"])),
    });
    env.init();
    // A short system prompt, so that the first call's estimate fits the cap.
    config(&env, "system_prompt = \"Be brief.\"\n");
    std::fs::write(env.project().join("a.txt"), "x").unwrap();
    let out = env.run(&["run", "-p", "openai", "--max-tokens", "20", "read it twice"]);
    assert_eq!(out.status.code(), Some(8), "{}", stderr(&out));
    assert!(stderr(&out).contains("budget exceeded") && stderr(&out).contains("--max-tokens"), "{}", stderr(&out));
    // The first call was made (estimated within the cap), the second was not.
    assert_eq!(env.server.request_count(), 1);
    let id = env.run_id();
    assert_eq!(env.runs()[0]["status"], "budget_exceeded");
    assert_eq!(env.runs()[0]["tokens"], 15);
    let events = env.events(&id);
    let exceeded = of_type(&events, "budget_exceeded");
    assert_eq!(exceeded.len(), 1);
    assert_eq!(exceeded[0]["data"]["kind"], "tokens");
    assert_eq!(exceeded[0]["data"]["spent"], 15.0);

    // Resuming without a higher cap stops again at once; with one, the run finishes.
    let again = env.run(&["resume", &id]);
    assert_eq!(again.status.code(), Some(8), "{}", stderr(&again));
    assert_eq!(env.server.request_count(), 1);
    let resumed = env.run(&["resume", &id, "--max-tokens", "1000"]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert_eq!(stdout(&resumed), "done\n");
    assert_eq!(env.runs()[0]["status"], "completed");
    assert_eq!(env.runs()[0]["tokens"], 45);
    assert_log_invariants(&env.events(&id));
}

#[test]
fn a_cost_cap_stops_before_an_expensive_call_and_costs_are_recorded() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["cheap answer"])));
    env.init();
    // $1 per input token and $2 per output token: 10 in + 5 out = $20 per call.
    config(&env, "\n[prices.\"pricey\"]\ninput = 1000000.0\noutput = 2000000.0\n");
    let out = env.run(&["run", "-p", "openai", "-m", "pricey-1", "--max-cost-usd", "5", "hello"]);
    assert_eq!(out.status.code(), Some(8), "{}", stderr(&out));
    assert_eq!(env.server.request_count(), 0, "stopped before the call");
    assert!(stderr(&out).contains("--max-cost-usd"), "{}", stderr(&out));

    let out = env.run(&["run", "-p", "openai", "-m", "pricey-1", "--max-cost-usd", "500", "hello"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = latest(&env);
    let events = env.events(&id);
    let call = of_type(&events, "model_call_completed")[0];
    assert_eq!(call["data"]["cost_usd"], 20.0);
    let run = env.runs().into_iter().find(|r| r["run_id"] == id.as_str()).unwrap();
    assert_eq!(run["cost_usd"], 20.0);
    assert_eq!(run["tokens"], 15);
    // Totals in `list` and `logs`.
    let list = stdout(&env.run(&["list"]));
    assert!(list.contains("$20.00") && list.contains("COST"), "{list}");
    let logs = stdout(&env.run(&["logs", &id]));
    assert!(logs.contains("total: 1 model calls, 15 tokens") && logs.contains("$20.0000"), "{logs}");
    // A known model gets the built-in price.
    let out = env.run(&["run", "-p", "openai", "-m", "gpt-4o-mini", "hello"]);
    assert!(out.status.success());
    let events = env.events(&latest(&env));
    let cost = of_type(&events, "model_call_completed")[0]["data"]["cost_usd"].as_f64().unwrap();
    assert!((cost - (10.0 * 0.15 + 5.0 * 0.60) / 1e6).abs() < 1e-12, "{cost}");
}

#[test]
fn bad_budget_flags_are_usage_errors() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["x"])));
    env.init();
    let out = env.run(&["run", "-p", "openai", "--max-cost-usd", "-1", "hello"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = env.run(&["run", "-p", "openai", "--max-tokens", "0", "hello"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--max-tokens"), "{}", stderr(&out));
    assert_eq!(env.server.request_count(), 0);
}

#[test]
fn a_silent_server_fails_the_attempt_after_the_idle_timeout_and_says_so() {
    let env = Env::new(|_| Reply::Stream(with_delay(openai::text(&["late", " answer"]), Duration::from_secs(8))));
    env.init();
    std::fs::write(
        env.project().join(".descartes/config.toml"),
        "[providers.openai]\ntimeout_secs = 1\n[retry]\nmax_retries = 1\nbase_delay_ms = 10\n",
    )
    .unwrap();
    let started = std::time::Instant::now();
    let out = env.run(&["run", "-p", "openai", "hello"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(7), "{:?}", started.elapsed());
    assert!(stderr(&out).contains("went silent"), "{}", stderr(&out));
    let events = env.events(&env.run_id());
    assert_eq!(count(&events, "model_call_failed"), 2, "retried once: {events:#?}");
}

/// A server that streams no usage (as llama.cpp's does): Descartes counts each call itself,
/// marks it estimated, and the token cap stops the run on those counts.
#[test]
fn usage_a_server_does_not_report_is_counted_estimated_and_capped() {
    fn no_usage(chunks: Vec<descartes_test_support::Chunk>) -> Vec<descartes_test_support::Chunk> {
        chunks
            .into_iter()
            .filter(|c| !matches!(c, descartes_test_support::Chunk::Data(d) if d.contains("\"usage\"")))
            .collect()
    }
    let env = Env::new(|req: &RecordedRequest| match req.tool_results().len() {
        0 => Reply::Stream(no_usage(openai::tool_call("c1", "read_file", &[r#"{"path":"a.txt"}"#]))),
        _ => Reply::Stream(no_usage(openai::text(&["done"]))),
    });
    env.init();
    config(&env, "system_prompt = \"Be brief.\"\n");
    std::fs::write(env.project().join("a.txt"), "x").unwrap();
    // Uncapped: both calls are counted and marked.
    let out = env.run(&["run", "-p", "openai", "read it"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = env.run_id();
    let events = env.events(&id);
    let calls = of_type(&events, "model_call_completed");
    assert_eq!(calls.len(), 2);
    let mut total = 0;
    for call in &calls {
        let usage = &call["data"]["usage"];
        assert_eq!(usage["estimated"], true, "{usage}");
        assert!(usage["input_tokens"].as_u64().unwrap() > 10, "the tools' specs and the prompt count: {usage}");
        assert!(usage["output_tokens"].as_u64().unwrap() > 0, "{usage}");
        total += usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap();
    }
    let run = &env.runs()[0];
    assert_eq!(run["tokens"].as_u64(), Some(total));
    assert_eq!(run["estimated_tokens"].as_u64(), Some(total));
    assert!(stdout(&env.run(&["list"])).contains('~'));

    // Capped just above the first call's count: the second call is not made.
    let first = calls[0]["data"]["usage"]["input_tokens"].as_u64().unwrap();
    let requests = env.server.request_count();
    let cap = (first + 40).to_string();
    let out = env.run(&["run", "-p", "openai", "--max-tokens", &cap, "read it"]);
    assert_eq!(out.status.code(), Some(8), "{}", stderr(&out));
    assert_eq!(env.server.request_count(), requests + 1, "the second call was made despite the cap");
}
