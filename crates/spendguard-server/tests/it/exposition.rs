//! `/metrics` as Prometheus reads it: the exposition passes `promtool check metrics`
//! (names, HELP and TYPE lines, counters named and typed as counters), and money is
//! integer micro-USD, so sums carry no floating-point noise.
//!
//! Needs `promtool` (Debian: `apt-get install prometheus`; or named by `SPENDGUARD_PROMTOOL`).
//! Without it the test says `SKIPPED` and appends a line to `SPENDGUARD_TEST_SKIP_LOG`,
//! which fails CI.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::json;

use crate::support::*;

fn promtool() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SPENDGUARD_PROMTOOL").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.push(PathBuf::from("/usr/bin"));
    if let Some(p) = dirs
        .iter()
        .map(|d| d.join("promtool"))
        .find(|p| p.is_file())
    {
        return Some(p);
    }
    println!(
        "SKIPPED: promtool not found (apt-get install prometheus, or set SPENDGUARD_PROMTOOL)"
    );
    if let Ok(log) = std::env::var("SPENDGUARD_TEST_SKIP_LOG")
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
    {
        let _ = writeln!(f, "skipped the promtool test: no promtool");
    }
    None
}

#[tokio::test]
async fn metrics_pass_promtool_and_money_is_exact() {
    let s = spawn("[tenant]\nusd_per_day = \"1\"\n[tiers.free]\nrequests_per_minute = \"unlimited\"\nusd_per_day = \"unlimited\"\n").await;
    // Spend that a float sum gets wrong: 0.1 + 0.2 + ... ($0.10 and $0.20, three times).
    for cost in ["0.1", "0.2", "0.1", "0.2", "0.1", "0.2"] {
        let (st, v) = s
            .post(
                "/v1/usage",
                ADMIN,
                json!({
                    "tenant_id": "acme", "user_id": "u1", "model": "gpt-4o-mini",
                    "input_tokens": 1, "output_tokens": 1, "cost_usd": cost,
                }),
            )
            .await;
        assert_eq!(st, 201, "{v}");
    }
    s.post("/v1/reservations", ADMIN, reserve_body("acme", "u2"))
        .await;
    s.state.alerts.evaluate().await.unwrap();
    let text = s.metrics().await;
    assert!(
        text.contains("spendguard_spend_micro_usd_total 900000\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "spendguard_budget_spent_micro_usd{scope=\"tenant\",scope_id=\"acme\",window=\"day\"} "
        ),
        "{text}"
    );
    // Counters are typed as counters.
    for name in [
        "spendguard_writer_batches",
        "spendguard_writer_events",
        "spendguard_store_errors",
        "spendguard_alerts_raised",
        "spendguard_webhook_attempts",
        "spendguard_spend_micro_usd",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name}_total counter\n")),
            "{name}: {text}"
        );
    }
    let Some(tool) = promtool() else {
        s.stop().await;
        return;
    };
    let mut child = Command::new(&tool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    s.stop().await;
}
