//! `cargo xtask test`: setup, then every test of the workspace, and a
//! verdict that cannot be fooled by a skipped test.
//!
//! Namespace and BPF tests need root and leave kernel objects behind when a
//! run is killed; this command deletes leftover `hbt-*` namespaces and
//! `/sys/fs/bpf/hb-test-*` pins before and after the run, also when tests
//! fail or the run is interrupted, and kills the `hb` processes the tests
//! left running (found by a mark in their environment). Anything left after a run whose tests all passed fails
//! the run: a test's cleanup is broken. It parses every `test result:` line:
//! any ignored test fails the run (CI must never pass with kernel tests
//! silently skipped), and the last line sums all test binaries.
//!
//! The namespace tests run the `hb` binary they find next to themselves
//! (`hb_tests::drive::hb_bin`), and cargo builds it only for hb-user's own
//! tests: `-p hb-tests` alone would test whatever stale `hb` an earlier
//! build left. So the binary is built first, with the profile and target
//! options given for the tests.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::Stdio,
};

use anyhow::{Context as _, bail};

use crate::util;

/// Test threads per test binary: the namespace tests mostly wait on
/// timers and sockets, but BPF loads and builds compete for the 2 cores of
/// a CI machine. Override with `HB_TEST_THREADS`.
const DEFAULT_TEST_THREADS: &str = "2";

