//! `cargo xtask test`: setup, then every test of the workspace, and a
//! verdict that cannot be fooled by a skipped test or a test binary that
//! ran nothing.
//!
//! Namespace and BPF tests need root and leave kernel objects behind when a
//! run is killed; this command deletes leftover `hbt-*` namespaces and
//! `/sys/fs/bpf/hb-test-*` pins before and after the run, also when tests
//! fail or the run is interrupted, and kills the `hb` processes the tests
//! left running (found by a mark in their environment) and any process left
//! holding a test binary's stdout once it exited (which kept the run
//! waiting). Anything left after a run whose tests all passed fails the
//! run: a test's cleanup is broken.
//!
//! It does not leave running the tests to `cargo test`: cargo's `Running`
//! lines go to stderr and the results to stdout, and no reading of the two
//! can say which results are whose. So it builds them with `cargo test
//! --no-run --message-format=json`, takes each test executable from cargo's
//! `compiler-artifact` messages, and runs each itself as cargo would (in its
//! package's directory, with its package's variables), then `cargo test
//! --doc` for each tested library. It reads each one's `test result:` line
//! and prints one line per binary, `xtask: hb-tests tests/gate.rs: 37
//! passed, 0 failed` (`.ci/run` requires tests passed in each binary it
//! names), then the sum, `xtask: N passed, 0 failed`. A binary that fails
//! without a failed test (a crash, a signal, no result line) fails the run
//! by name, and so does any ignored test (CI must never pass with kernel
//! tests silently skipped).
//!
//! The namespace tests run the `hb` binary they find next to themselves
//! (`hb_tests::drive::hb_bin`), and cargo builds it only for hb-user's own
//! tests: `-p hb-tests` alone would test whatever stale `hb` an earlier
//! build left. So the binary is built first, with the profile and target
//! options given for the tests.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::util;

/// Test threads per test binary: the namespace tests mostly wait on
/// timers and sockets, but BPF loads and builds compete for the 2 cores of
/// a CI machine. Override with `HB_TEST_THREADS`.
const DEFAULT_TEST_THREADS: &str = "2";

/// How long the tests may take, from the start of the build of `hb` (the
/// tests' build and the doc-tests included), before the process group
/// running then is killed and the run fails (minutes;
/// `HB_TEST_DEADLINE_MIN`).
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

/// The counts of one test binary's `test result:` line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl Counts {
    /// The counts of libtest's result line, `test result: ok. 5 passed; 0
    /// failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s`;
    /// `None` for any other line.
    pub fn parse(line: &str) -> Option<Counts> {
        let rest = line.trim_start().strip_prefix("test result: ")?;
        let rest = rest.split_once(". ").map_or(rest, |(_, r)| r);
        let mut c = Counts::default();
        for part in rest.split(';') {
            let mut it = part.split_whitespace();
            let (Some(n), Some(what)) = (it.next(), it.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => c.passed += n,
                "failed" => c.failed += n,
                "ignored" => c.ignored += n,
                _ => {}
            }
        }
        Some(c)
    }
}

/// `N passed, M failed[, K ignored]`, as the per-binary lines and the
/// summary print them (`.ci/run` reads both).
impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} passed, {} failed", self.passed, self.failed)?;
        if self.ignored > 0 {
            write!(f, ", {} ignored", self.ignored)?;
        }
        Ok(())
    }
}

/// The counts of the last `test result:` line of a binary's output, given
/// those of the lines before `line` (libtest prints its line last; a test's
/// own output, with `--nocapture`, may hold one before).
fn last_result(before: Option<Counts>, line: &str) -> Option<Counts> {
    Counts::parse(line).or(before)
}

/// Totals over the test binaries that reported.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub binaries: u32,
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl Totals {
    fn add(&mut self, c: Counts) {
        self.binaries += 1;
        self.passed += c.passed;
        self.failed += c.failed;
        self.ignored += c.ignored;
    }
}

/// How one test binary (or one package's doc-tests) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Its `test result:` line, with an exit status that agrees with it.
    Reported(Counts),
    /// It ended without a result line, or failed with no failed test (a
    /// crash, a signal, a doc-test that did not build): how, in words.
    Broken(String),
}

impl Outcome {
    /// The outcome of a binary whose last `test result:` line was `result`
    /// ([`last_result`]) and which exited with `status`.
    fn of(result: Option<Counts>, status: ExitStatus) -> Outcome {
        match result {
            None => Outcome::Broken(format!("no `test result:` line ({status})")),
            Some(c) if !status.success() && c.failed == 0 => Outcome::Broken(format!(
                "{status} after `test result:` with no failed test ({} passed)",
                c.passed
            )),
            Some(c) => Outcome::Reported(c),
        }
    }

    /// The line `cargo xtask test` prints for the binary named `label`
    /// (`.ci/run` reads these).
    fn line(&self, label: &str) -> String {
        match self {
            Outcome::Reported(c) => format!("xtask: {label}: {c}"),
            Outcome::Broken(why) => format!("xtask: {label}: FAILED: {why}"),
        }
    }
}

/// What the test binaries reported, summed, and those that did not.
#[derive(Debug, Default)]
struct Report {
    totals: Totals,
    /// `label: why` of each binary that ended without a clean result.
    broken: Vec<String>,
}

