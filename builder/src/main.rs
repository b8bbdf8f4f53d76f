//! imgbuild: the command line over the `imgbuild` library: bake role images, `init` a cluster's
//! state, manage tokens, make payloads, `serve` enrollment and list `nodes`.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use imgbuild::cli::{Cli, Command};
use imgbuild::commands;

fn main() -> ExitCode {
    let cli = Cli::parse();
    proto::tls::install_default_provider();
    if cli.command.is_some() && !cli.bake.role.is_empty() {
        eprintln!("imgbuild: error: --role bakes an image; it does not go with a subcommand");
        return ExitCode::from(2);
    }
    let level = match cli.global.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    // Log lines print above the progress bars of long work, not through them.
    let progress = imgbuild::progress::install(imgbuild::progress::Progress::detect());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("IMGBUILD_LOG").unwrap_or_else(|_| level.into()))
        .with_writer(progress.clone())
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    let result = match &cli.command {
        Some(Command::Init(a)) => commands::init(&cli.global, a),
        Some(Command::Validate(a)) => commands::validate(a),
        Some(Command::Token(c)) => commands::token(&cli.global, c),
        Some(Command::Serve(a)) => commands::serve(&cli.global, a),
        Some(Command::Payload(a)) => commands::payload(&cli.global, a),
        Some(Command::Lock(a)) => commands::lock(a),
        Some(Command::Fetch(a)) => commands::fetch(a),
        Some(Command::Nodes(a)) => commands::nodes(&cli.global, a),
        Some(Command::Pxe(imgbuild::cli::PxeCommand::Dnsmasq(a))) => commands::pxe_dnsmasq(&cli.global, a),
        None if !cli.bake.role.is_empty() => commands::bake(&cli.global, &cli.bake),
        None => Err(anyhow::anyhow!("nothing to do: give --role ROLE to bake an image, or a subcommand (see --help)")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("imgbuild: error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(commands::exit_code(&e))
        }
    }
}
