//! The TypeScript and Python clients (`clients/`), each running its own test suite against
//! a `spendguard serve` started here on a free port (SQLite in a temporary directory):
//! reserve → commit, refusals as typed errors with `Retry-After`, `guard` releasing when the
//! call fails and committing the usage of OpenAI- and Anthropic-shaped answers, and the
//! contract of each client's types with the served `/openapi.json`.
//!
//! What they need: Node 18 or later (`node`, or `SPENDGUARD_NODE`) with the TypeScript
//! client's dev dependencies (`npm ci` in `clients/typescript`, for the type check); Python
//! with `httpx`, `pytest` and `mypy` (`.venv-clients`, or `SPENDGUARD_CLIENTS_PYTHON`). Without them
//! a test prints `SKIPPED` and appends a line to `SPENDGUARD_TEST_SKIP_LOG`, which fails CI.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::{KillOnDrop, skipped, spawn_serving};

/// Tests of `clients/typescript/test/*.test.mjs`: a run that passes fewer fails.
const TYPESCRIPT_TESTS: u64 = 11;
/// Tests of `clients/python/tests` (parametrized ones counted once per case).
const PYTHON_TESTS: u64 = 38;

const ADMIN: &str = "clients-test-admin-key-0123456789abcdef";

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A `spendguard serve` on a free port over a fresh SQLite database; its URL.
fn serve(dir: &Path) -> (KillOnDrop, String) {
    let (child, addr) = spawn_serving(
        Command::new(env!("CARGO_BIN_EXE_spendguard"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .current_dir(dir)
            .env("SPENDGUARD_ADMIN_KEY", ADMIN)
            .env_remove("SPENDGUARD_DATABASE_URL")
            .env_remove("SPENDGUARD_CONFIG"),
    );
    (child, format!("http://{addr}"))
}

fn run(cmd: &mut Command, what: &str) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("could not run {what}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The value of node's TAP summary line `# {name} N`.
fn tap_count(stdout: &str, name: &str) -> Option<u64> {
    let prefix = format!("# {name} ");
    stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
}

/// The counts of pytest's last line (`14 passed, 1 warning in 2.31s`), by outcome.
fn pytest_summary(stdout: &str) -> Vec<(String, u64)> {
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

fn node() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SPENDGUARD_NODE") {
        return Some(PathBuf::from(p));
    }
    let ok = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then(|| PathBuf::from("node"))
}

#[test]
fn typescript_client_passes_its_suite_against_spendguard_serve() {
    let package = workspace().join("clients/typescript");
    let Some(node) = node() else {
        skipped("the TypeScript client's tests need node (or SPENDGUARD_NODE)");
        return;
    };
    let tsc = package.join("node_modules/typescript/bin/tsc");
    if !tsc.exists() {
        skipped("the TypeScript client's type check needs `npm ci` in clients/typescript");
        return;
    }
    // The declarations (generated and written) and a typed example compile.
    let out = run(
        Command::new(&node)
            .arg(&tsc)
            .args(["-p", "."])
            .current_dir(&package),
        "tsc",
    );
    assert!(
        out.status.success(),
        "the TypeScript type check failed:\n{}",
        text(&out)
    );

    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = serve(dir.path());
    let mut files: Vec<PathBuf> = std::fs::read_dir(package.join("test"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".test.mjs"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no test files in clients/typescript/test"
    );
    let out = run(
        Command::new(&node)
            .args(["--test", "--test-reporter=tap"])
            .args(&files)
            .current_dir(dir.path())
            .env("SPENDGUARD_TEST_URL", &url)
            .env("SPENDGUARD_TEST_ADMIN_KEY", ADMIN),
        "node --test",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the TypeScript client's tests failed:\n{}",
        text(&out)
    );
    let counts = ["pass", "fail", "cancelled", "skipped", "todo"].map(|k| tap_count(&stdout, k));
    assert_eq!(
        counts,
        [Some(TYPESCRIPT_TESTS), Some(0), Some(0), Some(0), Some(0)],
        "expected {TYPESCRIPT_TESTS} TypeScript tests to pass (pass, fail, cancelled, skipped, \
         todo):\n{stdout}"
    );
}

fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SPENDGUARD_CLIENTS_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = workspace().join(".venv-clients/bin/python");
    venv.exists().then_some(venv)
}

#[test]
fn python_client_passes_its_suite_against_spendguard_serve() {
    let Some(python) = python() else {
        skipped("the Python client's tests need .venv-clients (or SPENDGUARD_CLIENTS_PYTHON)");
        return;
    };
    let package = workspace().join("clients/python");
    let dir = tempfile::tempdir().unwrap();
    // The package and a typical use type-check (`py.typed` promises it).
    let out = run(
        Command::new(&python)
            .args(["-m", "mypy", "--strict", "--cache-dir"])
            .arg(dir.path().join("mypy-cache"))
            .args(["src", "tests/typecheck_example.py"])
            .current_dir(&package)
            .env("PYTHONDONTWRITEBYTECODE", "1"),
        "mypy",
    );
    assert!(
        out.status.success(),
        "the Python client's type check (mypy --strict) failed:\n{}",
        text(&out)
    );
    let (_server, url) = serve(dir.path());
    // pytest's cache and Python's bytecode stay out of the source tree.
    let out = run(
        Command::new(&python)
            .args(["-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs"])
            .arg(package.join("tests"))
            .current_dir(dir.path())
            .env("PYTHONPATH", package.join("src"))
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("SPENDGUARD_TEST_URL", &url)
            .env("SPENDGUARD_TEST_ADMIN_KEY", ADMIN),
        "pytest",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the Python client's tests failed:\n{}",
        text(&out)
    );
    let counts = pytest_summary(&stdout);
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
        "expected {PYTHON_TESTS} Python tests to pass, got {counts:?}:\n{stdout}"
    );
}

#[test]
fn test_summaries_are_read_by_outcome() {
    let tap = "ok 1 - a\n# tests 3\n# pass 2\n# fail 1\n# cancelled 0\n";
    assert_eq!(tap_count(tap, "pass"), Some(2));
    assert_eq!(tap_count(tap, "fail"), Some(1));
    assert_eq!(tap_count(tap, "todo"), None);
    assert_eq!(
        pytest_summary("....\n14 passed, 1 warning in 2.31s\n"),
        [("passed".to_owned(), 14), ("warning".to_owned(), 1)]
    );
    assert_eq!(
        pytest_summary("== 1 failed, 13 passed in 0.50s ==\n"),
        [("failed".to_owned(), 1), ("passed".to_owned(), 13)]
    );
}