impl Report {
    fn add(&mut self, label: &str, outcome: Outcome) {
        match outcome {
            Outcome::Reported(c) => self.totals.add(c),
            Outcome::Broken(why) => self.broken.push(format!("{label}: {why}")),
        }
    }
}

/// A test executable that `cargo test --no-run` built.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TestBinary {
    package: String,
    version: String,
    manifest_path: PathBuf,
    /// The target's root source file relative to its package
    /// (`tests/gate.rs`, `src/lib.rs`), as cargo's `Running` line names it.
    source: String,
    executable: PathBuf,
}

impl TestBinary {
    /// How the run names it: `hb-tests tests/gate.rs`.
    fn label(&self) -> String {
        format!("{} {}", self.package, self.source)
    }

    fn manifest_dir(&self) -> &Path {
        self.manifest_path.parent().unwrap_or(Path::new("."))
    }

    /// The command that runs it as `cargo test` does: in its package's
    /// directory, with the variables cargo sets for a test at run time.
    /// What hb's tests read of cargo's are compile-time (`env!`:
    /// `CARGO_MANIFEST_DIR`, `CARGO_BIN_EXE_hb`; `CARGO_TARGET_TMPDIR` is
    /// never set at run time); the run-time ones are set all the same, for a
    /// test that reads them, and replace those `cargo run` gave xtask
    /// itself, which the binary would inherit. No `LD_LIBRARY_PATH`: no
    /// package here builds a dynamic library a test could load.
    fn command(&self, args: &[String]) -> Command {
        let mut cmd = Command::new(&self.executable);
        cmd.current_dir(self.manifest_dir()).args(args);
        util::without_run_env(&mut cmd);
        let mut parts = self.version.splitn(2, '-');
        let release = parts.next().unwrap_or("");
        let pre = parts.next().unwrap_or("");
        let mut numbers = release.split('.');
        cmd.env("CARGO_MANIFEST_DIR", self.manifest_dir())
            .env("CARGO_MANIFEST_PATH", &self.manifest_path)
            .env("CARGO_PKG_NAME", &self.package)
            .env("CARGO_PKG_VERSION", &self.version)
            .env("CARGO_PKG_VERSION_MAJOR", numbers.next().unwrap_or(""))
            .env("CARGO_PKG_VERSION_MINOR", numbers.next().unwrap_or(""))
            .env("CARGO_PKG_VERSION_PATCH", numbers.next().unwrap_or(""))
            .env("CARGO_PKG_VERSION_PRE", pre);
        if let Some(cargo) = std::env::var_os("CARGO") {
            cmd.env("CARGO", cargo);
        }
        // The property tests draw the same cases at every run, as the
        // gates' differential test does its seeds: a run fails for what
        // changed, not for a case drawn once in a while (plain `cargo
        // test` draws afresh).
        if std::env::var_os(PROPTEST_RNG_SEED).is_none() {
            cmd.env(PROPTEST_RNG_SEED, PROPTEST_SEED.to_string());
        }
        cmd
    }
}

/// proptest's seed variable, set for the test binaries unless it is set
/// already ([`PROPTEST_SEED`]).
const PROPTEST_RNG_SEED: &str = "PROPTEST_RNG_SEED";

/// The seed of the property tests' cases under `cargo xtask test`.
const PROPTEST_SEED: u64 = 1;

/// What `cargo test --no-run --message-format=json` said it built.
#[derive(Debug, Default, PartialEq, Eq)]
struct Build {
    /// The test executables, by package, then source file.
    binaries: Vec<TestBinary>,
    /// The packages whose library was built for testing and has doc-tests
    /// (`doctest = true`, the default).
    doc_packages: Vec<String>,
}

impl Build {
    /// Reads cargo's messages, one JSON object a line: `compiler-artifact`
    /// messages of the test profile give the test executables and the
    /// tested libraries; other messages are skipped.
    fn from_messages<'a>(lines: impl IntoIterator<Item = &'a str>) -> anyhow::Result<Build> {
        let mut build = Build::default();
        for line in lines {
            let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
                continue;
            }
            build
                .add_artifact(&msg)
                .with_context(|| format!("cannot read cargo's artifact message {line}"))?;
        }
        build
            .binaries
            .sort_by(|a, b| (&a.package, &a.source).cmp(&(&b.package, &b.source)));
        build.binaries.dedup_by(|a, b| a.executable == b.executable);
        build.doc_packages.sort();
        build.doc_packages.dedup();
        Ok(build)
    }

    fn add_artifact(&mut self, msg: &serde_json::Value) -> anyhow::Result<()> {
        let field = |v: &serde_json::Value, name: &str| -> anyhow::Result<String> {
            v[name]
                .as_str()
                .map(String::from)
                .with_context(|| format!("no `{name}`"))
        };
        let target = &msg["target"];
        let (package, version) = package_name_version(&field(msg, "package_id")?)?;
        let manifest_path = PathBuf::from(field(msg, "manifest_path")?);
        let src = PathBuf::from(field(target, "src_path")?);
        let source = manifest_path
            .parent()
            .and_then(|d| src.strip_prefix(d).ok())
            .unwrap_or(&src)
            .display()
            .to_string();
        let is_lib = target["kind"].as_array().is_some_and(|kinds| {
            kinds
                .iter()
                .any(|k| matches!(k.as_str(), Some("lib" | "rlib" | "dylib" | "proc-macro")))
        });
        if is_lib && target["doctest"] == true {
            self.doc_packages.push(package.clone());
        }
        if let Some(exe) = msg["executable"].as_str() {
            self.binaries.push(TestBinary {
                package,
                version,
                manifest_path,
                source,
                executable: PathBuf::from(exe),
            });
        }
        Ok(())
    }
}

