//! `hb`: one binary for every role.
//!
//! `hb send` runs on every node, `hb monitor` on the monitor host; the rest
//! are tools around them (keys, the running monitor's table, the
//! controller's table, simulation and evaluation). Each subcommand lives in
//! its own module; this file only parses options, sets up logging and
//! dispatches.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "hb",
    version,
    about = "Kernel-accelerated heartbeat failure detector"
)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info`, `hb=debug`.
    #[arg(long, global = true, env = "HB_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the monitor: attach the XDP gate and decide which nodes are alive.
    Monitor(hb::monitor::Args),
    /// Send authenticated heartbeats to one or more monitors.
    Send(hb::send::Args),
    /// Create a master secret or derive node keys.
    #[command(subcommand)]
    Keys(hb::keys::Cmd),
    /// Print the running monitor's node table.
    Nodes(hb::nodes::Args),
    /// Inspect the heartbeat-interval controller.
    #[command(subcommand)]
    Controller(hb::controller::Cmd),
    /// Simulate a fleet, a network and the monitor, faster than real time.
    Simulate(hb::simulate::Args),
    /// Replay arrival traces through failure detectors and score them.
    Eval(hb::eval::Args),
}

fn main() -> ExitCode {
    // The monitor reloads on SIGHUP: one sent right after the start (a
    // `systemctl reload` racing it) must not end the process before its
    // handler is installed. Other commands keep the default.
    let inherited = hb::monitor::set_sighup_blocked(true);
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Monitor(_)) {
        hb::monitor::set_sighup_blocked(inherited);
    }
    hb::logging::init(&cli.log);
    let result = match cli.cmd {
        Cmd::Monitor(a) => hb::monitor::run(a),
        Cmd::Send(a) => hb::send::run(a),
        Cmd::Keys(c) => hb::keys::run(c),
        Cmd::Nodes(a) => hb::nodes::run(a),
        Cmd::Controller(c) => hb::controller::run(c),
        Cmd::Simulate(a) => hb::simulate::run(a),
        Cmd::Eval(a) => hb::eval::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One clear line (with its causes), no backtrace.
            eprintln!("hb: {e:#}");
            ExitCode::FAILURE
        }
    }
}
