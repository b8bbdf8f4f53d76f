//! firstboot: run once at a node's first boot by `firstboot.service`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use firstboot::agent::host::{RealHost, Recorder};
use firstboot::agent::systemd::Dbus;
use firstboot::agent::{Agent, Options, Outcome};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Provisions this machine as a Kubernetes node: identify, enroll with imgbuild serve, fetch its
/// role config and certificates, apply them, start services, join, and report every phase.
///
/// Exit codes: 0 provisioned (or already was), 1 a phase failed (the unit is retried), 2 usage.
#[derive(Parser)]
#[command(name = "firstboot", version, max_term_width = 80)]
struct Cli {
    /// Act on this tree instead of / (tests)
    #[arg(long, default_value = "/", value_name = "DIR")]
    root: PathBuf,
    /// Use this payload file before any other source
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Give up after this many seconds
    #[arg(long, default_value_t = 1800, value_name = "SECONDS")]
    deadline: u64,
    /// Record host and systemd effects in <root>/var/lib/firstboot/effects.log instead of
    /// performing them (tests)
    #[arg(long)]
    simulate: bool,
    /// Skip the join phase (tests without a cluster)
    #[arg(long)]
    no_join: bool,
    /// More log output
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

fn init_logging(verbose: u8) {
    let level = if verbose > 0 { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("FIRSTBOOT_LOG").unwrap_or_else(|_| level.into());
    let registry = tracing_subscriber::registry().with(filter);
    // On a node the journal; elsewhere (tests, a shell) stderr.
    match tracing_journald::layer() {
        Ok(journald) if std::env::var_os("JOURNAL_STREAM").is_some() => {
            registry.with(journald.with_syslog_identifier("firstboot".into())).init()
        }
        _ => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_target(false),
            )
            .init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    proto::tls::install_default_provider();
    init_logging(cli.verbose);
    let mut opts = Options::new(&cli.root);
    opts.config = cli.config;
    opts.deadline = Duration::from_secs(cli.deadline);
    opts.join = !cli.no_join;
    opts.console = true;
    opts.crash = std::env::var("FIRSTBOOT_CRASH").ok().and_then(|c| firstboot::agent::Crash::parse(&c));
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("firstboot: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        if cli.simulate {
            let log = proto::paths::under(&cli.root, proto::paths::STATE_DIR).join("effects.log");
            #[expect(clippy::expect_used, reason = "a file joined onto a directory has a parent")]
            let _ = std::fs::create_dir_all(log.parent().expect("has parent"));
            let rec = || Recorder { effects: vec![], log: Some(log.clone()) };
            Agent::new(opts, rec(), rec())?.run().await
        } else {
            let systemd = Dbus::connect().await?;
            Agent::new(opts, RealHost { root: cli.root.clone() }, systemd)?.run().await
        }
    });
    // The final status line goes to stdout: the unit sends it to the console and the journal.
    match result {
        Ok(Outcome::Provisioned { node, message }) => {
            println!("firstboot: SUCCESS: {node}: {message}");
            ExitCode::SUCCESS
        }
        Ok(Outcome::AlreadyProvisioned { node, message }) => {
            println!("firstboot: SUCCESS: {node}: {message}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("firstboot: FAILED: {e}");
            ExitCode::from(1)
        }
    }
}
