//! The `spendguard` command: parses arguments, loads configuration, sets up logging and
//! calls the library crates. No logic of its own.

/// mimalloc: the service allocates many small, short-lived objects per request (JSON,
/// HTTP); it spends markedly less time in the allocator than the system's malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use spendguard_core::config::{Config, LogFormat, OnStoreError, ServerMode};
use spendguard_guard::{Guard, GuardOptions, SystemClock};
use spendguard_server::reports::{self, Format};
use spendguard_server::{AlertSettings, AppState, KeyRing};
use spendguard_store::{AnyStore, OpenOptions, StoreError};

/// spendguard stops AI bills from running away.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the configuration comes from: a file, then `SPENDGUARD_*` variables, then flags.
#[derive(Debug, clap::Args)]
struct Common {
    /// A TOML configuration file (default: ./spendguard.toml if it exists).
    #[arg(long, env = "SPENDGUARD_CONFIG")]
    config: Option<PathBuf>,
    /// A SQLite file path or a postgres:// URL.
    #[arg(long, env = "SPENDGUARD_DATABASE_URL")]
    database: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP service.
    Serve {
        #[command(flatten)]
        common: Common,
        /// The address to listen on.
        #[arg(long, env = "SPENDGUARD_LISTEN")]
        listen: Option<String>,
        /// `single` (one instance) or `cluster` (any number on one PostgreSQL database).
        #[arg(long, env = "SPENDGUARD_MODE", value_parser = ["single", "cluster"])]
        mode: Option<String>,
    },
    /// Create or upgrade the database schema (`serve` also does this at start).
    Migrate {
        #[command(flatten)]
        common: Common,
        /// Switch the database to another time zone (an IANA name). The current day's and
        /// month's budgets then count only spend from the switch on; `serve` refuses to
        /// start while the configuration and the database disagree.
        #[arg(long, value_name = "ZONE")]
        time_zone: Option<String>,
    },
    /// Manage tenant API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Show or check configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Read a spool file (the batches kept while the database was unreachable), changing
    /// nothing: to recover by hand when spendguard refuses to start over it.
    #[command(subcommand)]
    Spool(SpoolCommand),
    /// One user's usage on one day, per model.
    Usage {
        #[command(flatten)]
        common: Common,
        /// The user.
        #[arg(long)]
        user: String,
        /// The user's tenant.
        #[arg(long)]
        tenant: String,
        /// The day (YYYY-MM-DD, in the configured time zone; default today).
        #[arg(long)]
        date: Option<String>,
        /// table, csv or json.
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// The effective price of a model (or of every model) and where it came from: the
    /// configuration's `[prices]` over the built-in catalog and, with --tenant, the tenant's
    /// overrides (read from the database). USD per million tokens.
    Prices {
        #[command(flatten)]
        common: Common,
        /// One model (dated names resolve); default: every model.
        model: Option<String>,
        /// Include this tenant's price overrides.
        #[arg(long)]
        tenant: Option<String>,
        /// table or json.
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// Usage over whole days, grouped; top spenders first.
    Report {
        #[command(flatten)]
        common: Common,
        /// The first day (YYYY-MM-DD; default 29 days before --to).
        #[arg(long)]
        from: Option<String>,
        /// The last day (YYYY-MM-DD; default today).
        #[arg(long)]
        to: Option<String>,
        /// day, tenant, company, user, model or endpoint.
        #[arg(long, default_value = "day")]
        group_by: String,
        /// Only this tenant's usage.
        #[arg(long)]
        tenant: Option<String>,
        /// At most this many rows (the top spenders, except by day).
        #[arg(long)]
        limit: Option<usize>,
        /// table, csv or json.
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// Import history into a running server: the seed's `ai_usage` rows, from a CSV file
    /// (a header row naming the seed's columns) or a PostgreSQL query, each recorded at its
    /// own `created_at` (POST /v1/usage with the admin key). Idempotent: a row imported
    /// before is not recorded again. `expired` rows are skipped.
    Import {
        /// The server.
        #[arg(long, env = "SPENDGUARD_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
        /// The admin key.
        #[arg(long, env = "SPENDGUARD_ADMIN_KEY", hide_env_values = true)]
        admin_key: String,
        /// A CSV file of the seed's rows.
        #[arg(
            long,
            conflicts_with = "postgres",
            required_unless_present = "postgres"
        )]
        csv: Option<PathBuf>,
        /// A postgres:// URL of the seed's database, read with --query.
        #[arg(long)]
        postgres: Option<String>,
        /// The query that reads the rows, its columns as in the default: id, user_id,
        /// company_id, tenant_id, model, endpoint, input_tokens, cached_input_tokens,
        /// output_tokens, cost_usd (text), request_status, created_at.
        #[arg(long, requires = "postgres")]
        query: Option<String>,
        /// Rows sent at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// Cost alerts of the current day and month.
    Alerts {
        #[command(flatten)]
        common: Common,
        /// Also alerts of past windows.
        #[arg(long)]
        all: bool,
        /// Only this tenant's alerts.
        #[arg(long)]
        tenant: Option<String>,
        /// table or json.
        #[arg(long, default_value = "table")]
        format: String,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a key for a tenant and print it (shown once).
    Create {
        #[command(flatten)]
        common: Common,
        /// The tenant the key acts for.
        #[arg(long)]
        tenant: String,
    },
    /// List keys (never the keys themselves).
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Revoke a key by id. A running server stops accepting it within seconds.
    Revoke {
        #[command(flatten)]
        common: Common,
        id: String,
        /// Revoke it even if it is an admin key (without another admin key, only
        /// SPENDGUARD_ADMIN_KEY can then sign in).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum SpoolCommand {
    /// Print the header and every frame (byte offset, version, events), and any damage.
    Inspect {
        /// The spool file (`spool_path` in the configuration).
        path: PathBuf,
    },
    /// Write the events of every readable frame to stdout as JSON lines, oldest first;
    /// fails (after writing them) if the file is damaged further on.
    Export {
        /// The spool file (`spool_path` in the configuration).
        path: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the built-in configuration (every key, with its default).
    Defaults,
    /// Validate a configuration file and print the effective configuration.
    Check {
        /// The TOML file to check.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reads the configuration file (if any) and applies the environment and flags.
fn load_config(common: &Common) -> anyhow::Result<Config> {
    let path = common.config.clone().or_else(|| {
        let default = PathBuf::from("spendguard.toml");
        default.exists().then_some(default)
    });
    let text = match &path {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("failed to read {}", p.display()))?
        }
        None => String::new(),
    };
    let mut config = Config::from_toml(&text).with_context(|| match &path {
        Some(p) => format!("{} is not a valid configuration", p.display()),
        None => "invalid configuration".into(),
    })?;
    if let Ok(v) = std::env::var("SPENDGUARD_ON_STORE_ERROR") {
        config.server.on_store_error = match v.as_str() {
            "spool" => OnStoreError::Spool,
            "deny" => OnStoreError::Deny,
            _ => bail!("SPENDGUARD_ON_STORE_ERROR must be `spool` or `deny`, not `{v}`"),
        };
    }
    if let Ok(v) = std::env::var("SPENDGUARD_LOG_FORMAT") {
        config.server.log_format = match v.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => bail!("SPENDGUARD_LOG_FORMAT must be `text` or `json`, not `{v}`"),
        };
    }
    if let Some(db) = &common.database {
        config.server.database = db.clone();
    }
    Ok(config)
}

/// `spendguard import`: rows to a running server, with a progress bar on stderr.
fn import(
    url: &str,
    admin_key: &str,
    csv: Option<&std::path::Path>,
    postgres: Option<&str>,
    query: Option<&str>,
    concurrency: usize,
) -> anyhow::Result<()> {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    use spendguard_server::import::{self, Target};
    let target = Target {
        client: reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .context("failed to set up the HTTP client")?,
        url: url.to_owned(),
        admin_key: admin_key.to_owned(),
    };
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    let summary = runtime()?.block_on(async {
        match (csv, postgres) {
            (Some(path), _) => {
                let file = std::fs::File::open(path)
                    .with_context(|| format!("failed to open {}", path.display()))?;
                let len = file.metadata().map(|m| m.len()).unwrap_or(0);
                bar.set_length(len);
                if let Ok(style) = ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} · {msg} · {elapsed} (eta {eta})",
                ) {
                    bar.set_style(style.progress_chars("=> "));
                }
                let input = std::io::BufReader::new(file);
                import::from_csv(target, input, concurrency, |done, pos| {
                    bar.set_position(pos);
                    bar.set_message(format!("{done} rows"));
                })
                .await
                .map_err(anyhow::Error::msg)
            }
            (None, Some(db)) => {
                if let Ok(style) = ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} rows · {msg} · {elapsed} (eta {eta})",
                ) {
                    bar.set_style(style.progress_chars("=> "));
                }
                import::from_postgres(target, db, query, concurrency, |done, _read, total| {
                    bar.set_length(total);
                    bar.set_position(done);
                    bar.set_message(format!("{done} sent"));
                })
                .await
                .map_err(anyhow::Error::msg)
            }
            (None, None) => bail!("name the rows: --csv FILE or --postgres URL"),
        }
    })?;
    bar.finish_and_clear();
    use std::sync::atomic::Ordering::Relaxed;
    println!(
        "imported {}, already imported {}, skipped {} (expired), failed {}",
        summary.imported.load(Relaxed),
        summary.already.load(Relaxed),
        summary.skipped.load(Relaxed),
        summary.failed.load(Relaxed)
    );
    let errors = summary.errors.lock().unwrap_or_else(|e| e.into_inner());
    for e in errors.iter() {
        eprintln!("  {e}");
    }
    if summary.failed.load(Relaxed) > 0 {
        bail!("some rows were not imported");
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")
}

async fn open_store(config: &Config, writer: bool) -> anyhow::Result<AnyStore> {
    let cluster = config.server.mode == ServerMode::Cluster;
    if cluster && writer && !config.server.database.starts_with("postgres") {
        bail!(
            "mode = \"cluster\" needs a PostgreSQL database (postgres://...): SQLite serves \
             one instance only; use mode = \"single\" with SQLite"
        );
    }
    let options = OpenOptions {
        sync_every_batch: config.server.sync_every_batch,
        take_writer_lock: writer,
        cluster: cluster && writer,
        ..OpenOptions::default()
    };
    match AnyStore::open(&config.server.database, &options).await {
        Ok(s) => Ok(s),
        Err(StoreError::Locked(why)) => bail!("{why}"),
        // The URL is not echoed: it may hold a password.
        Err(e) => Err(e).context("failed to open the usage database"),
    }
}

/// Opens an existing database for the read commands: a mistyped path is an error, not a
/// new, empty database.
async fn open_existing_store(config: &Config) -> anyhow::Result<AnyStore> {
    let options = OpenOptions {
        take_writer_lock: false,
        ..OpenOptions::default()
    };
    match AnyStore::open_existing(&config.server.database, &options).await {
        Ok(s) => Ok(s),
        Err(StoreError::Locked(why)) => bail!("{why}"),
        // The URL is not echoed: it may hold a password.
        Err(e) => Err(e).context("failed to open the usage database"),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            common,
            listen,
            mode,
        } => {
            let mut config = load_config(&common)?;
            if let Some(l) = listen {
                config.server.listen = l;
            }
            match mode.as_deref() {
                Some("cluster") => config.server.mode = ServerMode::Cluster,
                Some("single") => config.server.mode = ServerMode::Single,
                _ => {}
            }
            serve(config, move || load_config(&common))
        }
        Command::Migrate { common, time_zone } => {
            let config = load_config(&common)?;
            if let Some(zone) = &time_zone {
                spendguard_core::Calendar::new(zone)
                    .with_context(|| format!("`{zone}` is not a time zone"))?;
            }
            runtime()?.block_on(async {
                // Opening runs every pending migration.
                let store = open_store(&config, false).await?;
                if let Some(zone) = &time_zone {
                    use spendguard_store::{Store, settings};
                    let before = store
                        .setting(settings::TIME_ZONE)
                        .await
                        .context("failed to read the database's time zone")?;
                    store
                        .put_setting(settings::TIME_ZONE, zone)
                        .await
                        .context("failed to record the time zone")?;
                    println!(
                        "the database's time zone is now {zone} (it was {}); set time_zone = \"{zone}\" in the configuration",
                        before.as_deref().unwrap_or("not recorded")
                    );
                }
                let versions = store
                    .schema_versions()
                    .await
                    .context("failed to read the schema version")?;
                println!(
                    "the {} database is at schema version {}",
                    store.backend(),
                    versions.last().copied().unwrap_or(0)
                );
                store.close().await;
                anyhow::Ok(())
            })
        }
        Command::Keys(cmd) => keys(cmd),
        Command::Usage {
            common,
            user,
            tenant,
            date,
            format,
        } => usage(&common, &user, &tenant, date.as_deref(), &format),
        Command::Prices {
            common,
            model,
            tenant,
            format,
        } => prices(&common, model.as_deref(), tenant.as_deref(), &format),
        Command::Report {
            common,
            from,
            to,
            group_by,
            tenant,
            limit,
            format,
        } => report(
            &common,
            from.as_deref(),
            to.as_deref(),
            &group_by,
            tenant.as_deref(),
            limit,
            &format,
        ),
        Command::Alerts {
            common,
            all,
            tenant,
            format,
        } => alerts(&common, all, tenant.as_deref(), &format),
        Command::Import {
            url,
            admin_key,
            csv,
            postgres,
            query,
            concurrency,
        } => import(
            &url,
            &admin_key,
            csv.as_deref(),
            postgres.as_deref(),
            query.as_deref(),
            concurrency,
        ),
        Command::Spool(cmd) => spool(cmd),
        Command::Config(ConfigCommand::Defaults) => {
            print!("{}", spendguard_core::config::DEFAULTS_TOML);
            Ok(())
        }
        Command::Config(ConfigCommand::Check { file }) => {
            // The same layering and checks as `serve`: the file, the environment, then
            // every validation `serve` runs before it starts.
            let config = load_config(&Common {
                config: Some(file.clone()),
                database: None,
            })?;
            let Checked { policy, .. } = checked(&config)
                .with_context(|| format!("{} is not a valid configuration", file.display()))?;
            println!(
                "{} is valid: time zone {}, {} tiers (default `{}`), {} priced models",
                file.display(),
                policy.calendar.time_zone_name(),
                policy.tiers.len(),
                policy.default_tier,
                policy.prices.len(),
            );
            println!();
            print!(
                "{}",
                toml::to_string(&config).context("failed to print the effective configuration")?
            );
            Ok(())
        }
    }
}

