//! The command line: configuration commands.

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
