//! `cargo xtask`: the project's own commands (the cargo-xtask pattern), so
//! that building, testing, benchmarking and demonstrating hb is one
//! command each on a fresh machine. See README.md.

mod bench;
mod demo;
mod setup;
mod test;
mod util;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "hb's build, test, benchmark and demo commands"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build and the tests need (idempotent).
    Setup,
    /// Build the `hb` binary with the eBPF object embedded.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, then run `hb ARGS` (as root for the monitor).
    Run {
        #[arg(long)]
        release: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, then run every test; fails if any test was skipped.
    Test(test::Args),
    /// Run benchmarks; with no names, all of them into BENCHMARKS.md.
    Bench(bench::Args),
    /// A monitor and five nodes in namespaces: join, crash, leave, restart.
    Demo(demo::Args),
}

/// Builds `hb` and returns the binary's path. Setup first (a no-op once
/// done): the build needs the nightly's rust-src and bpf-linker, and on a
/// fresh machine it failed deep in the eBPF build script instead.
pub fn build(release: bool) -> anyhow::Result<PathBuf> {
    setup::run()?;
    let mut cmd = util::cargo();
    cmd.args(["build", "-p", "hb-user", "--bin", "hb"]);
    if release {
        cmd.arg("--release");
    }
    util::run(&mut cmd)?;
    let bin = util::target_dir()
        .join(if release { "release" } else { "debug" })
        .join("hb");
    anyhow::ensure!(
        bin.exists(),
        "cargo built hb but {} is missing",
        bin.display()
    );
    Ok(bin)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = util::install_signal_handler() {
        eprintln!("xtask: {e:#}");
        return ExitCode::FAILURE;
    }
    let result = match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::Build { release } => build(release).map(|bin| println!("{}", bin.display())),
        Cmd::Run { release, args } => {
            let args: Vec<String> = match args.first().map(String::as_str) {
                Some("--") => args[1..].to_vec(),
                _ => args,
            };
            // hb's own exit code is the answer; hb already said what went
            // wrong.
            match build(release).and_then(|bin| {
                let mut child = util::spawn_fg(std::process::Command::new(bin).args(args))?;
                util::wait_fg(&mut child)
            }) {
                Ok(st) => return ExitCode::from(st.code().map_or(1, |c| c as u8)),
                Err(e) => Err(e),
            }
        }
        Cmd::Test(a) => test::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Demo(a) => demo::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
