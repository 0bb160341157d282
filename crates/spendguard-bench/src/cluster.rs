//! spendguard as separate processes: N `spendguard serve` on one fresh PostgreSQL database,
//! in cluster mode (exact across all of them) or, for one instance, in the ordinary single
//! mode, for the side by side.
//!
//! [`recreate_database`] drops and recreates the database [`PG_DATABASE`] through the
//! connection the bench was given; [`Instances::start`] starts the processes, each on a free
//! local port with its own configuration file and spool in a temporary directory and a
//! random admin key, and waits until every one answers `/readyz`; [`Instances::stop`] sends
//! them SIGTERM and waits for them to exit.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

/// The database the instances share, dropped and recreated before each run.
pub const PG_DATABASE: &str = "spendguard_bench_cluster";

/// How long an instance may take to answer `/readyz` (migrations, start-up).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long an instance may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How each `spendguard serve` runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerMode {
    /// The ordinary mode: the only instance on its database (one instance at most).
    Single,
    /// `--mode cluster`: any number of instances on one database.
    #[default]
    Cluster,
}

/// The options of the runs against spendguard processes.
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// Run `--mode spendguard` against this many `spendguard serve` processes (on
    /// `--database`) instead of in-process; `cluster-compare`: the N of its "× N" (default 3).
    pub instances: Option<usize>,
    /// The `spendguard` binary; default: the one next to the bench's own executable.
    pub spendguard_bin: Option<PathBuf>,
    pub server_mode: ServerMode,
    /// Settle each reservation on the instance after the one that made it.
    pub cross: bool,
    /// The global daily budget, USD, of the spendguard processes and the function baseline;
    /// default [`crate::GLOBAL_USD_PER_DAY`] (does not bind).
    pub global_usd_per_day: Option<f64>,
    /// `[cluster] allowances` of the processes, comma-separated, or `none`; default:
    /// spendguard's.
    pub allowances: Option<String>,
}

/// The `[cluster]` section saying which scopes are decided through allowances (nothing
/// for spendguard's default).
pub fn allowances_section(allowances: Option<&str>) -> anyhow::Result<String> {
    let Some(list) = allowances else {
        return Ok(String::new());
    };
    let kinds: Vec<&str> = match list {
        "none" => Vec::new(),
        l => l.split(',').map(str::trim).collect(),
    };
    Ok(format!(
        "\n[cluster]\nallowances = {}\n",
        serde_json::to_string(&kinds)?
    ))
}

/// The `spendguard` binary next to the running executable (`target/release/spendguard` when
/// the bench runs from `target/release`).
pub fn default_spendguard_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the bench's executable")?;
    let dir = exe.parent().context("the executable has no directory")?;
    Ok(dir.join(format!("spendguard{}", std::env::consts::EXE_SUFFIX)))
}

/// `url` with its database name replaced by `name` (`postgres://u@h:p/db?x` → `…/name?x`).
pub fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let scheme_end = url
        .find("://")
        .map(|i| i + 3)
        .with_context(|| format!("not a postgres:// URL: {url}"))?;
    let rest = &url[scheme_end..];
    let query = rest.find('?').map_or(rest.len(), |i| i);
    let path = rest[..query].find('/').unwrap_or(query);
    Ok(format!(
        "{}{}/{name}{}",
        &url[..scheme_end],
        &rest[..path],
        &rest[query..]
    ))
}

/// Drops (closing its sessions) and recreates [`PG_DATABASE`] through `admin_url`, a
/// database of the same server; returns the URL of the new database.
pub async fn recreate_database(admin_url: &str) -> anyhow::Result<String> {
    let (client, conn) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
        .await
        .context("connecting to PostgreSQL")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS {PG_DATABASE} WITH (FORCE)"
        ))
        .await
        .with_context(|| format!("dropping the database {PG_DATABASE}"))?;
    client
        .batch_execute(&format!("CREATE DATABASE {PG_DATABASE}"))
        .await
        .with_context(|| format!("creating the database {PG_DATABASE}"))?;
    with_database(admin_url, PG_DATABASE)
}

/// A free local port (bound then released: another process could take it meanwhile).
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// The last lines of an instance's log, for an error message.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[derive(Debug)]
struct Instance {
    child: Child,
    log: PathBuf,
}

/// Running `spendguard serve` processes, killed if dropped before [`Instances::stop`].
#[derive(Debug)]
pub struct Instances {
    children: Vec<Instance>,
    /// Their base URLs, in start order.
    pub urls: Vec<String>,
    /// The admin key they were given.
    pub key: String,
    dir: tempfile::TempDir,
}

