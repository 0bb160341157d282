//! The official Python SDKs (`openai`, `anthropic`) against the gateway: the suite in
//! `tests/sdk` makes whole and streamed calls of every kind through the gateway in front of
//! the mock upstream and checks, per call, the text and usage the SDK sees and the usage and
//! cost recorded for its user, to the micro-dollar (a stream its caller leaves early too);
//! and that a refusal is the SDK's `RateLimitError`.
//!
//! The interpreter is `SPENDGUARD_SDK_PYTHON`, else the workspace's `.venv-sdk`
//! (`python3 -m venv .venv-sdk && .venv-sdk/bin/pip install openai anthropic pytest`).
//! Absent, the test prints `SKIPPED` and appends a line to `SPENDGUARD_TEST_SKIP_LOG`.

use std::path::PathBuf;
use std::process::Command;

use serde_json::json;
use spendguard_gateway::mock::usage::*;

use crate::support::*;

/// Tests in `tests/sdk`: a run that passes fewer (collected nothing, skipped some) fails.
const PYTHON_TESTS: u64 = 16;
/// Calls of the suite that reach the provider and are charged (the refused ones do not).
const CHARGED_CALLS: usize = 13;
/// `count_tokens` calls: forwarded, never charged.
const FREE_CALLS: u64 = 1;

fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SPENDGUARD_SDK_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv-sdk/bin/python");
    venv.exists().then_some(venv)
}

fn skipped(why: &str) {
    eprintln!("SKIPPED: {why}");
    if let Ok(log) = std::env::var("SPENDGUARD_TEST_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(f, "{why}");
        }
    }
}

/// What one call must be charged: spendguard's input (cached included), cached input,
/// output and cost.
fn charged(input: u64, cached: u64, output: u64, prices: (&str, &str, &str)) -> serde_json::Value {
    json!({
        "input_tokens": input,
        "cached_input_tokens": cached,
        "output_tokens": output,
        "cost_micros": cost(input - cached, cached, output, prices).micros(),
    })
}

/// The counts of pytest's last line (`14 passed, 1 warning in 2.31s`), by outcome.
fn summary(stdout: &str) -> Vec<(String, u64)> {
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let counts = last.trim().trim_matches('=').trim();
    let counts = counts.rsplit_once(" in ").map_or(counts, |(c, _)| c);
    counts
        .split(", ")
        .filter_map(|part| {
            let (n, what) = part.split_once(' ')?;
            Some((what.to_owned(), n.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_sdks_are_charged_exactly() {
    let Some(python) = python() else {
        skipped("the Python SDKs are not installed (.venv-sdk or SPENDGUARD_SDK_PYTHON)");
        return;
    };
    let h = start("").await;
    let gpt = ("2.50", "1.25", "10.00");
    let claude = ("3.00", "0.30", "15.00");
    let expect = json!({
        "mock": {
            "chat": {
                "prompt_tokens": CHAT_PROMPT,
                "cached_tokens": CHAT_CACHED,
                "completion_tokens": CHAT_COMPLETION,
                "reasoning_tokens": CHAT_REASONING,
            },
            "responses": {
                "input_tokens": RESPONSES_INPUT,
                "cached_tokens": RESPONSES_CACHED,
                "output_tokens": RESPONSES_OUTPUT,
            },
            "embeddings": {"prompt_tokens": EMBEDDINGS_PROMPT},
            "messages": {
                "input_tokens": MESSAGES_INPUT,
                "cache_read_input_tokens": MESSAGES_CACHE_READ,
                "cache_creation_input_tokens": MESSAGES_CACHE_CREATION,
                "output_tokens": MESSAGES_OUTPUT,
            },
            "count_tokens": COUNT_TOKENS,
        },
        "text": {
            "whole": "Hello from the mock.",
            "streamed": "piece 0 piece 1 piece 2 ",
        },
        "charged": {
            "chat": charged(CHAT_PROMPT, CHAT_CACHED, CHAT_COMPLETION, gpt),
            "responses": charged(RESPONSES_INPUT, RESPONSES_CACHED, RESPONSES_OUTPUT, gpt),
            "embeddings": charged(EMBEDDINGS_PROMPT, 0, 0, ("0.02", "0.02", "0.02")),
            // Cache writes are priced as input, cache reads as cached input.
            "messages": charged(
                MESSAGES_INPUT + MESSAGES_CACHE_READ + MESSAGES_CACHE_CREATION,
                MESSAGES_CACHE_READ,
                MESSAGES_OUTPUT,
                claude,
            ),
        },
    });
    let suite = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk");
    let (url, key) = (h.url.clone(), h.key.clone());
    let out = tokio::task::spawn_blocking(move || {
        // pytest's cache and Python's bytecode stay out of the source tree.
        let scratch = tempfile::tempdir().unwrap();
        Command::new(&python)
            .current_dir(scratch.path())
            .args(["-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs"])
            .arg(&suite)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("SPENDGUARD_SDK_URL", &url)
            .env("SPENDGUARD_SDK_KEY", &key)
            .env("SPENDGUARD_SDK_ADMIN_KEY", ADMIN)
            .env("SPENDGUARD_SDK_TENANT", "acme")
            .env("SPENDGUARD_SDK_DATE", "2026-03-10")
            .env("SPENDGUARD_SDK_EXPECT", expect.to_string())
            .output()
            .unwrap_or_else(|e| panic!("could not run {}: {e}", python.display()))
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the SDK suite failed:\n{stdout}\n{stderr}"
    );
    let counts = summary(&stdout);
    let passed = counts
        .iter()
        .find(|(what, _)| what == "passed")
        .map_or(0, |(_, n)| *n);
    let other: Vec<_> = counts
        .iter()
        .filter(|(what, _)| !matches!(what.as_str(), "passed" | "warning" | "warnings"))
        .collect();
    assert!(
        passed == PYTHON_TESTS && other.is_empty(),
        "expected {PYTHON_TESTS} SDK tests to pass, got {counts:?}:\n{stdout}"
    );
    eprintln!("{}", stdout.lines().last().unwrap_or_default());

    // Seen from the gateway's side: every charged call recorded once, as a success; the
    // refused calls never reached the provider.
    let rows = h.records().await;
    assert_eq!(rows.len(), CHARGED_CALLS, "{rows:#?}");
    for r in &rows {
        assert_eq!(r.status, "success", "{r:?}");
        assert!(r.upstream.is_some() && r.request_id.is_some(), "{r:?}");
    }
    assert_eq!(h.mock.calls(), CHARGED_CALLS as u64 + FREE_CALLS);
    h.stop().await;
}

#[test]
fn pytest_summaries_are_read_by_outcome() {
    assert_eq!(
        summary("....\n14 passed, 1 warning in 2.31s\n"),
        [("passed".to_owned(), 14), ("warning".to_owned(), 1)]
    );
    assert_eq!(
        summary("== 1 failed, 13 passed in 0.50s ==\n"),
        [("failed".to_owned(), 1), ("passed".to_owned(), 13)]
    );
    assert_eq!(summary("no tests ran in 0.01s\n"), []);
}