/// How long `cargo test` may take, build included, before its process
/// group is killed and the run fails (minutes; `HB_TEST_DEADLINE_MIN`).
/// A fresh CI run takes under 5 minutes of a 90-minute budget: a hung test
/// must fail the run with its name and its leftovers swept, not time the
/// whole job out.
const DEFAULT_DEADLINE_MIN: u64 = 45;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Skip `cargo xtask setup` (for quick reruns on a prepared machine).
    #[arg(long)]
    pub no_setup: bool,
    /// Extra arguments for `cargo test` (e.g. `-p hb-tests --test sender`);
    /// after `--`, arguments for the test binaries.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// Totals over all `test result:` lines.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub binaries: u32,
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl Totals {
    /// Folds one line of `cargo test` output in, if it is a result line:
    /// `test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; 0
    /// filtered out; finished in 0.01s`.
    pub fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim_start().strip_prefix("test result: ") else {
            return;
        };
        self.binaries += 1;
        let rest = rest.split_once(". ").map_or(rest, |(_, r)| r);
        for part in rest.split(';') {
            let mut it = part.split_whitespace();
            let (Some(n), Some(what)) = (it.next(), it.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.no_setup {
        crate::setup::run()?;
    }
    util::sweep_test_leftovers("before the tests");
    // Marks every process the tests start, to find those they leave.
    let run = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    // clap drops a `--` that comes first (`cargo xtask test --
    // --nocapture` gave `--nocapture` to cargo, which refused it): split
    // the command line as typed.
    let typed: Vec<String> = std::env::args().collect();
    let (cargo_args, test_args) = split_args(&typed).unwrap_or((args.args, Vec::new()));
    let mut leaked = Vec::new();
    let result = run_tests(&cargo_args, &test_args, &run, &mut leaked);
    leaked.extend(util::kill_marked_hb_processes(&run));
    if !leaked.is_empty() {
        eprintln!(
            "xtask: after the tests: killed {} hb process(es) the tests left running: {}",
            leaked.len(),
            leaked.join("; ")
        );
    }
    let swept = util::sweep_test_leftovers("after the tests");
    if util::interrupted() {
        bail!("interrupted");
    }
    let totals = result?;
    println!(
        "xtask: {} passed, {} failed{}",
        totals.passed,
        totals.failed,
        if totals.ignored > 0 {
            format!(", {} ignored", totals.ignored)
        } else {
            String::new()
        }
    );
    if totals.failed > 0 {
        bail!("{} test(s) failed", totals.failed);
    }
    if totals.ignored > 0 {
        bail!(
            "{} test(s) were ignored: every test must run (no #[ignore], no skips)",
            totals.ignored
        );
    }
    if totals.binaries == 0 || totals.passed == 0 {
        bail!("no tests ran");
    }
    // Every test cleans up after itself, also when it fails: what is left
    // after a passing run is a broken cleanup, which would pile up on a
    // developer's machine (namespaces, pins holding maps, monitors
    // attached to veths). It was removed above; the run still fails.
    if swept > 0 || !leaked.is_empty() {
        bail!(
            "the tests passed but left {} namespace(s) or pin(s) and {} process(es) behind \
             (listed above): a test's cleanup is broken",
            swept,
            leaked.len()
        );
    }
    Ok(())
}

/// The arguments after `test` in `argv` (the xtask's own command line),
/// without `--no-setup`, split at the first `--` into those for cargo and
/// those for the test binaries. `None` without a `test` argument.
fn split_args(argv: &[String]) -> Option<(Vec<String>, Vec<String>)> {
    let at = argv.iter().skip(1).position(|a| a == "test")? + 2;
    let mut rest = &argv[at..];
    if rest.first().is_some_and(|a| a == "--no-setup") {
        rest = &rest[1..];
    }
    Some(match rest.iter().position(|a| a == "--") {
        Some(i) => (rest[..i].to_vec(), rest[i + 1..].to_vec()),
        None => (rest.to_vec(), Vec::new()),
    })
}

/// Options of `cargo test` that decide where and how the binaries are
/// built, so that `cargo build` puts `hb` where the test binaries look for
/// it, built the same way; those of the first set take a value.
const BUILD_OPTIONS_WITH_VALUE: &[&str] = &["--profile", "--target", "--target-dir", "--config"];
const BUILD_FLAGS: &[&str] = &["--release", "-r", "--locked", "--frozen", "--offline"];

/// The options in `cargo_args` (for `cargo test`) that `cargo build` of
/// `hb` needs too, in order, values included.
fn build_options(cargo_args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = cargo_args.iter();
    while let Some(a) = it.next() {
        if BUILD_FLAGS.contains(&a.as_str()) {
            out.push(a.clone());
        } else if BUILD_OPTIONS_WITH_VALUE.contains(&a.as_str()) {
            out.push(a.clone());
            out.extend(it.next().cloned());
        } else if BUILD_OPTIONS_WITH_VALUE
            .iter()
            .any(|o| a.strip_prefix(o).is_some_and(|v| v.starts_with('=')))
            || a.starts_with("-Z")
        {
            out.push(a.clone());
            if a == "-Z" {
                out.extend(it.next().cloned());
            }
        }
    }
    out
}

/// `cargo build -p hb-user --bin hb` with the tests' build options.
fn build_hb(cargo_args: &[String]) -> anyhow::Result<()> {
    let mut cmd = util::cargo();
    cmd.args(["build", "-p", "hb-user", "--bin", "hb"])
        .args(build_options(cargo_args));
    eprintln!("xtask: {}", util::show(&cmd));
    util::run(&mut cmd).context("cannot build the hb binary the tests run")
}

/// Runs the tests; the `hb` processes they left running go to `leaked`.
fn run_tests(
    cargo_args: &[String],
    test_args: &[String],
    run: &str,
    leaked: &mut Vec<String>,
) -> anyhow::Result<Totals> {
    build_hb(cargo_args)?;
    let mut cmd = util::cargo();
    cmd.args(["test", "--no-fail-fast"]);
    if !cargo_args
        .iter()
        .any(|a| a == "-p" || a.starts_with("--package"))
    {
        // hb-ebpf builds for bpfel-unknown-none only (hb-user's build
        // script builds it); as a host test binary it cannot even link.
        cmd.args(["--workspace", "--exclude", "hb-ebpf"]);
    }
    cmd.args(cargo_args).arg("--").args(test_args);
    cmd.env(util::RUN_MARK, run);
    if !test_args.iter().any(|a| a.starts_with("--test-threads")) {
        let n = std::env::var("HB_TEST_THREADS").unwrap_or_else(|_| DEFAULT_TEST_THREADS.into());
        cmd.arg(format!("--test-threads={n}"));
    }
    eprintln!("xtask: {}", util::show(&cmd));
    cmd.stdout(Stdio::piped()).stdin(Stdio::null());
    let deadline = deadline()?;
    let mut child = util::spawn_fg(&mut cmd)?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let watchdog = util::Watchdog::start(child.id(), deadline);
    let mut totals = Totals::default();
    let mut out = std::io::stdout().lock();
    // Lossily: a test's captured output may hold any bytes, and an error
    // here returned before cargo was waited for (the sweep then ran while
    // test binaries still lived, and the real failure was hidden).
    let mut reader = BufReader::new(stdout);
    let mut raw = Vec::new();
    let mut read_error = None;
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw) {
            Ok(0) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&raw);
                let line = line.trim_end_matches(['\n', '\r']);
                totals.add_line(line);
                let _ = writeln!(out, "{line}");
            }
            Err(e) => {
                read_error = Some(e);
                break;
            }
        }
    }
    drop(out);
    // Before `wait_fg`, which kills the group the tests' processes are in.
    leaked.extend(util::left_marked_hb_processes(
        run,
        std::time::Duration::from_secs(5),
    ));
    let status = util::wait_fg(&mut child)?;
    if watchdog.fired() {
        bail!(
            "`cargo test` ran past its deadline of {} min and was killed \
             (the last test binary started is named above; HB_TEST_DEADLINE_MIN sets the deadline)",
            deadline.as_secs() / 60
        );
    }
    if let Some(e) = read_error {
        bail!("cannot read cargo test's output ({e}): its results are unknown");
    }
    if !status.success() && totals.failed == 0 {
        // A build failure or a crashed test binary: no result line says so.
        bail!("`cargo test` failed ({status}) before reporting failed tests");
    }
    Ok(totals)
}