impl Instances {
    /// Starts `n` instances of `bin` on `database` with the policy `config` (TOML without a
    /// `[server]` section) and waits until all are ready.
    pub async fn start(
        bin: &Path,
        database: &str,
        n: usize,
        mode: ServerMode,
        config: &str,
    ) -> anyhow::Result<Instances> {
        if n == 0 {
            bail!("--instances must be at least 1");
        }
        if mode == ServerMode::Single && n > 1 {
            bail!(
                "only one spendguard may run on a database in single mode: use --server-mode cluster"
            );
        }
        if !bin.is_file() {
            bail!(
                "no spendguard binary at {} (build it with `cargo build --release -p spendguard`, or give --spendguard-bin)",
                bin.display()
            );
        }
        let mut instances = Instances {
            children: Vec::new(),
            urls: Vec::new(),
            key: crate::random_key(),
            dir: tempfile::tempdir()?,
        };
        for i in 0..n {
            let dir = instances.dir.path();
            let spool = dir.join(format!("i{i}.spool"));
            let spool = spool.to_str().context("temporary path is not UTF-8")?;
            let config_path = dir.join(format!("i{i}.toml"));
            // A JSON string is a valid TOML basic string.
            std::fs::write(
                &config_path,
                format!(
                    "[server]\nspool_path = {}\n\n{config}",
                    serde_json::to_string(spool)?
                ),
            )?;
            let port = free_port()?;
            let log = dir.join(format!("i{i}.log"));
            let out = std::fs::File::create(&log)?;
            let mut cmd = Command::new(bin);
            cmd.arg("serve")
                .arg("--config")
                .arg(&config_path)
                .arg("--database")
                .arg(database)
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"));
            if mode == ServerMode::Cluster {
                cmd.arg("--mode").arg("cluster");
            }
            for var in [
                "SPENDGUARD_MODE",
                "SPENDGUARD_CONFIG",
                "SPENDGUARD_DATABASE_URL",
                "SPENDGUARD_LISTEN",
            ] {
                cmd.env_remove(var);
            }
            let child = cmd
                .env("SPENDGUARD_ADMIN_KEY", &instances.key)
                .current_dir(dir)
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            instances.children.push(Instance { child, log });
            instances.urls.push(format!("http://127.0.0.1:{port}"));
        }
        instances.wait_ready().await?;
        Ok(instances)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        let deadline = Instant::now() + READY_TIMEOUT;
        for i in 0..self.children.len() {
            loop {
                let inst = &mut self.children[i];
                if let Some(status) = inst.child.try_wait()? {
                    bail!(
                        "spendguard instance {i} exited ({status}) before it was ready:\n{}",
                        log_tail(&inst.log)
                    );
                }
                let ready = client
                    .get(format!("{}/readyz", self.urls[i]))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == reqwest::StatusCode::OK);
                if ready {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "spendguard instance {i} not ready after {} s:\n{}",
                        READY_TIMEOUT.as_secs(),
                        log_tail(&inst.log)
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Sends every instance SIGTERM and waits for them to exit (killing those that do not
    /// within 30 s). An instance that exits abnormally is an error.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        for inst in &self.children {
            // std has no SIGTERM and the crate forbids unsafe code: kill(1) sends it.
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(inst.child.id().to_string())
                .status();
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut failed = Vec::new();
        for (i, inst) in self.children.iter_mut().enumerate() {
            let status = loop {
                if let Some(s) = inst.child.try_wait()? {
                    break Some(s);
                }
                if Instant::now() >= deadline {
                    let _ = inst.child.kill();
                    let _ = inst.child.wait();
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            match status {
                Some(s) if s.success() => {}
                Some(s) => {
                    failed.push(format!("instance {i} exited {s}:\n{}", log_tail(&inst.log)))
                }
                None => failed.push(format!(
                    "instance {i} did not exit within {} s of SIGTERM and was killed",
                    STOP_TIMEOUT.as_secs()
                )),
            }
        }
        self.children.clear();
        if !failed.is_empty() {
            bail!("{}", failed.join("\n"));
        }
        Ok(())
    }

    /// The temporary directory of the configuration files, spools and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Instances {
    fn drop(&mut self) {
        for inst in &mut self.children {
            let _ = inst.child.kill();
            let _ = inst.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_name_of_a_url_is_replaced() {
        let with = |u| with_database(u, "x").unwrap();
        assert_eq!(
            with("postgres://postgres@127.0.0.1:5432/test"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with("postgresql://u:p@h/db?sslmode=disable"),
            "postgresql://u:p@h/x?sslmode=disable"
        );
        assert_eq!(with("postgres://h:5432"), "postgres://h:5432/x");
        assert_eq!(with("postgres://h?a=b"), "postgres://h/x?a=b");
    }
}