fn spool(cmd: SpoolCommand) -> anyhow::Result<()> {
    use spendguard_guard::spool::{Problem, scan};
    let path = match &cmd {
        SpoolCommand::Inspect { path } | SpoolCommand::Export { path } => path,
    };
    let scan = scan(path).with_context(|| format!("failed to read {}", path.display()))?;
    let damage = match &scan.problem {
        Some(Problem::Bad { offset, reason }) => {
            Some(format!("damaged at byte {offset}: {reason}"))
        }
        _ => None,
    };
    match cmd {
        SpoolCommand::Inspect { .. } => {
            match &scan.header {
                Some(h) => println!(
                    "{}: {} bytes, format {}, database {}",
                    path.display(),
                    scan.file_len,
                    h.format,
                    h.database_id
                ),
                None if !scan.frames.is_empty() => println!(
                    "{}: {} bytes, the first spool format (no header, no database named)",
                    path.display(),
                    scan.file_len
                ),
                None if damage.is_none() => println!("{}: empty", path.display()),
                None => println!(
                    "{}: {} bytes, no valid header",
                    path.display(),
                    scan.file_len
                ),
            }
            for f in &scan.frames {
                println!(
                    "frame at byte {}: version {}, {} bytes, {} events",
                    f.offset,
                    f.version,
                    f.len,
                    f.events.len()
                );
            }
            let events: usize = scan.frames.iter().map(|f| f.events.len()).sum();
            println!("{} frames, {events} events", scan.frames.len());
            match &scan.problem {
                Some(Problem::TornTail { offset }) => println!(
                    "incomplete last frame at byte {offset} ({} bytes; never acknowledged, \
                     cut at the next start)",
                    scan.file_len - offset
                ),
                Some(Problem::Bad { .. }) => {
                    println!("{}", damage.as_deref().unwrap_or_default());
                    println!(
                        "spendguard will not start over this file; export the frames before the \
                         damage, apply or archive them, then move the file away"
                    );
                }
                None => {}
            }
            Ok(())
        }
        SpoolCommand::Export { .. } => {
            use std::io::Write as _;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for f in &scan.frames {
                for e in &f.events {
                    serde_json::to_writer(&mut out, e)?;
                    out.write_all(b"\n")?;
                }
            }
            out.flush()?;
            match damage {
                Some(d) => bail!(
                    "{}: {d}; the frames before it were exported",
                    path.display()
                ),
                None => Ok(()),
            }
        }
    }
}

fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
    let common = match &cmd {
        KeysCommand::Create { common, .. }
        | KeysCommand::List { common }
        | KeysCommand::Revoke { common, .. } => common,
    };
    let config = load_config(common)?;
    runtime()?.block_on(async {
        let store = open_store(&config, false).await?;
        let now = spendguard_guard::Clock::now(&SystemClock);
        match cmd {
            KeysCommand::Create { tenant, .. } => {
                let tenant =
                    spendguard_core::TenantId::parse(&tenant).context("invalid --tenant")?;
                let ring = KeyRing::default();
                let (key, record) =
                    spendguard_server::auth::create_key(&store, &ring, Some(tenant), now)
                        .await
                        .context("failed to store the key")?;
                println!(
                    "created key {} for tenant {}; it is shown once:",
                    record.id,
                    record.tenant.as_ref().map(|t| t.as_str()).unwrap_or("-")
                );
                println!("{key}");
            }
            KeysCommand::List { .. } => {
                let keys = store.list_api_keys().await.context("failed to list keys")?;
                println!(
                    "{:<36}  {:<24}  {:<11}  {:<27}  revoked",
                    "id", "tenant", "prefix", "created"
                );
                for k in keys {
                    println!(
                        "{:<36}  {:<24}  {:<11}  {:<27}  {}",
                        k.id,
                        k.tenant.as_ref().map(|t| t.as_str()).unwrap_or("(admin)"),
                        k.prefix,
                        spendguard_server::api::rfc3339(k.created_at),
                        k.revoked_at
                            .map(spendguard_server::api::rfc3339)
                            .unwrap_or_else(|| "-".into())
                    );
                }
            }
            KeysCommand::Revoke { id, force, .. } => {
                let keys = store.list_api_keys().await.context("failed to list keys")?;
                let admin = |k: &&spendguard_store::ApiKeyRecord| {
                    k.tenant.is_none() && k.revoked_at.is_none()
                };
                if !force && keys.iter().filter(admin).any(|k| k.id == id) {
                    let others = keys.iter().filter(admin).filter(|k| k.id != id).count();
                    bail!(
                        "{id} is an admin key; {} Run again with --force to revoke it anyway.",
                        if others == 0 {
                            "it is the only stored one: without it, only SPENDGUARD_ADMIN_KEY \
                             (if the server has one) can administer the service or sign in to \
                             the dashboard."
                        } else {
                            "revoking it ends every session and script that uses it."
                        }
                    );
                }
                if !store
                    .revoke_api_key(&id, now)
                    .await
                    .context("failed to revoke the key")?
                {
                    bail!("no active key with id {id}");
                }
                println!("revoked {id}");
            }
        }
        store.close().await;
        anyhow::Ok(())
    })
}

