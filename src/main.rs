//! The `pgtether` command line: serve, check a config, or run the demo.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use pgtether::config::{Config, LogFormat, Scheduler};
use pgtether::embedded::{EmbeddedPostgres, Setup};
use pgtether::listener;
use pgtether::takeover::{control, take};

/// A PostgreSQL connection pooler.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short, env = "PGTETHER_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Log format; overrides `[log] format`.
    #[arg(long, value_enum, global = true)]
    log_format: Option<Format>,
    /// Take over the sessions and sockets of the pgtether running on `[runtime]
    /// control_socket` (restart or upgrade without disconnecting anyone).
    #[arg(long)]
    takeover: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration and exit (non-zero, naming the bad key, if it is invalid).
    Check,
    /// Start a throwaway PostgreSQL and front it with pgtether; Ctrl-C removes everything.
    Demo,
}

const EXAMPLE_CONFIG: &str = include_str!("../config/pgtether.toml");

fn main() -> ExitCode {
    let cli = Cli::parse();
    raise_fd_limit();
    match cli.command {
        Some(Command::Check) => check(cli.config.as_deref()),
        Some(Command::Demo) => demo(cli.config.as_deref(), cli.log_format),
        None => serve(cli.config.as_deref(), cli.log_format, cli.takeover),
    }
}

/// Every client costs a file descriptor: raise the soft limit to the hard one, as servers
/// that hold many connections do.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn load(path: Option<&Path>) -> Result<Config, String> {
    let path = path.ok_or("no configuration given: pass --config FILE or set PGTETHER_CONFIG")?;
    Config::load(path).map_err(|e| e.to_string())
}

fn check(path: Option<&Path>) -> ExitCode {
    match load(path) {
        Ok(c) => {
            println!(
                "configuration is valid: {} database(s), {} user(s), listening on {}",
                c.databases.len(),
                c.users.len(),
                c.listen.addr
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pgtether: invalid configuration: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config, flag: Option<Format>) {
    let format = match flag {
        Some(Format::Json) => LogFormat::Json,
        Some(Format::Text) => LogFormat::Text,
        None => config.log.format,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// One worker thread is tokio's current-thread runtime: the same single thread, without the
/// multi-thread scheduler's queues, work-stealing checks and per-park statistics (4% fewer
/// instructions per transaction). With more, `per-thread` gives each thread a current-thread
/// runtime of its own (this one is worker 0; see `pgtether::workers`), `work-stealing` shares
/// one multi-thread runtime among them.
fn runtime(config: &Config) -> tokio::runtime::Runtime {
    let threads = config.runtime.threads();
    let mut builder = match config.runtime.scheduler {
        _ if threads == 1 => tokio::runtime::Builder::new_current_thread(),
        Scheduler::PerThread => {
            pgtether::workers::start(threads).expect("the worker threads start");
            tokio::runtime::Builder::new_current_thread()
        }
        Scheduler::WorkStealing => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(threads);
            b
        }
    };
    builder
        .enable_all()
        .build()
        .expect("the tokio runtime starts")
}

fn serve(path: Option<&Path>, flag: Option<Format>, takeover: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgtether: {e}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(&config, flag);
    runtime(&config).block_on(async {
        let started = if takeover {
            take::takeover(config).await.map_err(|e| e.to_string())
        } else {
            match control::check_not_running(&config) {
                Err(e) => Err(e.to_string()),
                Ok(()) => listener::start(config)
                    .await
                    .map_err(|e| format!("cannot listen: {e}")),
            }
        };
        let app = match started {
            Ok((app, _)) => app,
            Err(e) => {
                eprintln!("pgtether: {e}");
                return ExitCode::FAILURE;
            }
        };
        // After a takeover the control socket is taken once the old process is done.
        let control = if takeover {
            Ok(())
        } else {
            control::listen(&app)
        };
        if let Err(e) = control.and_then(|()| control::listen_peer(&app)) {
            eprintln!("pgtether: cannot listen on the control socket: {e}");
            return ExitCode::FAILURE;
        }
        if let Some(path) = path {
            pgtether::reload::install(&app, path.to_path_buf());
        }
        listener::reexec_on_usr2(&app);
        let how = listener::shutdown_signal().await;
        listener::stop(app, how).await
    })
}

fn demo(path: Option<&Path>, flag: Option<Format>) -> ExitCode {
    let parsed = match path {
        Some(p) => Config::load(p).map_err(|e| e.to_string()),
        None => Config::parse(EXAMPLE_CONFIG, "config/pgtether.toml (built in)")
            .map_err(|e| e.to_string()),
    };
    let mut config = match parsed {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgtether: {e}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(&config, flag);
    eprintln!("starting a throwaway PostgreSQL …");
    let pg = match EmbeddedPostgres::start(&Setup::default()) {
        Ok(pg) => pg,
        Err(e) => {
            eprintln!("pgtether demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    for db in config.databases.values_mut() {
        db.host = "127.0.0.1".into();
        db.port = pg.port;
    }
    let code = runtime(&config).block_on(async {
        match listener::start(config).await {
            Ok((_, bound)) => {
                println!("pgtether demo is running (PostgreSQL on port {}).", pg.port);
                println!(
                    "  connect: psql \"postgres://app:app@{}/app\"",
                    bound.listen
                );
                if let Some(http) = bound.http {
                    println!("  metrics: http://{http}/metrics");
                }
                println!(
                    "Press Ctrl-C to stop; the throwaway PostgreSQL and its files are removed."
                );
                listener::shutdown_signal().await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pgtether: cannot listen: {e}");
                ExitCode::FAILURE
            }
        }
    });
    drop(pg);
    eprintln!("demo stopped; throwaway PostgreSQL removed");
    code
}
