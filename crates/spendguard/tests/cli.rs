//! The command line: configuration, serving, keys, reports and alerts.

use std::process::Command;

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
        .env("SPENDGUARD_ADMIN_KEY", "cli-test-admin")
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
            .bearer_auth("cli-test-admin")
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
            .bearer_auth("cli-test-admin")
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
                .bearer_auth("cli-test-admin")
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

/// `SPENDGUARD_TEST_DATABASE_URL`, or `None` after noting that the test is skipped (test
/// output is captured; CI reads the skip log to fail on any skip).
fn pg_url() -> Option<String> {
    match std::env::var("SPENDGUARD_TEST_DATABASE_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            println!("SKIPPED: SPENDGUARD_TEST_DATABASE_URL not set");
            if let Ok(log) = std::env::var("SPENDGUARD_TEST_SKIP_LOG") {
                use std::io::Write;
                if let Ok(mut f) = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                {
                    let _ = writeln!(f, "skipped a PostgreSQL test");
                }
            }
            None
        }
    }
}

/// A TCP proxy to `upstream` that drops every connection until `up` is set.
fn switchable_proxy(
    upstream: std::net::SocketAddr,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = up.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            if !flag.load(Ordering::SeqCst) {
                continue; // dropped: the connection is closed at once
            }
            let Ok(server) = std::net::TcpStream::connect(upstream) else {
                continue;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    (addr, up)
}

/// With PostgreSQL unreachable at start, `serve` keeps retrying (answering `/healthz`, and
/// `/readyz` with 503 and the reason) and starts serving once the database answers.
#[test]
fn postgres_serve_waits_for_an_unreachable_database() {
    use std::io::{BufRead, BufReader};
    let Some(url) = pg_url() else { return };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config: tokio_postgres::Config = url.parse().unwrap();
    let schema = format!("sg_cli_start_{}", std::process::id());
    let admin = rt.block_on(async {
        let (admin, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
            ))
            .await
            .unwrap();
        admin
    });
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let upstream = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
        .unwrap()
        .next()
        .unwrap();
    let (proxy, up) = switchable_proxy(upstream);
    let user = config.get_user().unwrap_or("postgres");
    let db = config.get_dbname().unwrap_or("test");
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_spendguard"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env(
            "SPENDGUARD_DATABASE_URL",
            format!(
                "postgres://{user}@{proxy}/{db}?options=-csearch_path%3D{schema}&connect_timeout=2"
            ),
        )
        .env("SPENDGUARD_ADMIN_KEY", "cli-test-admin-key-0123456789")
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("the server exited before listening")
            .unwrap();
        if let Some(i) = line.find("address=") {
            break line[i + 8..].split_whitespace().next().unwrap().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let c = reqwest::Client::new();
    // A keep-alive connection to the starting phase is closed when it ends: a request on it
    // then fails, as it would for any client, and is tried again.
    let try_get = |path: &str| -> Option<(u16, serde_json::Value)> {
        let r = rt
            .block_on(
                c.get(format!("http://{addr}{path}"))
                    .bearer_auth("cli-test-admin-key-0123456789")
                    .send(),
            )
            .ok()?;
        let status = r.status().as_u16();
        Some((status, rt.block_on(r.json::<serde_json::Value>()).ok()?))
    };
    let get = |path: &str| try_get(path).or_else(|| try_get(path)).unwrap();
    // Waits (bounded) until `/readyz` answers `status`.
    let ready_is = |status: u16| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let answer = try_get("/readyz");
            if let Some((st, body)) = &answer
                && *st == status
            {
                return body.clone();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "/readyz did not become {status}: {answer:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    let body = ready_is(503);
    assert_eq!(body["store"], "starting");
    assert!(body["reason"].as_str().is_some(), "{body}");
    assert_eq!(get("/healthz").0, 200);
    let (st, body) = get("/v1/alerts");
    assert_eq!(
        (st, body["error"]["code"].as_str()),
        (503, Some("starting"))
    );
    assert!(child.0.try_wait().unwrap().is_none(), "serve gave up");

    // The database answers: serve restores and serves.
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    ready_is(200);
    assert_eq!(get("/v1/alerts").0, 200);
    drop(child);
    rt.block_on(async {
        admin
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
    });
}

#[test]
fn migrate_records_a_new_time_zone_and_refuses_an_unknown_one() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tz.db");
    let db = db.to_str().unwrap();
    let out = spendguard(&["migrate", "--database", db, "--time-zone", "Asia/Tokyo"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("time zone is now Asia/Tokyo"));
    let out = spendguard(&["migrate", "--database", db, "--time-zone", "Mars/Olympus"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`Mars/Olympus` is not a time zone"));
}