/// The deadline of `cargo test`: `HB_TEST_DEADLINE_MIN` or the default.
fn deadline() -> anyhow::Result<std::time::Duration> {
    let min = match std::env::var("HB_TEST_DEADLINE_MIN") {
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|&m| m > 0)
            .with_context(|| {
                format!("HB_TEST_DEADLINE_MIN={v:?}: want a whole number of minutes > 0")
            })?,
        Err(_) => DEFAULT_DEADLINE_MIN,
    };
    Ok(std::time::Duration::from_secs(min.saturating_mul(60)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_and_test_binary_arguments_split_at_the_double_dash() {
        let split = |s: &str| {
            let argv: Vec<String> = s.split(' ').map(String::from).collect();
            let (c, t) = split_args(&argv).unwrap();
            (c.join(" "), t.join(" "))
        };
        let s = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(split("xtask test -- --nocapture"), s("", "--nocapture"));
        assert_eq!(
            split("xtask test --no-setup -p hb-tests --test gate -- --nocapture race"),
            s("-p hb-tests --test gate", "--nocapture race")
        );
        assert_eq!(split("xtask test --release"), s("--release", ""));
        assert_eq!(split("xtask test"), s("", ""));
    }

    #[test]
    fn hb_is_built_with_the_tests_profile_and_target() {
        let opts = |s: &str| {
            let args: Vec<String> = s.split_whitespace().map(String::from).collect();
            build_options(&args).join(" ")
        };
        assert_eq!(opts("-p hb-tests --test sender"), "");
        assert_eq!(opts("-p hb-tests --release --test sender"), "--release");
        assert_eq!(opts("-r"), "-r");
        assert_eq!(
            opts("--profile bench -p hb-tests --target-dir /tmp/t --features x"),
            "--profile bench --target-dir /tmp/t"
        );
        assert_eq!(
            opts("--profile=release --target=x86_64-unknown-linux-gnu --locked"),
            "--profile=release --target=x86_64-unknown-linux-gnu --locked"
        );
        assert_eq!(
            opts("-Z unstable-options -Zbuild-std --config a=1"),
            "-Z unstable-options -Zbuild-std --config a=1"
        );
        // `--test x` is not `--target`, `--profiles` is not `--profile`.
        assert_eq!(opts("--test target --profiles"), "");
    }

    #[test]
    fn result_lines_are_summed() {
        let mut t = Totals::default();
        for l in [
            "running 3 tests",
            "test a ... ok",
            "test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s",
            "test result: FAILED. 4 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1.20s",
            "   Doc-tests hb",
            "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s",
        ] {
            t.add_line(l);
        }
        assert_eq!(
            t,
            Totals {
                binaries: 3,
                passed: 7,
                failed: 2,
                ignored: 1
            }
        );
    }
}