/// A package's name and version from cargo's package id: `path+file:///w/
/// tests#hb-tests@0.1.0`, `path+file:///w/hb-user#0.1.0` (the name is the
/// directory's), or the older `hb-tests 0.1.0 (path+file:///w/tests)`.
fn package_name_version(id: &str) -> anyhow::Result<(String, String)> {
    let bad = || format!("cannot read the package id {id:?}");
    if let Some((url, fragment)) = id.split_once('#') {
        return Ok(match fragment.split_once('@') {
            Some((name, version)) => (name.to_string(), version.to_string()),
            None => {
                let name = url
                    .trim_end_matches('/')
                    .rsplit('/')
                    .next()
                    .filter(|n| !n.is_empty() && !n.contains(':'))
                    .with_context(bad)?;
                (name.to_string(), fragment.to_string())
            }
        });
    }
    let mut it = id.split_whitespace();
    match (it.next(), it.next()) {
        (Some(name), Some(version)) => Ok((name.to_string(), version.to_string())),
        _ => bail!("{}", bad()),
    }
}

/// Options of `cargo test` that choose which targets it tests; with none
/// of them it also runs the doc-tests.
const TARGET_SELECTION: &[&str] = &[
    "--lib",
    "--bin",
    "--bins",
    "--example",
    "--examples",
    "--test",
    "--tests",
    "--bench",
    "--benches",
    "--all-targets",
    "--doc",
];

/// Whether `cargo_args` choose targets (so `cargo test` would run no
/// doc-tests unless `--doc` is one of them).
fn selects_targets(cargo_args: &[String]) -> bool {
    cargo_args.iter().any(|a| {
        TARGET_SELECTION
            .iter()
            .any(|o| a == o || a.strip_prefix(o).is_some_and(|v| v.starts_with('=')))
    })
}

