//! The command line: configuration, serving, keys, reports and alerts.

use std::process::Command;

#[path = "cli/clients.rs"]
mod clients;
#[path = "cli/cluster.rs"]
mod cluster;

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

/// Starts `spendguard serve` in `dir` on a free port with the SQLite default: the process
/// (killed when dropped) and the address it serves on. Its log is drained so that it never
/// blocks on a full pipe.
fn serve_in(dir: &std::path::Path) -> (KillOnDrop, String) {
    spawn_serving(
        Command::new(env!("CARGO_BIN_EXE_spendguard"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .current_dir(dir)
            .env("SPENDGUARD_ADMIN_KEY", ADMIN)
            .env_remove("SPENDGUARD_DATABASE_URL"),
    )
}

/// Spawns a `spendguard serve` command (killed when dropped) and waits until it serves:
/// the process and the address it serves on. Its log is drained so that it never blocks on
/// a full pipe.
fn spawn_serving(cmd: &mut Command) -> (KillOnDrop, String) {
    use std::io::{BufRead, BufReader};
    let child = cmd
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
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
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

#[test]
fn serve_starts_refuses_a_second_writer_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    // Killed if an assertion fails before the orderly stop below.
    let (mut child, addr) = serve_in(dir.path());
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

    // A record acknowledged just before the stop is in the tables once the server has
    // stopped, for whoever reads the file in SQL (not only at the next start).
    rt.block_on(async {
        let r = reqwest::Client::new()
            .post(format!("http://{addr}/v1/usage"))
            .bearer_auth(ADMIN)
            .json(&serde_json::json!({
                "tenant_id": "acme", "user_id": "cy", "model": "gpt-4o-mini",
                "input_tokens": 10, "output_tokens": 5, "cost_usd": "0.25",
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    });
    let kill = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let exit = child.0.wait().unwrap();
    assert!(exit.success(), "exit status {exit:?}");
    let db = rusqlite::Connection::open(dir.path().join("spendguard.db")).unwrap();
    let (records, cost): (i64, i64) = db
        .query_row("SELECT count(*), sum(cost_micros) FROM ai_usage", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((records, cost), (4, 2_750_000), "ai_usage after the stop");
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

/// Runs `spendguard` in `dir` with no database or config taken from the environment.
fn spendguard_in(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_spendguard"))
        .args(args)
        .current_dir(dir)
        .env_remove("SPENDGUARD_DATABASE_URL")
        .env_remove("SPENDGUARD_CONFIG")
        .env_remove("SPENDGUARD_WEBHOOK_SECRET")
        .env_remove("SPENDGUARD_ADMIN_KEY")
        .output()
        .unwrap()
}

#[test]
fn read_commands_do_not_create_a_database() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["report", "--database", "typo.db"][..],
        &[
            "usage",
            "--tenant",
            "acme",
            "--user",
            "ann",
            "--database",
            "typo.db",
        ],
        &["alerts", "--database", "typo.db"],
    ] {
        let out = spendguard_in(dir.path(), args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded: {err}");
        assert!(
            err.contains("typo.db") && err.contains("does not exist"),
            "{args:?}: {err}"
        );
        assert!(
            !dir.path().join("typo.db").exists(),
            "{args:?} created the database"
        );
    }
    // Nor does the default path.
    let out = spendguard_in(dir.path(), &["report"]);
    assert!(!out.status.success());
    assert!(!dir.path().join("spendguard.db").exists());
}

#[test]
fn unsupported_database_urls_and_unreachable_servers_are_named() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["migrate", "--database", "mysql://db.internal/spend"][..],
        &["report", "--database", "mysql://db.internal/spend"],
    ] {
        let out = spendguard_in(dir.path(), args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("unsupported database URL"), "{args:?}: {err}");
        assert!(err.contains("mysql"), "{err}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // Nothing listens on port 1.
    let out = spendguard_in(
        dir.path(),
        &["migrate", "--database", "postgres://postgres@127.0.0.1:1/x"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("127.0.0.1:1"), "{err}");
    assert!(err.to_lowercase().contains("refused"), "{err}");
}

#[test]
fn config_check_runs_the_checks_serve_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hooks.toml");
    std::fs::write(
        &path,
        "[alerts]\nwebhook_urls = [\"https://hooks.example.com/x\"]\n",
    )
    .unwrap();
    let path = path.to_str().unwrap();
    let out = spendguard_in(dir.path(), &["config", "check", path]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a missing webhook secret passed");
    assert!(err.contains("alerts.webhook_secret"), "{err}");
    // The secret from the environment counts, as it does for `serve`.
    let out = Command::new(env!("CARGO_BIN_EXE_spendguard"))
        .args(["config", "check", path])
        .env("SPENDGUARD_WEBHOOK_SECRET", "s3cret")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn serve_checks_the_port_before_making_an_admin_key() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = spendguard_in(dir.path(), &["serve", "--listen", &addr]);
    let err = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(err.contains(&addr) && err.contains("--listen"), "{err}");
    assert!(!stdout.contains("sg_"), "a key was printed: {stdout}");
    drop(taken);
    // No key was stored either: the next start prints one.
    let keys = spendguard_in(dir.path(), &["keys", "list"]);
    let listing = String::from_utf8_lossy(&keys.stdout);
    assert!(!listing.contains("(admin)"), "{listing}");
}

#[test]
fn the_example_configuration_is_the_built_in_one() {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../spendguard.example.toml"
    ))
    .expect("spendguard.example.toml at the repository root");
    let out = spendguard(&["config", "defaults"]);
    assert!(out.status.success());
    assert_eq!(
        example,
        String::from_utf8(out.stdout).unwrap(),
        "regenerate it: spendguard config defaults > spendguard.example.toml"
    );
}

/// The README's walk-through, the fenced block after its `<!-- walk-through -->` marker.
fn readme_walkthrough() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let start = readme
        .find("<!-- walk-through -->")
        .expect("README.md marks its walk-through with <!-- walk-through -->");
    let rest = &readme[start..];
    let open = rest
        .find("```sh\n")
        .expect("a ```sh block after the marker")
        + 6;
    let len = rest[open..].find("\n```").expect("the block is closed");
    rest[open..open + len].to_owned()
}

/// Logs a skipped test where CI looks for skips.
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

/// Every command of the README's walk-through, pasted in order into bash against a fresh
/// server, on whatever day the test runs: each answers 2xx except the one refusal it shows.
#[test]
fn the_readme_walkthrough_runs_as_written() {
    use std::io::{BufRead, BufReader};
    let script = readme_walkthrough();
    if Command::new("curl").arg("--version").output().is_err() {
        skipped("the README walk-through needs curl");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_spendguard"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env(
            "SPENDGUARD_ADMIN_KEY",
            "walkthrough-admin-key-0123456789abcdef",
        )
        .env("RUST_LOG", "info")
        .env_remove("SPENDGUARD_DATABASE_URL")
        .env_remove("SPENDGUARD_CONFIG")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("the server exited before serving")
            .unwrap();
        if let Some(i) = line.find("listen=") {
            break line[i + 7..].split_whitespace().next().unwrap().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});

    // curl records each answer's status line; the script itself is run unchanged.
    let statuses = dir.path().join("statuses");
    let prelude = format!(
        "set -u\n\
         curl() {{ local h; h=$(mktemp); command curl -D \"$h\" \"$@\"; local rc=$?; \
         sed -n '1s/^HTTP\\/[0-9.]* \\([0-9]*\\).*/\\1/p' \"$h\" >> '{}'; rm -f \"$h\"; \
         echo; return $rc; }}\n",
        statuses.display()
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("{prelude}{script}"))
        .current_dir(dir.path())
        .env("KEY", "walkthrough-admin-key-0123456789abcdef")
        .env("URL", format!("http://{addr}"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.trim().is_empty(),
        "the walk-through wrote errors: {stderr}"
    );
    let codes: Vec<u16> = std::fs::read_to_string(&statuses)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let curls = script
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| l.matches("curl ").count())
        .sum::<usize>();
    assert_eq!(
        codes.len(),
        curls,
        "every curl was answered: {codes:?}\n{stdout}"
    );
    let refused: Vec<&u16> = codes.iter().filter(|c| !(200..300).contains(*c)).collect();
    assert_eq!(
        refused,
        [&429],
        "only the refusal it shows fails: {codes:?}\n{stdout}"
    );
    // The reports cover today: the calls just made are in them.
    assert!(
        stdout.contains("\"group_by\":\"model\"") && stdout.contains("\"model\":\"gpt-4o-mini\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("\"models\":[{"),
        "the user's day is empty: {stdout}"
    );
    let kill = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    assert!(child.0.wait().unwrap().success());
}

/// `SPENDGUARD_TEST_DATABASE_URL`, or `None` after noting that the test is skipped.
fn pg_url() -> Option<String> {
    match std::env::var("SPENDGUARD_TEST_DATABASE_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            skipped("skipped a PostgreSQL test");
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
        .env("SPENDGUARD_ADMIN_KEY", ADMIN)
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
                    .bearer_auth(ADMIN)
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

#[test]
fn spool_inspect_and_export_read_a_spool_and_name_its_damage() {
    use spendguard_core::{BudgetOverride, Event, Money, ScopeKey};
    use spendguard_guard::spool::Spool;
    let event = |n: i64| Event::BudgetSet {
        scope: ScopeKey::Global,
        budget: BudgetOverride {
            daily: Some(Money::from_micros(n)),
            monthly: None,
        },
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool");
    let mut spool = Spool::open(&path, "db-test").unwrap();
    spool.append(&[event(1), event(2)]).unwrap();
    let second = std::fs::metadata(&path).unwrap().len();
    spool.append(&[event(3)]).unwrap();
    drop(spool);
    let p = path.to_str().unwrap();

    let out = spendguard(&["spool", "inspect", p]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("database db-test"), "{text}");
    assert!(
        text.contains(&format!("frame at byte {second}: version 1")),
        "{text}"
    );
    assert!(text.contains("2 frames, 3 events"), "{text}");

    let out = spendguard(&["spool", "export", p]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Event> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events, vec![event(1), event(2), event(3)]);

    // Damage in the second frame: inspect names its offset, export gives the first frame
    // and fails.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[second as usize + 12] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let out = spendguard(&["spool", "inspect", p]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("damaged at byte {second}")),
        "{text}"
    );
    let out = spendguard(&["spool", "export", p]);
    assert!(!out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("byte {second}")));
    // Nothing was changed.
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
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

#[test]
fn serve_refuses_a_gateway_whose_provider_key_variable_is_not_set() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spendguard.toml");
    std::fs::write(
        &path,
        "[gateway]\n[[gateway.upstreams]]\nname = \"openai\"\nkind = \"openai\"\n\
         base_url = \"https://api.openai.com/v1\"\napi_key_env = \"SPENDGUARD_TEST_UNSET_KEY\"\n\
         models = [\"gpt-*\"]\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_spendguard"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .current_dir(dir.path())
        .env_remove("SPENDGUARD_TEST_UNSET_KEY")
        .env_remove("SPENDGUARD_DATABASE_URL")
        .env("SPENDGUARD_ADMIN_KEY", ADMIN)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gateway.upstreams[0].api_key_env")
            && err.contains("SPENDGUARD_TEST_UNSET_KEY"),
        "{err}"
    );
    // Refused before anything was created.
    assert!(!dir.path().join("spendguard.db").exists());

    // A bad upstream kind is named by its key path.
    std::fs::write(
        &path,
        "[gateway]\n[[gateway.upstreams]]\nname = \"x\"\nkind = \"gemini\"\n\
         base_url = \"https://example.com\"\napi_key_env = \"\"\nmodels = [\"*\"]\n",
    )
    .unwrap();
    let out = spendguard(&["config", "check", path.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("gateway.upstreams[0].kind"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `spendguard import`: the seed's rows from a CSV into a running server, each in its own
/// day; a second import records nothing; a server that cannot be reached is an error.
#[test]
fn import_sends_the_seeds_rows_once() {
    let dir = tempfile::tempdir().unwrap();
    let (_child, addr) = serve_in(dir.path());
    let csv = dir.path().join("ai_usage.csv");
    std::fs::write(
        &csv,
        "id,user_id,company_id,tenant_id,model,endpoint,subscription_tier,input_tokens,\
         cached_input_tokens,output_tokens,cost_usd,request_status,created_at\n\
         0190a3c4-0000-7000-8000-00000000000a,ann,,acme,gpt-4o,chat,pro,1000,0,100,1.500000,success,2025-01-15 10:00:00+00\n\
         0190a3c4-0000-7000-8000-00000000000b,bob,,acme,gpt-4o,chat,pro,1000,0,100,2.250000,error,2025-01-17 10:00:00+00\n\
         0190a3c4-0000-7000-8000-00000000000c,bob,,acme,gpt-4o,chat,pro,1000,0,100,9.000000,expired,2025-01-17 11:00:00+00\n",
    )
    .unwrap();
    let url = format!("http://{addr}");
    let import = || {
        Command::new(env!("CARGO_BIN_EXE_spendguard"))
            .args(["import", "--url", &url, "--csv", csv.to_str().unwrap()])
            .env("SPENDGUARD_ADMIN_KEY", ADMIN)
            .output()
            .unwrap()
    };
    let out = import();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("imported 2, already imported 0, skipped 1 (expired), failed 0"),
        "{text}"
    );
    let out = import();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("imported 0, already imported 2, skipped 1 (expired), failed 0"),
        "{text}"
    );
    let db = dir.path().join("spendguard.db");
    let out = spendguard(&[
        "report",
        "--from",
        "2025-01-01",
        "--to",
        "2025-01-31",
        "--format",
        "csv",
        "--database",
        db.to_str().unwrap(),
    ]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("2025-01-15,1,1000,0,100,1100,1.500000"),
        "{report}"
    );
    assert!(
        report.contains("2025-01-17,1,1000,0,100,1100,2.250000"),
        "{report}"
    );
    assert_eq!(report.lines().count(), 3, "{report}");
    // Nobody there: an error naming it.
    let out = Command::new(env!("CARGO_BIN_EXE_spendguard"))
        .args([
            "import",
            "--url",
            "http://127.0.0.1:9",
            "--csv",
            csv.to_str().unwrap(),
        ])
        .env("SPENDGUARD_ADMIN_KEY", ADMIN)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach the server"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `spendguard prices`: a model's effective price and where it came from — the
/// configuration's over the catalog's, and a tenant's override (read from the database)
/// over both.
#[test]
fn prices_show_the_effective_price_and_its_source() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("spendguard.toml"),
        "[prices.\"claude-sonnet-4-5\"]\ninput = \"2\"\noutput = \"10\"\n",
    )
    .unwrap();
    let json = |args: &[&str]| -> serde_json::Value {
        let out = spendguard_in(dir.path(), args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let v = json(&["prices", "claude-sonnet-4-5-20250929", "--format", "json"]);
    assert_eq!(
        (v[0]["source"].as_str(), v[0]["input"].as_f64()),
        (Some("config"), Some(2.0))
    );
    let out = spendguard_in(dir.path(), &["prices", "claude-haiku-4-5"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("claude-haiku-4-5") && text.contains("catalog") && text.contains("anthropic"),
        "{text}"
    );
    let out = spendguard_in(dir.path(), &["prices", "mystery-model"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no price"));

    // A tenant's negotiated prices, set through the API, are read from the database.
    let (_child, addr) = serve_in(dir.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = rt.block_on(async {
        reqwest::Client::new()
            .put(format!("http://{addr}/v1/admin/tenants/acme/prices"))
            .bearer_auth(ADMIN)
            .json(&serde_json::json!({ "multiplier": "0.5" }))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    assert_eq!(status, 200);
    let v = json(&[
        "prices",
        "claude-sonnet-4-5",
        "--tenant",
        "acme",
        "--format",
        "json",
    ]);
    assert_eq!(
        (v[0]["source"].as_str(), v[0]["multiplier"].as_f64()),
        (Some("tenant_override"), Some(0.5))
    );
    let v = json(&[
        "prices",
        "claude-sonnet-4-5",
        "--tenant",
        "globex",
        "--format",
        "json",
    ]);
    assert_eq!(v[0]["source"], "config");
}

/// A limit in shadow admits what it would refuse, says so in the answer, `GET /v1/limits`
/// and the metrics (once per would-be denial); after the configuration is changed to enforce
/// it and reloaded (SIGHUP), the next reservation is refused.
#[test]
fn a_shadow_limit_switched_to_enforce_by_a_reload_denies_the_next_reservation() {
    let dir = tempfile::tempdir().unwrap();
    let config = |shadow: &str| {
        format!(
            "[tenant]\nmax_share_of_global = \"unlimited\"\n\
             [tiers.free]\nusd_per_day = \"1\"\nmax_concurrent = \"unlimited\"\n{shadow}"
        )
    };
    let path = dir.path().join("spendguard.toml");
    std::fs::write(&path, config("shadow = [\"usd_per_day\"]\n")).unwrap();
    let (child, addr) = serve_in(dir.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = reqwest::Client::new();
        let reserve = || async {
            let r = c
                .post(format!("http://{addr}/v1/reservations"))
                .bearer_auth(ADMIN)
                .json(&serde_json::json!({
                    "tenant_id": "acme", "user_id": "u", "model": "gpt-4o-mini",
                    "input_tokens": 10, "max_output_tokens": 10, "estimated_cost_usd": "0.6",
                }))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        };
        let user_day = |limits: &serde_json::Value| {
            limits
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l["scope"] == "user" && l["window"] == "day" && l["unit"] == "usd")
                .cloned()
                .unwrap()
        };
        let (status, first) = reserve().await;
        assert_eq!(status, 201, "{first}");
        assert!(first["would_deny"].is_null(), "{first}");
        assert_eq!(user_day(&first["limits"])["shadow"], true);
        let (status, second) = reserve().await;
        assert_eq!(status, 201, "a limit in shadow admits: {second}");
        assert_eq!(second["would_deny"]["code"], "budget_exceeded", "{second}");
        assert_eq!(second["would_deny"]["limits"][0]["scope"], "user");
        assert_eq!(second["would_deny"]["limits"][0]["shadow"], true);
        let metrics = c
            .get(format!("http://{addr}/metrics"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            metrics.contains("spendguard_would_deny_total{reason=\"budget_exceeded\"} 1\n"),
            "{metrics}"
        );
        // The report command counts it too.
        let out = Command::new(env!("CARGO_BIN_EXE_spendguard"))
            .args(["report", "--format", "json"])
            .current_dir(dir.path())
            .env_remove("SPENDGUARD_DATABASE_URL")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["would_deny"]["total"], 1, "{report}");
        assert_eq!(report["would_deny"]["budget_exceeded"], 1);

        // Enforce it, and reload.
        std::fs::write(&path, config("")).unwrap();
        let kill = Command::new("kill")
            .args(["-HUP", &child.0.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let limits_url = format!("http://{addr}/v1/limits?tenant_id=acme&user_id=u");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let limits: serde_json::Value = c
                .get(&limits_url)
                .bearer_auth(ADMIN)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if user_day(&limits["limits"])["shadow"] == false {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the reload did not apply: {limits}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let (status, third) = reserve().await;
        assert_eq!(status, 429, "{third}");
        assert_eq!(third["error"]["code"], "budget_exceeded");
        assert_eq!(third["error"]["limits"][0]["scope"], "user");
        assert_eq!(third["error"]["limits"][0]["shadow"], false);
    });
}
