//! The OpenAPI document against the live server, by a property-based fuzzer: schemathesis
//! generates requests from `/openapi.json` (valid and invalid ones) for every operation, with
//! the admin key and with a tenant key, and checks that no answer is a 5xx and that every
//! answer (status, content type, headers, body) is one the document describes.
//!
//! schemathesis is found through `SPENDGUARD_SCHEMATHESIS` (the executable), else in the
//! workspace's `.venv-schemathesis` (`python3 -m venv .venv-schemathesis &&
//! .venv-schemathesis/bin/pip install schemathesis`). Absent, the test prints `SKIPPED`
//! and appends a line to `SPENDGUARD_TEST_SKIP_LOG`.

use std::path::PathBuf;
use std::process::Command;

use serde_json::json;

use crate::support::*;

/// Generated cases per operation and run (two runs: admin and tenant key).
const EXAMPLES_PER_OPERATION: &str = "20";

fn schemathesis() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SPENDGUARD_SCHEMATHESIS") {
        return Some(PathBuf::from(p));
    }
    let venv =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv-schemathesis/bin/schemathesis");
    venv.exists().then_some(venv)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_nothing_undocumented() {
    let Some(st) = schemathesis() else {
        skipped("schemathesis not installed (.venv-schemathesis or SPENDGUARD_SCHEMATHESIS)");
        return;
    };
    let s = spawn("[tiers.free]\nrequests_per_minute = \"unlimited\"\n").await;
    let tenant = s.tenant_key("acme").await;
    // Something to report on, a stored override and a budget to read back.
    let (st_, r) = s
        .post("/v1/reservations", ADMIN, reserve_body("acme", "alice"))
        .await;
    assert_eq!(st_, 201, "{r}");
    let id = r["reservation_id"].as_str().unwrap().to_owned();
    let (st_, _) = s
        .post(
            &format!("/v1/reservations/{id}/commit"),
            ADMIN,
            json!({ "input_tokens": 900, "output_tokens": 100 }),
        )
        .await;
    assert_eq!(st_, 200);
    let (st_, _, _) = s
        .call(
            M::PUT,
            "/v1/admin/budgets/tenant/acme",
            Some(ADMIN),
            Some(json!({ "daily_usd": "50" })),
        )
        .await;
    assert_eq!(st_, 200);

    let mut generated = 0u64;
    for (who, key) in [("admin", ADMIN.to_owned()), ("tenant", tenant)] {
        let (url, st) = (s.url.clone(), st.clone());
        let out = tokio::task::spawn_blocking(move || {
            // Its example database and reports go to a scratch directory.
            let scratch = tempfile::tempdir().unwrap();
            Command::new(st)
                .current_dir(scratch.path())
                .args([
                    "run",
                    &format!("{url}/openapi.json"),
                    "--header",
                    &format!("Authorization: Bearer {key}"),
                    "--checks",
                    "not_a_server_error,status_code_conformance,content_type_conformance,\
                     response_headers_conformance,response_schema_conformance",
                    "--max-examples",
                    EXAMPLES_PER_OPERATION,
                    "--seed",
                    "1",
                    // One worker: hypothesis is not thread-safe in every path.
                    "--workers",
                    "1",
                ])
                .env("NO_COLOR", "1")
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "schemathesis ({who} key) found failures:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // "Test cases:\n  1234 generated, 1234 passed"
        let count = text
            .split("Test cases:")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no case count in:\n{text}"));
        assert!(count > 0, "schemathesis generated nothing:\n{text}");
        eprintln!("schemathesis, {who} key: {count} cases generated, all passed");
        generated += count;
    }
    eprintln!("schemathesis: {generated} cases in all");
    s.stop().await;
}
