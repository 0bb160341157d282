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
use spendguard_core::config::{Config, LogFormat, OnStoreError};
use spendguard_guard::{Guard, GuardOptions, SystemClock};
use spendguard_server::{AppState, KeyRing};
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
    },
    /// Create or upgrade the database schema (`serve` also does this at start).
    Migrate {
        #[command(flatten)]
        common: Common,
    },
    /// Manage tenant API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Show or check configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
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

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")
}

async fn open_store(config: &Config, writer: bool) -> anyhow::Result<AnyStore> {
    let options = OpenOptions {
        sync_every_batch: config.server.sync_every_batch,
        take_writer_lock: writer,
        ..OpenOptions::default()
    };
    match AnyStore::open(&config.server.database, &options).await {
        Ok(s) => Ok(s),
        Err(StoreError::Locked(why)) => bail!("{why}"),
        // The URL is not echoed: it may hold a password.
        Err(e) => Err(e).context("failed to open the usage database"),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { common, listen } => {
            let mut config = load_config(&common)?;
            if let Some(l) = listen {
                config.server.listen = l;
            }
            serve(config)
        }
        Command::Migrate { common } => {
            let config = load_config(&common)?;
            runtime()?.block_on(async {
                // Opening runs every pending migration.
                let store = open_store(&config, false).await?;
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
        Command::Config(ConfigCommand::Defaults) => {
            print!("{}", spendguard_core::config::DEFAULTS_TOML);
            Ok(())
        }
        Command::Config(ConfigCommand::Check { file }) => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("failed to read {}", file.display()))?;
            let (config, policy) = spendguard_core::config::load(&text)
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
            KeysCommand::Revoke { id, .. } => {
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

fn serve(config: Config) -> anyhow::Result<()> {
    let policy = config.validate().context("invalid configuration")?;
    init_logging(config.server.log_format);
    runtime()?.block_on(async move {
        let store = open_store(&config, true).await?;
        let mut options = GuardOptions::new(&config.server.spool_path);
        options.on_store_error = config.server.on_store_error;
        let guard = Guard::start(store, policy, options, Arc::new(SystemClock))
            .await
            .context("failed to start: could not restore the ledger from the database")?;
        let env_admin = std::env::var("SPENDGUARD_ADMIN_KEY")
            .ok()
            .filter(|k| !k.is_empty());
        let ring = KeyRing::load(guard.store(), env_admin.as_deref())
            .await
            .context("failed to load API keys")?;
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
        let state = AppState::new(guard, ring);
        spendguard_server::spawn_key_reload(&state);
        let listener = tokio::net::TcpListener::bind(&config.server.listen)
            .await
            .with_context(|| format!("failed to listen on {}", config.server.listen))?;
        tracing::info!(
            listen = %listener.local_addr()?,
            backend = state.guard.store().backend(),
            "spendguard is serving"
        );
        spendguard_server::run(listener, state, shutdown_signal())
            .await
            .context("the server failed")?;
        anyhow::Ok(())
    })
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