fn parse_format(s: &str, allowed: &[Format]) -> anyhow::Result<Format> {
    match Format::parse(s) {
        Some(f) if allowed.contains(&f) => Ok(f),
        _ => bail!(
            "--format must be one of {}, not `{s}`",
            allowed
                .iter()
                .map(|f| f.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Opens the store for reading, with the configured calendar.
fn read_only(common: &Common) -> anyhow::Result<(Config, spendguard_core::Policy)> {
    let config = load_config(common)?;
    let policy = config.validate().context("invalid configuration")?;
    Ok((config, policy))
}

fn usage(
    common: &Common,
    user: &str,
    tenant: &str,
    date: Option<&str>,
    format: &str,
) -> anyhow::Result<()> {
    let format = parse_format(format, &[Format::Table, Format::Csv, Format::Json])?;
    let (config, policy) = read_only(common)?;
    let cal = &policy.calendar;
    let user = spendguard_core::UserId::parse(user).context("invalid --user")?;
    let tenant = spendguard_core::TenantId::parse(tenant).context("invalid --tenant")?;
    let date = match date {
        Some(d) => reports::parse_date("--date", d).map_err(anyhow::Error::msg)?,
        None => cal.date_of(spendguard_guard::Clock::now(&SystemClock)),
    };
    runtime()?.block_on(async {
        let store = open_existing_store(&config).await?;
        let models = store
            .user_day(&tenant, &user, cal.date_start(date))
            .await
            .context("failed to read usage")?;
        store.close().await;
        match format {
            Format::Json => println!(
                "{}",
                serde_json::to_string_pretty(&reports::daily_json(
                    cal, &tenant, &user, date, &models
                ))?
            ),
            Format::Csv | Format::Table => {
                let report = spendguard_store::Report {
                    groups: models.len(),
                    totals: models.iter().fold(Default::default(), |mut t, m| {
                        spendguard_store::UsageTotals::add(&mut t, &m.totals);
                        t
                    }),
                    rows: models
                        .into_iter()
                        .map(|m| spendguard_store::ReportRow {
                            day: None,
                            tenant: None,
                            key: Some(m.model),
                            totals: m.totals,
                        })
                        .collect(),
                };
                let g = spendguard_store::GroupBy::Model;
                if format == Format::Csv {
                    print!("{}", reports::report_csv(cal, g, &report));
                } else {
                    println!(
                        "user {user} of tenant {tenant} on {date} ({})",
                        cal.time_zone_name()
                    );
                    print!("{}", reports::report_table(cal, g, &report));
                }
            }
        }
        anyhow::Ok(())
    })
}

fn report(
    common: &Common,
    from: Option<&str>,
    to: Option<&str>,
    group_by: &str,
    tenant: Option<&str>,
    limit: Option<usize>,
    format: &str,
) -> anyhow::Result<()> {
    let format = parse_format(format, &[Format::Table, Format::Csv, Format::Json])?;
    let (config, policy) = read_only(common)?;
    let cal = &policy.calendar;
    let tenant = tenant
        .map(spendguard_core::TenantId::parse)
        .transpose()
        .context("invalid --tenant")?;
    let now = spendguard_guard::Clock::now(&SystemClock);
    let spec = reports::ReportSpec::new(cal, now, from, to, Some(group_by), tenant, limit)
        .map_err(anyhow::Error::msg)?;
    runtime()?.block_on(async {
        let store = open_existing_store(&config).await?;
        let report = store
            .report(&spec.query)
            .await
            .context("failed to read the report")?;
        let would_deny = store
            .would_deny_counts(
                spec.query.from_day,
                spec.query.to_day,
                spec.query.tenant.as_ref(),
            )
            .await
            .context("failed to read the would-be denials")?;
        let would_deny = reports::WouldDenyOut::from_counts(&would_deny);
        store.close().await;
        match format {
            Format::Json => println!(
                "{}",
                serde_json::to_string_pretty(&reports::ReportOut {
                    would_deny: Some(would_deny),
                    ..reports::report_out(cal, &spec, &report)
                })?
            ),
            Format::Csv => print!("{}", reports::report_csv(cal, spec.query.group_by, &report)),
            Format::Table => {
                println!(
                    "usage from {} to {} ({}) by {}",
                    spec.from,
                    spec.to,
                    cal.time_zone_name(),
                    spec.query.group_by.as_str()
                );
                print!(
                    "{}",
                    reports::report_table(cal, spec.query.group_by, &report)
                );
                if would_deny.total > 0 {
                    println!(
                        "would-be denials (limits in shadow): {} (budget {}, rate {}, model {}, output tokens {})",
                        would_deny.total,
                        would_deny.budget_exceeded,
                        would_deny.rate_limited,
                        would_deny.model_not_allowed,
                        would_deny.max_output_tokens_exceeded
                    );
                }
            }
        }
        anyhow::Ok(())
    })
}

fn prices(
    common: &Common,
    model: Option<&str>,
    tenant: Option<&str>,
    format: &str,
) -> anyhow::Result<()> {
    let format = parse_format(format, &[Format::Table, Format::Json])?;
    let (config, policy) = read_only(common)?;
    let model = model
        .map(spendguard_core::ModelName::parse)
        .transpose()
        .context("invalid model name")?;
    let tenant = tenant
        .map(spendguard_core::TenantId::parse)
        .transpose()
        .context("invalid --tenant")?;
    let overrides = match &tenant {
        None => None,
        Some(t) => {
            let periods = policy
                .calendar
                .periods(spendguard_guard::Clock::now(&SystemClock));
            let snapshot = runtime()?.block_on(async {
                use spendguard_store::Store;
                let store = open_existing_store(&config).await?;
                let snapshot = store
                    .load(periods.day.start, periods.month.start)
                    .await
                    .context("failed to read the tenant's prices")?;
                store.close().await;
                anyhow::Ok(snapshot)
            })?;
            snapshot
                .tenant_prices
                .into_iter()
                .find(|(id, _)| id == t)
                .map(|(_, p)| p)
        }
    };
    let Some(rows) = spendguard_server::api::effective_prices(
        &policy.prices,
        overrides.as_ref(),
        model.as_ref(),
    ) else {
        bail!(
            "model `{}` has no price (unknown_model = \"deny\")",
            model.as_ref().map_or("", |m| m.as_str())
        );
    };
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        _ => {
            let header: Vec<String> = [
                "model",
                "source",
                "provider",
                "input",
                "cached_input",
                "cache_write",
                "cache_write_1h",
                "output",
                "reasoning",
                "long_context",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            let table_rows: Vec<Vec<String>> = rows
                .iter()
                .map(|p| {
                    let source = match p.multiplier {
                        Some(m) => format!("{} (x{m})", p.source),
                        None => p.source.to_owned(),
                    };
                    vec![
                        p.model.clone(),
                        source,
                        p.provider.unwrap_or("").to_owned(),
                        p.input.to_string(),
                        p.cached_input.to_string(),
                        p.cache_write.to_string(),
                        p.cache_write_1h.to_string(),
                        p.output.to_string(),
                        p.reasoning.to_string(),
                        p.long_context.as_ref().map_or(String::new(), |lc| {
                            format!(
                                "above {}: {} in, {} out",
                                lc.above_tokens, lc.input, lc.output
                            )
                        }),
                    ]
                })
                .collect();
            println!(
                "USD per million tokens; catalog: {}",
                spendguard_core::prices::CATALOG_SNAPSHOT
            );
            print!("{}", reports::table(&header, &table_rows));
        }
    }
    Ok(())
}

fn alerts(common: &Common, all: bool, tenant: Option<&str>, format: &str) -> anyhow::Result<()> {
    let format = parse_format(format, &[Format::Table, Format::Json])?;
    let (config, policy) = read_only(common)?;
    let tenant = tenant
        .map(spendguard_core::TenantId::parse)
        .transpose()
        .context("invalid --tenant")?;
    let periods = policy
        .calendar
        .periods(spendguard_guard::Clock::now(&SystemClock));
    runtime()?.block_on(async {
        let store = open_existing_store(&config).await?;
        let list = store
            .alerts(&spendguard_store::AlertQuery {
                tenant,
                current: (!all).then_some((periods.day.start, periods.month.start)),
                limit: Some(1000),
            })
            .await
            .context("failed to read alerts")?;
        store.close().await;
        let list: Vec<_> = list
            .iter()
            .map(spendguard_server::alerts::payload)
            .collect();
        match format {
            Format::Json => println!("{}", serde_json::to_string_pretty(&list)?),
            _ => {
                if list.is_empty() {
                    println!(
                        "no alerts{}",
                        if all {
                            ""
                        } else {
                            " in the current day or month"
                        }
                    );
                    return anyhow::Ok(());
                }
                let header: Vec<String> = ["id", "raised", "kind", "scope", "window", "message"]
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect();
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|a| {
                        vec![
                            a.id.to_string(),
                            spendguard_server::api::rfc3339(a.created_at.0),
                            if a.kind == "projected" {
                                "projected".into()
                            } else {
                                format!("{}%", a.threshold_percent)
                            },
                            format!("{} {}", a.scope, a.scope_id),
                            a.window.to_owned(),
                            a.message.clone(),
                        ]
                    })
                    .collect();
                print!("{}", reports::table(&header, &rows));
            }
        }
        anyhow::Ok(())
    })
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: logs sent to files and collectors stay plain.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// What `serve` takes from its configuration and environment, all checked.
struct Checked {
    policy: spendguard_core::Policy,
    alert_settings: AlertSettings,
    admin_key: Option<String>,
    metrics_key: Option<String>,
    open_metrics: Option<std::net::SocketAddr>,
}

/// Every check `serve` makes of its configuration and environment before it starts
/// (`config check` runs them too).
fn checked(config: &Config) -> anyhow::Result<Checked> {
    let policy = config.validate()?;
    let secret = std::env::var("SPENDGUARD_WEBHOOK_SECRET")
        .ok()
        .filter(|s| !s.is_empty());
    let alert_settings = AlertSettings::from_config(&config.alerts, secret)?;
    let env_key = |name: &str| -> anyhow::Result<Option<String>> {
        match std::env::var(name).ok().filter(|k| !k.is_empty()) {
            Some(k) => {
                spendguard_server::auth::check_env_key(name, &k).map_err(anyhow::Error::msg)?;
                Ok(Some(k))
            }
            None => Ok(None),
        }
    };
    Ok(Checked {
        policy,
        alert_settings,
        admin_key: env_key("SPENDGUARD_ADMIN_KEY")?,
        metrics_key: env_key("SPENDGUARD_METRICS_KEY")?,
        open_metrics: config.metrics.validate()?,
    })
}

fn serve(
    config: Config,
    reload: impl Fn() -> anyhow::Result<Config> + Send + 'static,
) -> anyhow::Result<()> {
    let Checked {
        policy,
        alert_settings,
        admin_key: env_admin,
        metrics_key,
        open_metrics,
    } = checked(&config).context("invalid configuration")?;
    let limits = spendguard_server::ServerLimits::from_config(&config);
    spendguard_gateway::check_keys(&config.gateway)
        .map_err(anyhow::Error::msg)
        .context("invalid gateway configuration")?;
    init_logging(config.server.log_format);
    runtime()?.block_on(async move {
        // Listening first: a port in use fails before anything else happens (a failed start
        // must not have printed, and stored, a new admin key), and while the database cannot
        // be reached, health checks get an answer.
        let listener = std::net::TcpListener::bind(&config.server.listen).with_context(|| {
            format!(
                "failed to listen on {}; if another process uses it, choose another address \
                 with --listen (or SPENDGUARD_LISTEN, or server.listen)",
                config.server.listen
            )
        })?;
        listener.set_nonblocking(true)?;
        tracing::info!(address = %listener.local_addr()?, "bound; restoring the ledger");
        let Some(guard) = start_guard(&config, policy, &listener).await? else {
            return Ok(());
        };
        let ring = KeyRing::load(guard.store(), env_admin.as_deref())
            .await
            .context("failed to load API keys")?
            .with_metrics_key(metrics_key.as_deref());
        if !ring.has_admin() {
            let (key, _) =
                spendguard_server::auth::create_key(guard.store(), &ring, None, guard.now())
                    .await
                    .context("failed to store the admin key")?;
            println!("Generated the admin API key. It is shown only this once; keep it safe:");
            println!();
            println!("    {key}");
            println!();
            println!("(Set SPENDGUARD_ADMIN_KEY to choose your own.)");
        }
        let state = AppState::with_alerts(guard, ring, alert_settings).with_limits(limits);
        spendguard_server::spawn_background(&state);
        reload_on_hangup(state.guard.clone(), reload);
        if let Some(addr) = open_metrics {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("failed to listen on {addr} (metrics.open_listen)"))?;
            tracing::info!(listen = %addr, "serving /metrics without a key on loopback");
            let state = state.clone();
            tokio::spawn(async move {
                if let Err(e) =
                    spendguard_server::run_metrics(listener, state, shutdown_signal()).await
                {
                    tracing::error!(error = %e, "the metrics listener failed");
                }
            });
        }
        let listener = tokio::net::TcpListener::from_std(listener)?;
        tracing::info!(
            listen = %listener.local_addr()?,
            backend = state.guard.store().backend(),
            "spendguard is serving"
        );
        let gateway = if config.gateway.enabled() {
            let g = spendguard_gateway::Gateway::new(state.clone(), &config.gateway)
                .map_err(anyhow::Error::msg)
                .context("invalid gateway configuration")?;
            tracing::info!(
                upstreams = config.gateway.upstreams.len(),
                "gateway mode: serving /openai/v1 and /anthropic"
            );
            Some(g)
        } else {
            None
        };
        let router = gateway.as_ref().map(|g| g.router());
        let settle = async move {
            if let Some(g) = gateway {
                g.idle().await;
            }
        };
        spendguard_server::run_with(listener, state, router, shutdown_signal(), settle)
            .await
            .context("the server failed")?;
        anyhow::Ok(())
    })
}

/// Opens the store and restores the ledger. While the database cannot be reached, it retries
/// with backoff (1 s, doubling, at most 30 s apart), logging why, and serves the starting
/// phase on `listener` (`/readyz` 503 with the reason): deciding without the restored counters
/// would not be exact. Other errors (a bad URL, another writer, a refused time zone) end it.
/// `None` when a shutdown signal came first.
async fn start_guard(
    config: &Config,
    policy: spendguard_core::Policy,
    listener: &std::net::TcpListener,
) -> anyhow::Result<Option<Guard<AnyStore>>> {
    let starting = spendguard_server::starting::Starting::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let phase = tokio::spawn(spendguard_server::starting::serve(
        tokio::net::TcpListener::from_std(listener.try_clone()?)?,
        starting.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut delay = std::time::Duration::from_secs(1);
    let result = loop {
        let attempt = async {
            let store = open_store(config, true).await?;
            let mut options = GuardOptions::new(&config.server.spool_path);
            options.on_store_error = config.server.on_store_error;
            if config.server.mode == ServerMode::Cluster {
                options.cluster = Some(cluster_options(config));
            }
            Guard::start(store, policy.clone(), options, Arc::new(SystemClock))
                .await
                .context("failed to start: could not restore the ledger from the database")
        };
        let e = match attempt.await {
            Ok(guard) => break Ok(Some(guard)),
            Err(e) if is_unavailable(&e) => e,
            Err(e) => break Err(e),
        };
        let why = format!("{e:#}");
        tracing::warn!(retry_in_s = delay.as_secs(), reason = %why, "cannot start yet; retrying");
        starting.set_reason(why);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = &mut shutdown => break Ok(None),
        }
        delay = (delay * 2).min(std::time::Duration::from_secs(30));
    };
    let _ = stop.send(());
    let _ = phase.await;
    result
}

/// This instance in a cluster: a new id at every start (an instance that died is then
/// simply one that stopped beating), named by `SPENDGUARD_INSTANCE_NAME` or by host and
/// port.
fn cluster_options(config: &Config) -> spendguard_guard::cluster::ClusterOptions {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    let port = config.server.listen.rsplit(':').next().unwrap_or("");
    let name = std::env::var("SPENDGUARD_INSTANCE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| format!("{host}:{port}"));
    let mut options =
        spendguard_guard::cluster::ClusterOptions::new(name, config.server.listen.clone());
    let kinds = &config.cluster.allowances;
    let has = |k: &str| kinds.iter().any(|a| a == k);
    options.allowances = spendguard_guard::cluster::AllowanceScopes {
        global: has("global"),
        tenant: has("tenant"),
        company: has("company"),
    };
    options.lease = std::time::Duration::from_secs(config.cluster.lease_seconds);
    options
}

/// True for an error of starting that a retry may cure: the database cannot be reached.
fn is_unavailable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<StoreError>()
            .is_some_and(StoreError::is_unavailable)
            || matches!(
                c.downcast_ref::<spendguard_guard::GuardError>(),
                Some(spendguard_guard::GuardError::Store(
                    StoreError::Unavailable(_)
                ))
            )
    })
}

/// On SIGHUP, reads the configuration again (the same file, environment and flags) and
/// applies what the ledger enforces: tiers, budgets, tenants' rules, prices, TTLs and what
/// is in shadow, from the next decision on; counters, reservations and the admin's
/// overrides are kept. The other sections (listeners, database, alerts, gateway) take a
/// restart. A configuration that does not validate, or names another time zone, is
/// refused with the reason, and the running one stays.
fn reload_on_hangup(
    guard: Guard<AnyStore>,
    reload: impl Fn() -> anyhow::Result<Config> + Send + 'static,
) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGHUP; reload by restarting");
                return;
            }
        };
        while hangup.recv().await.is_some() {
            let applied = reload()
                .and_then(|c| c.validate().context("invalid configuration"))
                .and_then(|policy| guard.set_policy(policy).map_err(anyhow::Error::from));
            match applied {
                Ok(()) => tracing::info!("configuration reloaded: the new limits apply now"),
                Err(e) => tracing::error!(
                    error = format!("{e:#}"),
                    "configuration not reloaded; the running one stays"
                ),
            }
        }
    });
    #[cfg(not(unix))]
    let _ = (guard, reload);
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
