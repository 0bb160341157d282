//! The command line: configuration, serving, keys, reports and alerts.

use std::process::Command;

/// An admin key of the required length (32 characters or more).
const ADMIN: &str = "cli-test-admin-key-0123456789abcdef";

fn spendguard(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_spendguard"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn config_defaults_prints_a_valid_configuration() {
    let out = spendguard(&["config", "defaults"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("usd_per_day = \"1000\""));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spendguard.toml");
    std::fs::write(&path, &text).unwrap();
    let out = spendguard(&["config", "check", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("is valid"));
}

#[test]
fn config_check_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[tiers.pro]\nusd_per_day = \"lots\"\n").unwrap();
    let out = spendguard(&["config", "check", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tiers.pro.usd_per_day: amount `lots` is not a decimal number of USD"),
        "{err}"
    );
    let out = spendguard(&[
        "config",
        "check",
        dir.path().join("missing.toml").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("failed to read"));
}

/// `spendguard serve` on a fresh directory: serves, refuses a second instance on the same
/// database, and stops cleanly on SIGTERM.
/// A child process killed when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_starts_refuses_a_second_writer_and_stops_on_sigterm() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_spendguard"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env("SPENDGUARD_ADMIN_KEY", ADMIN)
        .env("RUST_LOG", "info")
        .env_remove("SPENDGUARD_DATABASE_URL")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Killed if an assertion fails before the orderly stop below.
    let mut child = KillOnDrop(child);
    let stderr = child.0.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("the server exited before serving")
            .unwrap();
        if let Some(i) = line.find("listen=") {
            break line[i + 7..].split_whitespace().next().unwrap().to_owned();
        }
    };
    // Keep draining its log so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = rt.block_on(async {
        let c = reqwest::Client::new();
        let r = c
            .get(format!("http://{addr}/v1/alerts"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        r.status().as_u16()
    });
    assert_eq!(status, 200);
    assert!(dir.path().join("spendguard.db").exists());

    // Spend through the API; then the read commands see it while the server runs.
    rt.block_on(async {
        let c = reqwest::Client::new();
        let r = c
            .put(format!("http://{addr}/v1/admin/budgets/tenant/acme"))
            .bearer_auth(ADMIN)
            .json(&serde_json::json!({ "daily_usd": "4" }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        for (user, model, cost) in [
            ("ann", "gpt-4o-mini", "1.25"),
            ("ann", "gpt-4o-mini", "0.75"),
            ("bob", "gpt-4.1-mini", "0.5"),
        ] {
            let r = c
                .post(format!("http://{addr}/v1/usage"))
                .bearer_auth(ADMIN)
                .json(&serde_json::json!({
                    "tenant_id": "acme", "user_id": user, "model": model, "tier": "enterprise",
                    "input_tokens": 100, "output_tokens": 50, "cost_usd": cost,
                }))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
        }
    });
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_spendguard"))
            .args(args)
            .current_dir(dir.path())
            .env_remove("SPENDGUARD_DATABASE_URL")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let report: serde_json::Value =
        serde_json::from_str(&run(&["report", "--group-by", "user", "--format", "json"])).unwrap();
    assert_eq!(report["totals"]["requests"], 3);
    assert_eq!(report["totals"]["cost_usd"], 2.5);
    assert_eq!(report["rows"][0]["user_id"], "ann");
    assert_eq!(report["rows"][0]["cost_usd"], 2.0);
    let csv = run(&["report", "--group-by", "model", "--format", "csv"]);
    assert!(csv.starts_with("model,requests,"), "{csv}");
    assert!(
        csv.contains("\r\ngpt-4o-mini,2,200,0,100,300,2.000000\r\n"),
        "{csv}"
    );
    let table = run(&["usage", "--tenant", "acme", "--user", "ann"]);
    assert!(
        table.contains("gpt-4o-mini") && table.contains("2.000000"),
        "{table}"
    );
    // $2.50 of acme's $4 daily budget: the 50% alert, raised by the running server.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let alerts: serde_json::Value =
            serde_json::from_str(&run(&["alerts", "--format", "json"])).unwrap();
        if let Some(a) = alerts.as_array().and_then(|a| a.first()) {
            assert_eq!(alerts.as_array().unwrap().len(), 1, "{alerts}");
            assert_eq!(a["threshold_percent"], 50);
            assert_eq!(a["scope_id"], "acme");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no alert within 20 s");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let table = run(&["alerts"]);
    assert!(
        table.contains("50%") && table.contains("tenant acme"),
        "{table}"
    );
    let bad = Command::new(env!("CARGO_BIN_EXE_spendguard"))
        .args(["report", "--group-by", "week"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("group_by must be one of"));

    let second = Command::new(env!("CARGO_BIN_EXE_spendguard"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env_remove("SPENDGUARD_DATABASE_URL")
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("another spendguard instance is writing"),
        "{err}"
    );

    let kill = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let exit = child.0.wait().unwrap();
    assert!(exit.success(), "exit status {exit:?}");
}

#[test]
fn keys_create_list_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    let db = db.to_str().unwrap();
    let out = spendguard(&["keys", "create", "--tenant", "acme", "--database", db]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text.lines().last().unwrap();
    assert!(key.starts_with("sg_"));
    let id = text.split_whitespace().nth(2).unwrap().to_owned();
    let out = spendguard(&["keys", "list", "--database", db]);
    let listing = String::from_utf8(out.stdout).unwrap();
    assert!(listing.contains(&id) && listing.contains("acme"));
    assert!(!listing.contains(key), "a listing must not show keys");
    assert!(
        spendguard(&["keys", "revoke", &id, "--database", db])
            .status
            .success()
    );
    let again = spendguard(&["keys", "revoke", &id, "--database", db]);
    assert!(!again.status.success());
    let bad = spendguard(&["keys", "create", "--tenant", "a b", "--database", db]);
    assert!(!bad.status.success());
}

#[test]
fn serve_refuses_a_short_admin_key() {
    let dir = tempfile::tempdir().unwrap();
    for (var, key) in [
        ("SPENDGUARD_ADMIN_KEY", "short-admin"),
        ("SPENDGUARD_METRICS_KEY", "short-metrics"),
    ] {
        let child = Command::new(env!("CARGO_BIN_EXE_spendguard"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .current_dir(dir.path())
            .env("SPENDGUARD_ADMIN_KEY", ADMIN)
            .env(var, key)
            .env_remove("SPENDGUARD_DATABASE_URL")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Killed if it serves instead of refusing to start.
        let mut child = KillOnDrop(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{var} of 11 characters was accepted: the server is serving"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut stderr).unwrap();
        let out = (status, stderr);
        assert!(!out.0.success(), "{var} of 11 characters was accepted");
        let err = &out.1;
        assert!(
            err.contains(&format!("{var} must be at least 32 characters")),
            "{err}"
        );
    }
}

#[test]
fn revoking_an_admin_key_needs_force() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    let db = db.to_str().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let id = rt.block_on(async {
        let store = spendguard_store::AnyStore::open(db, &Default::default())
            .await
            .unwrap();
        let ring = spendguard_server::KeyRing::default();
        let (_, record) = spendguard_server::auth::create_key(&store, &ring, None, 0)
            .await
            .unwrap();
        store.close().await;
        record.id
    });
    let out = spendguard(&["keys", "revoke", &id, "--database", db]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is an admin key") && err.contains("--force"),
        "{err}"
    );
    let listing =
        String::from_utf8(spendguard(&["keys", "list", "--database", db]).stdout).unwrap();
    let line = listing.lines().find(|l| l.contains(&id)).unwrap();
    assert!(line.trim_end().ends_with('-'), "still active: {line}");
    let out = spendguard(&["keys", "revoke", &id, "--force", "--database", db]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