/// `cargo_args` without the options that choose packages (`-p`,
/// `--package`, `--workspace`, `--all`, `--exclude`) and without `--doc`:
/// what `cargo test --doc -p PKG` for one package takes of them.
fn without_package_selection(cargo_args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = cargo_args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-p" | "--package" | "--exclude" => {
                it.next();
            }
            "--workspace" | "--all" | "--doc" => {}
            _ if a.starts_with("--package=") || a.starts_with("--exclude=") => {}
            _ if a.starts_with("-p") && a.len() > 2 => {}
            _ => out.push(a.clone()),
        }
    }
    out
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
            "xtask: after the tests: killed {} process(es) the tests left running: {}",
            leaked.len(),
            leaked.join("; ")
        );
    }
    let swept = util::sweep_test_leftovers("after the tests");
    if util::interrupted() {
        bail!("interrupted");
    }
    let Report { totals, broken } = result?;
    let sum = Counts {
        passed: totals.passed,
        failed: totals.failed,
        ignored: totals.ignored,
    };
    println!("xtask: {sum}");
    if totals.failed > 0 || !broken.is_empty() {
        let mut why = Vec::new();
        if totals.failed > 0 {
            why.push(format!("{} test(s) failed", totals.failed));
        }
        if !broken.is_empty() {
            why.push(format!(
                "{} test binar{} ended without a clean result: {}",
                broken.len(),
                if broken.len() == 1 { "y" } else { "ies" },
                broken.join("; ")
            ));
        }
        bail!("{}", why.join("; "));
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

/// `cargo build -p hb-user --bin hb` with the tests' build options, under
/// the session's deadline.
fn build_hb(session: &mut Session, cargo_args: &[String]) -> anyhow::Result<()> {
    let mut cmd = util::cargo();
    cmd.args(["build", "-p", "hb-user", "--bin", "hb"])
        .args(build_options(cargo_args));
    let mut out = std::io::stdout();
    let status = session.watch(&mut cmd, "the hb build", |line| {
        let _ = writeln!(out, "{line}");
    })?;
    if !status.success() {
        bail!(
            "`{}` failed ({status}): cannot build the hb binary the tests run",
            util::show(&cmd)
        );
    }
    Ok(())
}

/// Runs the tests; the processes they left running go to `leaked`.
fn run_tests(
    cargo_args: &[String],
    test_args: &[String],
    run: &str,
    leaked: &mut Vec<String>,
) -> anyhow::Result<Report> {
    // The deadline covers the builds too (a build that hangs, on a lock
    // say, is stopped as a hung test is).
    let limit = deadline()?;
    let mut session = Session {
        run,
        deadline: Instant::now() + limit,
        limit,
        leaked,
    };
    build_hb(&mut session, cargo_args)?;
    let doc_only = cargo_args.iter().any(|a| a == "--doc");
    let build = build_tests(&mut session, cargo_args)?;
    let mut test_args = test_args.to_vec();
    if !test_args.iter().any(|a| a.starts_with("--test-threads")) {
        let n = std::env::var("HB_TEST_THREADS").unwrap_or_else(|_| DEFAULT_TEST_THREADS.into());
        test_args.push(format!("--test-threads={n}"));
    }
    let mut report = Report::default();
    if !doc_only {
        for bin in &build.binaries {
            if util::interrupted() {
                return Ok(report);
            }
            let label = bin.label();
            let outcome = session.run_tests_of(&mut bin.command(&test_args), &label)?;
            report.add(&label, outcome);
        }
    }
    // As `cargo test` does: doc-tests when no targets were chosen, or only
    // them with `--doc`; one package at a time, to know whose they are.
    if doc_only || !selects_targets(cargo_args) {
        for package in &build.doc_packages {
            if util::interrupted() {
                return Ok(report);
            }
            let mut cmd = util::cargo();
            cmd.args(["test", "--doc", "-p", package])
                .args(without_package_selection(cargo_args))
                .arg("--")
                .args(&test_args);
            let label = format!("{package} doc-tests");
            let outcome = session.run_tests_of(&mut cmd, &label)?;
            report.add(&label, outcome);
        }
    }
    Ok(report)
}

/// `cargo test --no-run --message-format=json` with the tests' packages
/// and options: the test executables. With `--doc`, the libraries are
/// built (`--lib`) to learn which packages have doc-tests: cargo cannot
/// build doc-tests without running them.
fn build_tests(session: &mut Session, cargo_args: &[String]) -> anyhow::Result<Build> {
    let mut cmd = util::cargo();
    // Rustc's diagnostics rendered by cargo on stderr as usual; stdout
    // carries only JSON.
    cmd.args([
        "test",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    if !cargo_args
        .iter()
        .any(|a| a == "-p" || a.starts_with("--package"))
    {
        // hb-ebpf builds for bpfel-unknown-none only (hb-user's build
        // script builds it); as a host test binary it cannot even link.
        cmd.args(["--workspace", "--exclude", "hb-ebpf"]);
    }
    cmd.args(
        cargo_args
            .iter()
            .map(|a| if a == "--doc" { "--lib" } else { a.as_str() }),
    );
    let mut messages = Vec::new();
    let status = session.watch(&mut cmd, "the tests' build", |line| {
        messages.push(line.to_string())
    })?;
    if !status.success() {
        bail!("`{}` failed ({status})", util::show(&cmd));
    }
    let build = Build::from_messages(messages.iter().map(String::as_str))?;
    if build.binaries.is_empty() && build.doc_packages.is_empty() {
        bail!(
            "`{}` built no test executable: no tests to run",
            util::show(&cmd)
        );
    }
    Ok(build)
}

/// One test run's processes under one deadline.
struct Session<'a> {
    /// The mark of the run's processes (`util::RUN_MARK`).
    run: &'a str,
    /// When the builds and the runs, together, must have ended.
    deadline: Instant,
    /// The whole time allowed (for messages).
    limit: Duration,
    /// The processes the tests left running: `hb`s, and whatever held a
    /// test binary's stdout after it exited.
    leaked: &'a mut Vec<String>,
}

impl Session<'_> {
    /// Runs a test binary (or `cargo test --doc`), its stdout echoed, and
    /// prints its line (`xtask: LABEL: N passed, 0 failed`).
    fn run_tests_of(&mut self, cmd: &mut Command, label: &str) -> anyhow::Result<Outcome> {
        let mut result = None;
        let mut out = std::io::stdout();
        let status = self.watch(cmd, label, |line| {
            result = last_result(result, line);
            let _ = writeln!(out, "{line}");
        })?;
        let outcome = Outcome::of(result, status);
        println!("{}", outcome.line(label));
        Ok(outcome)
    }

    /// Runs `cmd` (named `label`) in its own process group with the run's
    /// mark, its stdout line by line to `on_line`, killed at the deadline.
    fn watch(
        &mut self,
        cmd: &mut Command,
        label: &str,
        mut on_line: impl FnMut(&str),
    ) -> anyhow::Result<ExitStatus> {
        let minutes = self.limit.as_secs() / 60;
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "the deadline of {minutes} min for the tests passed before {label} could start \
                 (HB_TEST_DEADLINE_MIN sets it)"
            );
        }
        cmd.env(util::RUN_MARK, self.run)
            .stdout(Stdio::piped())
            .stdin(Stdio::null());
        // One write: stderr is unbuffered, and the tests' stdout (shown as
        // it is read) must not land in the middle of the line.
        let _ = std::io::stderr()
            .write_all(format!("xtask: running {label}: {}\n", util::show(cmd)).as_bytes());
        let mut child = util::spawn_fg(cmd)?;
        let watchdog = util::Watchdog::start(child.id(), left);
        // An error here returned before the child was waited for (the
        // sweep then ran while test binaries still lived, and the real
        // failure was hidden).
        let read = util::read_stdout(&mut child, &mut on_line);
        let read = match read {
            Ok(r) => r,
            Err(e) => {
                let _ = util::wait_fg(&mut child);
                return Err(e);
            }
        };
        // A process left holding the binary's stdout is left running: the
        // run fails, naming it.
        if !read.holders.is_empty() {
            eprintln!(
                "xtask: {label}: killed {} process(es) it left running and holding its stdout: {}",
                read.holders.len(),
                read.holders.join("; ")
            );
        }
        self.leaked.extend(
            read.holders
                .iter()
                .map(|h| format!("{h}, holding the stdout of {label}")),
        );
        if read.abandoned {
            self.leaked.push(format!(
                "a process that could not be killed, holding the stdout of {label} (its output \
                 after that is lost)"
            ));
        }
        // Before `wait_fg`, which kills the group the tests' processes are
        // in.
        self.leaked.extend(util::left_marked_hb_processes(
            self.run,
            Duration::from_secs(5),
        ));
        let status = util::wait_fg(&mut child)?;
        if watchdog.fired() {
            bail!(
                "{label} ran past the deadline of {minutes} min for the tests (builds included) \
                 and was killed (HB_TEST_DEADLINE_MIN sets the deadline)"
            );
        }
        if let Some(e) = read.error {
            bail!("cannot read the output of {label} ({e}): its results are unknown");
        }
        Ok(status)
    }
}

