//! The `seckill` binary: parses the command line, reads the settings, starts
//! telemetry, and runs the chosen command. Everything else is in the library.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use seckill::app::{App, Role};
use seckill::auth::Auth;
use seckill::config::Settings;
use seckill::recovery;
use seckill::stock::{ConnectOptions, Keys, Store};

/// mimalloc instead of the system allocator: a request, a purchase batch and
/// a worker's batch each make many small short-lived allocations, which
/// glibc's malloc served at 20–35 % of the CPU in `perf` (see
/// docs/decisions.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "seckill", version, about = "A flash-sale gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create an account; the password is read from standard input (its
    /// first line).
    Add {
        #[arg(long)]
        username: String,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway, with the order workers in the same process.
    Serve {
        /// Run the gateway alone (workers run elsewhere with `seckill worker`).
        #[arg(long)]
        no_workers: bool,
    },
    /// Run order workers only.
    Worker,
    /// Apply the migrations and exit.
    Migrate,
    /// Print a user JWT signed with SECKILL_JWT_SECRET.
    Token {
        #[arg(long)]
        user: i64,
        /// Lifetime in seconds [default: 3600, or SECKILL_JWT_MAX_LIFETIME_SECS
        /// when that is shorter].
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// Print `user_id,token` lines for many users (CSV for load tests).
    Tokens {
        /// How many users.
        #[arg(long)]
        users: u32,
        /// The first user id.
        #[arg(long, default_value_t = 1)]
        first: i64,
        /// Lifetime in seconds [default: 3600, or SECKILL_JWT_MAX_LIFETIME_SECS
        /// when that is shorter].
        #[arg(long)]
        ttl: Option<u64>,
        /// Print a `user_id,token` header line first.
        #[arg(long)]
        header: bool,
    },
    /// Print each Lua script's name, SHA and KEYS/ARGV contract.
    Scripts {
        /// Also load every script into Redis (`SCRIPT LOAD`; on a cluster,
        /// on every primary).
        #[arg(long)]
        load: bool,
    },
    /// Manage buyer accounts.
    User {
        #[command(subcommand)]
        action: UserCommand,
    },
    /// Compare Redis and PostgreSQL for each promotion; exit 1 on drift.
    Reconcile {
        #[arg(long)]
        promotion: Option<i64>,
    },
    /// Rebuild a promotion's Redis state from PostgreSQL when Redis lost it.
    Recover {
        #[arg(long)]
        promotion: Option<i64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("seckill: {e:#}");
            return ExitCode::from(2);
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.worker_threads(settings.runtime_threads());
    let runtime = match runtime.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("seckill: failed to start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The OTLP exporter's connections live on the runtime.
    if let Err(e) = runtime.block_on(async {
        seckill::telemetry::init_tracing_with_export(settings.log_format, &settings.otlp)
    }) {
        eprintln!("seckill: {e:#}");
        return ExitCode::from(2);
    }
    let code = match runtime.block_on(run(cli.command, settings)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "seckill failed");
            eprintln!("seckill: {e:#}");
            ExitCode::FAILURE
        }
    };
    // The last spans leave while the runtime still runs.
    seckill::telemetry::otlp::shutdown();
    code
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve { no_workers } => {
            warn_insecure(&settings);
            let role = if no_workers {
                Role::GatewayOnly
            } else {
                Role::Serve
            };
            App::build(settings, role)
                .await?
                .run_until_stopped(shutdown_signal())
                .await?;
        }
        Command::Worker => {
            App::build(settings, Role::WorkersOnly)
                .await?
                .run_until_stopped(shutdown_signal())
                .await?;
        }
        Command::Migrate => {
            let db = seckill::db::connect(&settings.database_url, 1).await?;
            seckill::db::migrate(&db).await?;
            println!("migrations applied");
        }
        Command::Token { user, ttl } => {
            anyhow::ensure!(user > 0, "--user must be a positive integer");
            if !settings.insecure_secrets().is_empty() {
                eprintln!("warning: signing with the development SECKILL_JWT_SECRET");
            }
            let auth = Auth::from_settings(&settings);
            let token = auth.mint(user, token_ttl(&auth, ttl))?;
            println!("{token}");
        }
        Command::Tokens {
            users,
            first,
            ttl,
            header,
        } => {
            anyhow::ensure!(first > 0, "--first must be a positive integer");
            let auth = Auth::from_settings(&settings);
            let ttl = token_ttl(&auth, ttl);
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            if header {
                writeln!(out, "user_id,token")?;
            }
            for user in first..first + i64::from(users) {
                writeln!(out, "{user},{}", auth.mint(user, ttl)?)?;
            }
            out.flush()?;
        }
        Command::User {
            action: UserCommand::Add { username },
        } => {
            let mut password = String::new();
            std::io::stdin()
                .read_line(&mut password)
                .context("failed to read the password from standard input")?;
            let password = password.trim_end_matches(['\r', '\n']);
            let db = seckill::db::connect(&settings.database_url, 2).await?;
            seckill::db::migrate(&db).await?;
            let accounts = seckill::accounts::Accounts::new(db);
            let id = accounts
                .register(&username, password)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{id}");
        }
        Command::Scripts { load } => {
            if let Some(dir) = &settings.lua_dir {
                seckill::stock::lua::use_dir(dir)?;
            }
            for lua in seckill::stock::lua::all() {
                println!(
                    "== {}  sha1 {}  ({})",
                    lua.name,
                    lua.script.get_hash(),
                    lua.origin
                );
                println!("{}\n", lua.contract());
            }
            if load {
                let store = Store::connect(
                    &settings.redis_url,
                    Keys::new(settings.key_prefix.clone()),
                    ConnectOptions::commands(OPS_REDIS_TIMEOUT),
                )
                .await?;
                store.load_scripts().await?;
                println!("loaded into redis");
            }
        }
        Command::Reconcile { promotion } => {
            let (db, store) = stores(&settings).await?;
            let rows = recovery::reconcile(&db, &store, promotion, true).await?;
            print!("{}", recovery::table(&rows));
            if rows.iter().any(|r| r.drift != 0) {
                println!("drift found");
                return Ok(ExitCode::FAILURE);
            }
            println!("no drift");
        }
        Command::Recover { promotion } => {
            let (db, store) = stores(&settings).await?;
            let rows = recovery::recover(&db, &store, promotion).await?;
            println!(
                "{:>10} {:>9} {:>6} {:>10} {:>10} {:>9}",
                "promotion", "rebuilt", "busy", "remaining", "sold", "returned"
            );
            let yes = |b: bool| if b { "yes" } else { "no" };
            for r in &rows {
                println!(
                    "{:>10} {:>9} {:>6} {:>10} {:>10} {:>9}",
                    r.promotion_id,
                    yes(r.rebuilt),
                    yes(r.busy),
                    r.remaining,
                    r.sold,
                    r.returned
                );
            }
            if rows.iter().any(|r| r.busy) {
                println!("another recovery holds a promotion: run again once it is done");
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Lifetime of a token minted by `token` and `tokens` without `--ttl`.
const DEFAULT_TOKEN_TTL_SECS: u64 = 3600;

/// `--ttl`, else an hour, or the configured maximum lifetime when shorter.
fn token_ttl(auth: &Auth, ttl: Option<u64>) -> u64 {
    ttl.unwrap_or_else(|| {
        auth.max_lifetime_secs()
            .map_or(DEFAULT_TOKEN_TTL_SECS, |max| {
                max.min(DEFAULT_TOKEN_TTL_SECS)
            })
    })
}

/// Reply timeout of the ops commands' Redis connection: they read whole
/// streams and hashes, which may take longer than a purchase script.
const OPS_REDIS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// PostgreSQL (migrated) and Redis, for the ops commands.
async fn stores(settings: &Settings) -> anyhow::Result<(sqlx::PgPool, Store)> {
    let db = seckill::db::connect(&settings.database_url, settings.db_max_connections).await?;
    seckill::db::migrate(&db).await?;
    let store = Store::connect(
        &settings.redis_url,
        Keys::new(settings.key_prefix.clone()),
        ConnectOptions::commands(OPS_REDIS_TIMEOUT),
    )
    .await?;
    Ok((db, store))
}

fn warn_insecure(settings: &Settings) {
    for var in settings.insecure_secrets() {
        tracing::warn!(
            "!!! {var} is not set: using a development value. Never run a real sale like this. !!!"
        );
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("failed to install the SIGTERM handler")
        {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "no SIGTERM handler");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown signal received");
}
