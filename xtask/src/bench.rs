//! `cargo xtask bench [NAME]...`: runs the benchmark binaries of the
//! `hb-tests` crate (`bench_<name>`), each of which prints one markdown
//! section on stdout. With no names, runs all that exist and writes
//! `BENCHMARKS.md`: the machine, the commands, and every section, so each
//! number in it comes with the command that reproduces it.

use std::{process::Stdio, time::Instant};

use anyhow::{Context as _, bail};

use crate::util::{self, output};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bench {
    Dataplane,
    Monitor,
    Controller,
    Eval,
    E2e,
}

impl Bench {
    const ALL: [Bench; 5] = [
        Bench::Dataplane,
        Bench::Monitor,
        Bench::Controller,
        Bench::Eval,
        Bench::E2e,
    ];

    fn name(self) -> &'static str {
        match self {
            Bench::Dataplane => "dataplane",
            Bench::Monitor => "monitor",
            Bench::Controller => "controller",
            Bench::Eval => "eval",
            Bench::E2e => "e2e",
        }
    }

    fn bin(self) -> String {
        format!("bench_{}", self.name())
    }

    fn command(self) -> String {
        format!("cargo run --release -p hb-tests --bin {}", self.bin())
    }

    /// Whether the `hb-tests` crate has this benchmark binary (the
    /// conventional `src/bin/` file, or a `[[bin]]` entry).
    fn exists(self) -> bool {
        let tests = util::root().join("tests");
        let bin = self.bin();
        tests.join(format!("src/bin/{bin}.rs")).exists()
            || tests.join(format!("src/bin/{bin}/main.rs")).exists()
            || std::fs::read_to_string(tests.join("Cargo.toml"))
                .is_ok_and(|m| m.contains(&format!("name = \"{bin}\"")))
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Benchmarks to run; none: all that exist, and write BENCHMARKS.md.
    #[arg(value_enum)]
    pub names: Vec<Bench>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let write_file = args.names.is_empty();
    let names = if write_file {
        Bench::ALL.to_vec()
    } else {
        args.names
    };
    util::sweep_test_leftovers("before the benchmarks");
    let result = run_all(&names);
    util::sweep_test_leftovers("after the benchmarks");
    let sections = result?;
    if sections.is_empty() {
        bail!("no benchmark binary exists yet");
    }
    if write_file {
        let path = util::root().join("BENCHMARKS.md");
        std::fs::write(&path, report(&sections)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("xtask bench: wrote {}", path.display());
    }
    Ok(())
}

/// Runs each benchmark; returns `(bench, its markdown)` for those that
/// exist.
fn run_all(names: &[Bench]) -> anyhow::Result<Vec<(Bench, String)>> {
    let mut sections = Vec::new();
    for &b in names {
        if !b.exists() {
            eprintln!(
                "xtask bench: {}: skipped, tests/src/bin/{}.rs does not exist yet",
                b.name(),
                b.bin()
            );
            continue;
        }
        eprintln!("xtask bench: {}: {}", b.name(), b.command());
        let t = Instant::now();
        let mut cmd = util::cargo();
        cmd.args(["run", "--release", "-p", "hb-tests", "--bin", &b.bin()])
            .stdout(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = util::spawn_fg(&mut cmd)?;
        let mut md = String::new();
        std::io::Read::read_to_string(child.stdout.as_mut().context("no stdout pipe")?, &mut md)
            .context("reading the benchmark's output")?;
        let status = util::wait_fg(&mut child)?;
        if util::interrupted() {
            bail!("interrupted");
        }
        if !status.success() {
            bail!(
                "benchmark {} failed ({status}); BENCHMARKS.md not written. Rerun: {}",
                b.name(),
                b.command()
            );
        }
        print!("{md}");
        eprintln!(
            "xtask bench: {}: done in {:.0}s",
            b.name(),
            t.elapsed().as_secs_f64()
        );
        sections.push((b, md));
    }
    Ok(sections)
}

fn report(sections: &[(Bench, String)]) -> anyhow::Result<String> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = output(std::process::Command::new("uname").arg("-r"))?;
    let rustc = output(std::process::Command::new("rustc").arg("--version"))?;
    let commit = output(
        std::process::Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .current_dir(util::root()),
    )
    .unwrap_or_else(|_| "unknown".into());
    let mut s = String::new();
    s.push_str("# hb benchmarks\n\n");
    s.push_str("Generated by `cargo xtask bench` (as root). Every number below was measured\n");
    s.push_str("in this run on this machine; ratios compare against a baseline measured in\n");
    s.push_str("the same run.\n\n");
    s.push_str("## Machine\n\n");
    s.push_str(&format!("- CPU: {cpu}\n- cores: {cores}\n"));
    s.push_str(&format!(
        "- kernel: {}\n- rustc: {}\n",
        kernel.trim(),
        rustc.trim()
    ));
    s.push_str(&format!("- commit: {}\n\n", commit.trim()));
    s.push_str("## Commands\n\n```sh\n");
    for (b, _) in sections {
        s.push_str(&format!(
            "{}   # cargo xtask bench {}\n",
            b.command(),
            b.name()
        ));
    }
    s.push_str("```\n\n");
    for (_, md) in sections {
        s.push_str(md.trim_end());
        s.push_str("\n\n");
    }
    Ok(s)
}