/// The time the tests' build and runs may take: `HB_TEST_DEADLINE_MIN` or
/// the default.
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

    /// Recorded libtest output, and how the binary ended.
    fn outcome_of(lines: &[&str], status: ExitStatus) -> Outcome {
        Outcome::of(lines.iter().fold(None, |r, l| last_result(r, l)), status)
    }

    fn exited(code: i32) -> ExitStatus {
        std::os::unix::process::ExitStatusExt::from_raw(code << 8)
    }

    fn killed(signal: i32) -> ExitStatus {
        std::os::unix::process::ExitStatusExt::from_raw(signal)
    }

    /// One line per binary from its own output: what it passed, or why
    /// it has no result. Only a result line with an exit status that
    /// agrees counts.
    #[test]
    fn each_binary_is_judged_by_its_own_result_line_and_exit_status() {
        let l = "hb-tests tests/gate.rs";
        let ok = [
            "",
            "running 2 tests",
            "test acks_are_rate_limited ... ok",
            "test bad_tag_is_dropped ... ok",
            "",
            "test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.31s",
            "",
        ];
        let o = outcome_of(&ok, exited(0));
        assert_eq!(
            o.line(l),
            "xtask: hb-tests tests/gate.rs: 2 passed, 0 failed"
        );

        // A filter that matches nothing here: a clean 0, which `.ci/run`
        // refuses for a required binary.
        let none = [
            "running 0 tests",
            "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 37 filtered out; finished in 0.00s",
        ];
        let o = outcome_of(&none, exited(0));
        assert_eq!(o, Outcome::Reported(Counts::default()));
        assert_eq!(
            o.line(l),
            "xtask: hb-tests tests/gate.rs: 0 passed, 0 failed"
        );

        let failed = [
            "test a ... FAILED",
            "test b ... ignored",
            "test result: FAILED. 4 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1.20s",
        ];
        assert_eq!(
            outcome_of(&failed, exited(101)).line(l),
            "xtask: hb-tests tests/gate.rs: 4 passed, 1 failed, 1 ignored"
        );

        // With --nocapture, a test's own output comes before libtest's
        // line: the last one is the binary's.
        let echoed = [
            "test result: ok. 99 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s",
            "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s",
        ];
        assert_eq!(
            outcome_of(&echoed, exited(0)),
            Outcome::Reported(Counts {
                passed: 1,
                ..Counts::default()
            })
        );

        // Killed mid-run, or a crash: no result line.
        let crashed = ["running 37 tests", "test acks_are_rate_limited ... ok"];
        let o = outcome_of(&crashed, killed(libc::SIGSEGV));
        assert!(
            matches!(&o, Outcome::Broken(w) if w.contains("SIGSEGV")),
            "{o:?}"
        );
        assert!(
            o.line(l)
                .starts_with("xtask: hb-tests tests/gate.rs: FAILED: no `test result:` line")
        );
        // Exits 0 having printed nothing libtest would (a `harness =
        // false` binary, a main that returns early).
        let o = outcome_of(&[], exited(0));
        assert_eq!(
            o,
            Outcome::Broken("no `test result:` line (exit status: 0)".into())
        );
        // All passed, then the process failed (a panicking drop, a
        // guard's abort at exit).
        let o = outcome_of(&ok, exited(1));
        assert!(
            matches!(&o, Outcome::Broken(w) if w.contains("exit status: 1")),
            "{o:?}"
        );
        let o = outcome_of(&ok, killed(libc::SIGABRT));
        assert!(
            matches!(&o, Outcome::Broken(w) if w.contains("SIGABRT")),
            "{o:?}"
        );
    }

    #[test]
    fn the_report_sums_binaries_that_reported_and_names_the_others() {
        let mut r = Report::default();
        r.add(
            "hb-user src/lib.rs",
            Outcome::Reported(Counts {
                passed: 3,
                ..Counts::default()
            }),
        );
        r.add(
            "hb-tests tests/gate.rs",
            Outcome::Reported(Counts {
                passed: 4,
                failed: 2,
                ignored: 1,
            }),
        );
        r.add(
            "hb-tests tests/sender.rs",
            Outcome::Broken("no `test result:` line (signal: 9 (SIGKILL))".into()),
        );
        assert_eq!(
            r.totals,
            Totals {
                binaries: 2,
                passed: 7,
                failed: 2,
                ignored: 1
            }
        );
        assert_eq!(
            r.broken,
            ["hb-tests tests/sender.rs: no `test result:` line (signal: 9 (SIGKILL))"]
        );
    }

    /// Recorded from `cargo test --no-run --message-format=json-render-
    /// diagnostics --workspace --exclude hb-ebpf` (a few of its 271 lines).
    const BUILD_MESSAGES: &[&str] = &[
        r#"{"reason":"compiler-artifact","package_id":"path+file:///work/wt22-ci/hb-common#0.1.0","manifest_path":"/work/wt22-ci/hb-common/Cargo.toml","target":{"kind":["lib"],"crate_types":["lib"],"name":"hb_common","src_path":"/work/wt22-ci/hb-common/src/lib.rs","edition":"2024","doc":true,"doctest":true,"test":true},"profile":{"opt_level":"0","debuginfo":2,"debug_assertions":true,"overflow_checks":true,"test":false},"features":["default","user"],"filenames":["/work/wt22-ci/target/debug/deps/libhb_common-ce0e0b928b46b081.rlib","/work/wt22-ci/target/debug/deps/libhb_common-ce0e0b928b46b081.rmeta"],"executable":null,"fresh":false}"#,
        r#"{"reason":"compiler-artifact","package_id":"path+file:///work/wt22-ci/hb-user#0.1.0","manifest_path":"/work/wt22-ci/hb-user/Cargo.toml","target":{"kind":["custom-build"],"crate_types":["bin"],"name":"build-script-build","src_path":"/work/wt22-ci/hb-user/build.rs","edition":"2024","doc":false,"doctest":false,"test":false},"profile":{"opt_level":"0","debuginfo":0,"debug_assertions":true,"overflow_checks":true,"test":false},"features":[],"filenames":["/work/wt22-ci/target/debug/build/hb-user-6107fcf594bac436/build-script-build"],"executable":null,"fresh":false}"#,
        r#"{"reason":"build-script-executed","package_id":"path+file:///work/wt22-ci/hb-user#0.1.0","linked_libs":[],"linked_paths":[],"cfgs":[],"env":[],"out_dir":"/work/wt22-ci/target/debug/build/hb-user-ebdd1afb7c8fa0bc/out"}"#,
        TESTS_GATE,
        HB_USER_LIB,
        r#"{"reason":"compiler-artifact","package_id":"path+file:///work/wt22-ci/hb-user#0.1.0","manifest_path":"/work/wt22-ci/hb-user/Cargo.toml","target":{"kind":["bin"],"crate_types":["bin"],"name":"hb","src_path":"/work/wt22-ci/hb-user/src/main.rs","edition":"2024","doc":true,"doctest":false,"test":true},"profile":{"opt_level":"0","debuginfo":2,"debug_assertions":true,"overflow_checks":true,"test":true},"features":[],"filenames":["/work/wt22-ci/target/debug/deps/hb-b6a95d46a42f5604"],"executable":"/work/wt22-ci/target/debug/deps/hb-b6a95d46a42f5604","fresh":false}"#,
        // `hb` itself, built for the tests to run: not a test executable.
        r#"{"reason":"compiler-artifact","package_id":"path+file:///work/wt22-ci/hb-user#0.1.0","manifest_path":"/work/wt22-ci/hb-user/Cargo.toml","target":{"kind":["bin"],"crate_types":["bin"],"name":"hb","src_path":"/work/wt22-ci/hb-user/src/main.rs","edition":"2024","doc":true,"doctest":false,"test":true},"profile":{"opt_level":"0","debuginfo":2,"debug_assertions":true,"overflow_checks":true,"test":false},"features":[],"filenames":["/work/wt22-ci/target/debug/hb"],"executable":"/work/wt22-ci/target/debug/hb","fresh":false}"#,
        "not json: cargo's stdout holds only JSON, but nothing breaks on a stray line",
        r#"{"reason":"build-finished","success":true}"#,
    ];
    const TESTS_GATE: &str = r#"{"reason":"compiler-artifact","package_id":"path+file:///work/wt22-ci/tests#hb-tests@0.1.0","manifest_path":"/work/wt22-ci/tests/Cargo.toml","target":{"kind":["test"],"crate_types":["bin"],"name":"gate","src_path":"/work/wt22-ci/tests/tests/gate.rs","edition":"2024","doc":false,"doctest":false,"test":true},"profile":{"opt_level":"0","debuginfo":2,"debug_assertions":true,"overflow_checks":true,"test":true},"features":[],"filenames":["/work/wt22-ci/target/debug/deps/gate-48045cc0c6237b5a"],"executable":"/work/wt22-ci/target/debug/deps/gate-48045cc0c6237b5a","fresh":false}"#;
    const HB_USER_LIB: &str = r#"{"reason":"compiler-artifact","package_id":"path+file:///work/wt22-ci/hb-user#0.1.0","manifest_path":"/work/wt22-ci/hb-user/Cargo.toml","target":{"kind":["lib"],"crate_types":["lib"],"name":"hb","src_path":"/work/wt22-ci/hb-user/src/lib.rs","edition":"2024","doc":true,"doctest":true,"test":true},"profile":{"opt_level":"0","debuginfo":2,"debug_assertions":true,"overflow_checks":true,"test":true},"features":[],"filenames":["/work/wt22-ci/target/debug/deps/hb-9855811068448e17"],"executable":"/work/wt22-ci/target/debug/deps/hb-9855811068448e17","fresh":false}"#;

    /// The test executables are the test profile's artifacts, named by
    /// package and source file; doc-tests are those of the libraries built
    /// for testing (hb-common's rlib here is only a dependency).
    #[test]
    fn artifact_messages_give_the_test_executables_and_the_doc_tested_libraries() {
        let build = Build::from_messages(BUILD_MESSAGES.iter().copied()).unwrap();
        let labels: Vec<String> = build.binaries.iter().map(TestBinary::label).collect();
        assert_eq!(
            labels,
            [
                "hb-tests tests/gate.rs",
                "hb-user src/lib.rs",
                "hb-user src/main.rs"
            ]
        );
        assert_eq!(
            build.binaries[0],
            TestBinary {
                package: "hb-tests".into(),
                version: "0.1.0".into(),
                manifest_path: "/work/wt22-ci/tests/Cargo.toml".into(),
                source: "tests/gate.rs".into(),
                executable: "/work/wt22-ci/target/debug/deps/gate-48045cc0c6237b5a".into(),
            }
        );
        assert_eq!(build.doc_packages, ["hb-user"]);

        // The same artifact twice (cargo reports a fresh one again) runs once.
        let twice = Build::from_messages([TESTS_GATE, HB_USER_LIB, TESTS_GATE]).unwrap();
        assert_eq!(twice.binaries.len(), 2);

        // A test artifact cargo described without what names it is an
        // error, not a binary silently left out.
        let broken = TESTS_GATE.replace(
            r#""package_id":"path+file:///work/wt22-ci/tests#hb-tests@0.1.0","#,
            "",
        );
        let e = Build::from_messages([broken.as_str()]).unwrap_err();
        assert!(format!("{e:#}").contains("no `package_id`"), "{e:#}");
    }

    #[test]
    fn package_ids_give_name_and_version() {
        let nv = |id: &str| package_name_version(id).unwrap();
        let s = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(
            nv("path+file:///w/tests#hb-tests@0.1.0"),
            s("hb-tests", "0.1.0")
        );
        assert_eq!(nv("path+file:///w/hb-user#0.1.0"), s("hb-user", "0.1.0"));
        assert_eq!(
            nv("registry+https://github.com/rust-lang/crates.io-index#serde@1.0.228"),
            s("serde", "1.0.228")
        );
        assert_eq!(
            nv("hb-tests 0.1.0 (path+file:///w/tests)"),
            s("hb-tests", "0.1.0")
        );
        assert!(package_name_version("garbage").is_err());
        assert!(package_name_version("file:#0.1.0").is_err());
    }

    /// Run as cargo would: in the package's directory, with its variables
    /// (not those `cargo run` gave xtask), the test arguments passed on.
    #[test]
    fn a_test_binary_runs_in_its_package_with_its_variables() {
        let build = Build::from_messages([TESTS_GATE]).unwrap();
        let args = ["--nocapture".to_string(), "--test-threads=2".to_string()];
        let cmd = build.binaries[0].command(&args);
        assert_eq!(
            cmd.get_program(),
            "/work/wt22-ci/target/debug/deps/gate-48045cc0c6237b5a"
        );
        assert_eq!(
            cmd.get_current_dir(),
            Some(Path::new("/work/wt22-ci/tests"))
        );
        assert_eq!(
            cmd.get_args().collect::<Vec<_>>(),
            ["--nocapture", "--test-threads=2"]
        );
        let env = |k: &str| {
            cmd.get_envs()
                .find(|(n, _)| *n == k)
                .and_then(|(_, v)| v)
                .map(|v| v.to_string_lossy().into_owned())
        };
        assert_eq!(
            env("CARGO_MANIFEST_DIR").as_deref(),
            Some("/work/wt22-ci/tests")
        );
        assert_eq!(
            env("CARGO_MANIFEST_PATH").as_deref(),
            Some("/work/wt22-ci/tests/Cargo.toml")
        );
        assert_eq!(env("CARGO_PKG_NAME").as_deref(), Some("hb-tests"));
        assert_eq!(env("CARGO_PKG_VERSION_MINOR").as_deref(), Some("1"));
        if std::env::var_os(PROPTEST_RNG_SEED).is_none() {
            assert_eq!(env(PROPTEST_RNG_SEED), Some(PROPTEST_SEED.to_string()));
        }
    }

    #[test]
    fn doc_tests_follow_cargos_target_selection() {
        let v = |s: &str| -> Vec<String> { s.split_whitespace().map(String::from).collect() };
        assert!(!selects_targets(&v("-p hb-user --release --features x")));
        assert!(selects_targets(&v("-p hb-tests --test gate")));
        assert!(selects_targets(&v("--lib")));
        assert!(selects_targets(&v("--test=gate")));
        assert!(selects_targets(&v("--doc")));
        // `--testing` is no option of cargo's, and no selection.
        assert!(!selects_targets(&v("--testing")));
        assert_eq!(
            without_package_selection(&v(
                "-p hb-user --package hb-tests --package=x -phb-common --workspace --all \
                 --exclude hb-ebpf --exclude=y --doc --release --features a,b"
            )),
            v("--release --features a,b")
        );
    }

    /// A test binary that prints its result and exits, leaving processes
    /// that inherited its stdout: one in its process group, one in a
    /// session of its own (no group signal reaches it). Its result counts
    /// within seconds, and the holders are killed and named as left
    /// behind, which fails the run.
    #[test]
    fn processes_left_holding_a_binarys_stdout_are_killed_and_named() {
        let run = format!("hold-{}", std::process::id());
        let mut leaked = Vec::new();
        let mut session = Session {
            run: &run,
            deadline: Instant::now() + Duration::from_secs(600),
            limit: Duration::from_secs(600),
            leaked: &mut leaked,
        };
        let mut fake = Command::new("sh");
        fake.arg("-c").arg(
            "echo 'test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; \
             finished in 0.00s'; sleep 41 & setsid sleep 42 & exit 0",
        );
        let t = Instant::now();
        // As `run_tests_of` does, but not echoed: libtest would not capture
        // it, and this binary's own result line is read after it.
        let mut result = None;
        let status = session
            .watch(&mut fake, "fake tests/hold.rs", |l| {
                result = last_result(result, l)
            })
            .unwrap();
        let outcome = Outcome::of(result, status);
        let took = t.elapsed();
        let pids: Vec<u32> = leaked
            .iter()
            .filter_map(|l| l.split(' ').next()?.parse().ok())
            .collect();
        let gone = |pid: &u32| {
            let t = Instant::now();
            // Killed, and reaped by whoever adopted it.
            while std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| !s.contains(") Z "))
                && t.elapsed() < Duration::from_secs(5)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |s| s.contains(") Z "))
        };
        assert_eq!(
            outcome,
            Outcome::Reported(Counts {
                passed: 1,
                ..Counts::default()
            })
        );
        assert!(took < Duration::from_secs(20), "took {took:?}");
        assert_eq!(leaked.len(), 2, "{leaked:?}");
        for sleep in ["sleep 41", "sleep 42"] {
            assert!(
                leaked.iter().any(|l| l.contains(&format!("({sleep})"))
                    && l.contains("stdout of fake tests/hold.rs")),
                "{sleep} in {leaked:?}"
            );
        }
        assert!(pids.iter().all(gone), "{leaked:?} still running");
    }

    /// `.ci/run` requires every integration test file of the workspace
    /// (each one runs the kernel or namespaces) and xtask's own unit
    /// tests (the demo's network, the sweep), by the labels this runner
    /// prints: one dropped would go unnoticed.
    #[test]
    fn ci_requires_every_kernel_and_namespace_test_binary() {
        let root = util::root();
        let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
        let list = ci
            .split_once("REQUIRED_TEST_BINARIES=(")
            .and_then(|(_, rest)| rest.split_once("\n)"))
            .expect("REQUIRED_TEST_BINARIES=( ... ) in .ci/run")
            .0;
        let required: Vec<&str> = list
            .lines()
            .filter_map(|l| l.trim().strip_prefix('"')?.split_once('"'))
            .map(|(label, _)| label)
            .collect();
        let mut want = vec!["xtask src/main.rs".to_string()];
        for member in ["hb-common", "hb-user", "tests", "xtask"] {
            let manifest = std::fs::read_to_string(root.join(member).join("Cargo.toml")).unwrap();
            let package = manifest
                .lines()
                .find_map(|l| l.strip_prefix("name = \""))
                .and_then(|n| n.strip_suffix('"'))
                .unwrap();
            let Ok(files) = std::fs::read_dir(root.join(member).join("tests")) else {
                continue;
            };
            for f in files {
                let name = f.unwrap().file_name().to_string_lossy().into_owned();
                if name.ends_with(".rs") {
                    want.push(format!("{package} tests/{name}"));
                }
            }
        }
        assert!(want.len() > 5, "{want:?}");
        for w in &want {
            assert!(required.contains(&w.as_str()), "{w} not in {required:?}");
        }
    }

    /// The build of `hb` is under the tests' deadline: past it, the build
    /// does not even start.
    #[test]
    fn the_hb_build_is_under_the_deadline() {
        let mut leaked = Vec::new();
        let mut session = Session {
            run: "past",
            deadline: Instant::now(),
            limit: Duration::from_secs(60),
            leaked: &mut leaked,
        };
        let e = build_hb(&mut session, &[]).unwrap_err();
        assert!(
            format!("{e:#}").contains("passed before the hb build could start"),
            "{e:#}"
        );
    }

    #[test]
    fn result_lines_are_parsed() {
        assert_eq!(
            Counts::parse(
                "test result: FAILED. 4 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1.20s"
            ),
            Some(Counts {
                passed: 4,
                failed: 2,
                ignored: 1
            })
        );
        assert_eq!(
            Counts::parse(
                "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 5 filtered out; finished in 0.00s"
            ),
            Some(Counts::default())
        );
        assert_eq!(Counts::parse("test a ... ok"), None);
        assert_eq!(Counts::parse("   Doc-tests hb"), None);
    }
}
