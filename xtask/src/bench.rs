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
    Sender,
}

impl Bench {
    const ALL: [Bench; 6] = [
        Bench::Dataplane,
        Bench::Monitor,
        Bench::Controller,
        Bench::Eval,
        Bench::E2e,
        Bench::Sender,
    ];

    fn name(self) -> &'static str {
        match self {
            Bench::Dataplane => "dataplane",
            Bench::Monitor => "monitor",
            Bench::Controller => "controller",
            Bench::Eval => "eval",
            Bench::E2e => "e2e",
            Bench::Sender => "sender",
        }
    }

    fn bin(self) -> String {
        format!("bench_{}", self.name())
    }

    fn command(self) -> String {
        let run = format!("cargo run --release -p hb-tests --bin {}", self.bin());
        match self {
            // They run the `hb` binary itself.
            Bench::E2e | Bench::Sender => format!("cargo build --release -p hb-user && {run}"),
            _ => run,
        }
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
    // A fresh clone: the toolchain pieces first (idempotent, fast when
    // present).
    crate::setup::run()?;
    // Everything is compiled before anything is timed: `hb` (the e2e bench
    // runs it) and every benchmark binary, in one cargo invocation.
    let started = Instant::now();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    // What is measured: the tree as built here. The benchmarks then run the
    // binaries built now (not `cargo run`, which would rebuild a tree
    // edited meanwhile), and the report says if the tree moved anyway.
    let tree = Tree::now();
    let mut build = util::cargo();
    build.args([
        "build",
        "--release",
        "-p",
        "hb-user",
        "-p",
        "hb-tests",
        "--bins",
    ]);
    eprintln!("xtask bench: {}", util::show(&build));
    util::run(&mut build)?;
    let built_s = started.elapsed().as_secs_f64();
    util::sweep_test_leftovers("before the benchmarks");
    let result = run_all(&names);
    util::sweep_test_leftovers("after the benchmarks");
    let sections = result?;
    if sections.is_empty() {
        bail!("no benchmark binary exists yet");
    }
    let total_s = started.elapsed().as_secs_f64();
    eprintln!("xtask bench: build {built_s:.0} s, total {total_s:.0} s");
    if write_file {
        let path = util::root().join("BENCHMARKS.md");
        let moved = Tree::now() != tree;
        let run = Run {
            commit: tree.commit.chars().take(7).collect(),
            changes: tree.describe(),
            moved,
            load: load
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            built_s,
            total_s,
        };
        std::fs::write(&path, report(&sections, &run)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("xtask bench: wrote {}", path.display());
    }
    Ok(())
}

/// Facts of this run of `cargo xtask bench` for the report.
struct Run {
    /// HEAD when the run started, and what differed from it then
    /// ([`Tree::describe`]).
    commit: String,
    changes: String,
    /// The tree (HEAD and its uncommitted changes) changed during the run:
    /// the binaries measured are those built at its start.
    moved: bool,
    /// Load average (1, 5, 15 min) before the build.
    load: String,
    built_s: f64,
    total_s: f64,
}

/// Runs each benchmark; returns `(bench, its markdown, seconds)` for
/// those that exist.
fn run_all(names: &[Bench]) -> anyhow::Result<Vec<(Bench, String, f64)>> {
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
        let bin = util::target_dir().join("release").join(b.bin());
        let mut cmd = std::process::Command::new(&bin);
        cmd.current_dir(util::root())
            .stdout(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = util::spawn_fg(&mut cmd)?;
        let mut md = String::new();
        // On a thread, while the benchmark is waited for: a process it
        // left holding its stdout is killed, not waited for.
        let read = util::read_stdout(&mut child, |line| {
            md.push_str(line);
            md.push('\n');
        });
        let status = util::wait_fg(&mut child)?;
        let read = read?;
        if util::interrupted() {
            bail!("interrupted");
        }
        if let Some(e) = read.error {
            bail!(
                "cannot read the output of benchmark {} ({e}); BENCHMARKS.md not written",
                b.name()
            );
        }
        if !read.holders.is_empty() || read.abandoned {
            bail!(
                "benchmark {} exited ({status}) but left process(es) running and holding its \
                 stdout{}{}; BENCHMARKS.md not written. Rerun: {}",
                b.name(),
                if read.holders.is_empty() {
                    String::new()
                } else {
                    format!(", killed: {}", read.holders.join("; "))
                },
                if read.abandoned {
                    ", one that could not be killed"
                } else {
                    ""
                },
                b.command()
            );
        }
        if !status.success() {
            bail!(
                "benchmark {} failed ({status}); BENCHMARKS.md not written. Rerun: {}",
                b.name(),
                b.command()
            );
        }
        print!("{md}");
        let secs = t.elapsed().as_secs_f64();
        eprintln!("xtask bench: {}: done in {secs:.0}s", b.name());
        sections.push((b, md, secs));
    }
    Ok(sections)
}

/// What was measured: HEAD and what differed from it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tree {
    commit: String,
    /// The git blob id of [`DIFF_CMD`]'s output (`git hash-object`, so
    /// anyone can recompute it on their tree), if it is not empty.
    diff: Option<String>,
    /// Files git does not track nor ignore (a new module not yet added).
    untracked: Vec<String>,
}

/// The uncommitted changes a run's digest covers, as a shell command:
/// tracked files against HEAD, but for the report this command rewrites.
/// Options pinned so that the user's git configuration (an external diff,
/// textconv, other path prefixes, the diff algorithm, context, renames, an
/// order file, `diff.relative`) cannot change the bytes; run from the
/// repository's root.
const DIFF_CMD: &str = "git diff --no-ext-diff --no-textconv --no-color --src-prefix=a/ \
                        --dst-prefix=b/ --diff-algorithm=myers --unified=3 \
                        --inter-hunk-context=0 --no-renames --no-relative -O/dev/null \
                        HEAD -- . ':!BENCHMARKS.md'";

impl Tree {
    fn now() -> Tree {
        let git = |args: &[&str]| {
            output(
                std::process::Command::new("git")
                    .args(args)
                    .current_dir(util::root()),
            )
            .unwrap_or_default()
        };
        let diff = diff_digest();
        let untracked = git(&["ls-files", "--others", "--exclude-standard"])
            .lines()
            .map(str::to_owned)
            .collect();
        Tree {
            commit: git(&["rev-parse", "HEAD"]).trim().to_owned(),
            diff,
            untracked,
        }
    }

    /// What the report says after the commit: nothing for a clean tree.
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(d) = &self.diff {
            parts.push(format!(
                "`{DIFF_CMD} | git hash-object --stdin` (from the repository's root) = {d}"
            ));
        }
        if !self.untracked.is_empty() {
            parts.push(format!("untracked: {}", self.untracked.join(", ")));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!(" (with uncommitted changes: {})", parts.join("; "))
        }
    }
}

/// The git blob id of [`DIFF_CMD`]'s output, short as git shows ids,
/// computed by the very pipeline the report prints (raw bytes: a diff of
/// a file that is not UTF-8 hashes as git hashes it); `None` for no
/// change, "unknown" if git cannot say.
fn diff_digest() -> Option<String> {
    diff_digest_in(&util::root())
}

fn diff_digest_in(dir: &std::path::Path) -> Option<String> {
    // bash for `pipefail`: a `git diff` that fails must not hash its
    // partial output as the digest.
    let sh = |script: String| {
        std::process::Command::new("bash")
            .args(["-o", "pipefail", "-c", &script])
            .current_dir(dir)
            .stderr(Stdio::null())
            .output()
    };
    // `--quiet` before the pathspec, which takes every word after `--`.
    match sh(DIFF_CMD.replacen("git diff", "git diff --quiet", 1)) {
        Ok(o) if o.status.success() => return None,
        Ok(o) if o.status.code() == Some(1) => {}
        Ok(o) => return Some(format!("unknown (git diff: {})", o.status)),
        Err(e) => return Some(format!("unknown ({e})")),
    }
    Some(match sh(format!("{DIFF_CMD} | git hash-object --stdin")) {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .trim()
            .chars()
            .take(12)
            .collect(),
        Ok(o) => format!("unknown (git hash-object: {})", o.status),
        Err(e) => format!("unknown ({e})"),
    })
}

/// The first line of `cmd`'s output, or why there is none.
fn version(cmd: &mut std::process::Command) -> String {
    output(cmd).map_or_else(
        |e| format!("unknown ({e})"),
        |o| o.lines().next().unwrap_or("").trim().to_owned(),
    )
}

fn report(sections: &[(Bench, String, f64)], run: &Run) -> anyhow::Result<String> {
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
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or_else(
            || "unknown".into(),
            |kib| format!("{:.1} GiB", kib / (1 << 20) as f64),
        );
    let kernel = version(std::process::Command::new("uname").arg("-r"));
    let rustc = version(std::process::Command::new("rustc").arg("--version"));
    let nightly = version(std::process::Command::new("rustc").args(["+nightly", "--version"]));
    let linker = version(std::process::Command::new("bpf-linker").arg("--version"));
    let date = version(std::process::Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]));
    let mut s = String::new();
    s.push_str("# hb benchmarks\n\n");
    s.push_str("Generated by `cargo xtask bench` (as root). Every number below was measured\n");
    s.push_str("in this run on this machine; ratios compare against a baseline measured in\n");
    s.push_str("the same run.\n\n");
    s.push_str("## Machine\n\n");
    s.push_str(&format!(
        "- date: {date}\n- CPU: {cpu}\n- cores: {cores}\n- memory: {mem_gib}\n"
    ));
    s.push_str(&format!(
        "- kernel: {kernel}\n- rustc: {rustc} (userspace); {nightly} (eBPF)\n- bpf-linker: {linker}\n"
    ));
    s.push_str(&format!(
        "- commit: {}{}\n- load average before the run: {}\n\n",
        run.commit.trim(),
        if run.moved {
            format!(
                "{} (the tree changed during the run: measured as built at its start)",
                run.changes
            )
        } else {
            run.changes.clone()
        },
        run.load
    ));
    s.push_str("## Commands\n\n```sh\n");
    for (b, _, _) in sections {
        s.push_str(&format!(
            "{}   # cargo xtask bench {}\n",
            b.command(),
            b.name()
        ));
    }
    s.push_str("```\n\n");
    s.push_str(&format!(
        "Wall time of `cargo xtask bench`: {:.1} min (build {:.0} s",
        run.total_s / 60.0,
        run.built_s
    ));
    for (b, _, secs) in sections {
        s.push_str(&format!(", {} {secs:.0} s", b.name()));
    }
    s.push_str(").\n\n");
    for (_, md, _) in sections {
        s.push_str(md.trim_end());
        s.push_str("\n\n");
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every benchmark `cargo xtask bench NAME` accepts is one the full run
    /// writes into BENCHMARKS.md, has its binary, and, if that binary runs
    /// `hb`, has a command that builds `hb` first (the binary measures
    /// whatever `hb` is there).
    #[test]
    fn every_benchmark_runs_in_the_full_run_with_what_it_needs() {
        use clap::ValueEnum as _;
        for &b in Bench::value_variants() {
            assert!(Bench::ALL.contains(&b), "{b:?} left out of the full run");
            assert!(b.exists(), "{b:?}: no tests/src/bin/{}.rs", b.bin());
            assert_eq!(
                Bench::from_str(b.name(), false),
                Ok(b),
                "`cargo xtask bench {}`",
                b.name()
            );
            let src =
                std::fs::read_to_string(util::root().join(format!("tests/src/bin/{}.rs", b.bin())))
                    .unwrap();
            let runs_hb = src.contains("try_hb_bin") || src.contains("hb_bin()");
            assert_eq!(
                b.command()
                    .starts_with("cargo build --release -p hb-user && "),
                runs_hb,
                "{b:?}: {}",
                b.command()
            );
        }
        assert_eq!(
            Bench::Sender.command(),
            "cargo build --release -p hb-user && cargo run --release -p hb-tests --bin \
             bench_sender"
        );
    }

    /// The digest of uncommitted changes is git's own blob id of the
    /// diff's raw bytes (a file that is not UTF-8 included), and the
    /// report prints the command that recomputes it.
    #[test]
    fn uncommitted_changes_are_named_by_a_digest_git_recomputes() {
        let dir = std::env::temp_dir().join(format!("xtask-digest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let git = |args: &[&str]| {
            let o = std::process::Command::new("git")
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(args)
                .current_dir(&dir)
                .output()
                .unwrap();
            assert!(o.status.success(), "git {args:?}: {o:?}");
            o.stdout
        };
        git(&["init", "-q"]);
        // Twenty lines, the middle one changed below: the context git shows
        // around it is a setting.
        let lines = |middle: &[u8]| -> Vec<u8> {
            let mut v = Vec::new();
            for i in 0..20 {
                if i == 10 {
                    v.extend_from_slice(middle);
                } else {
                    v.extend_from_slice(format!("line {i}").as_bytes());
                }
                v.push(b'\n');
            }
            v
        };
        std::fs::write(dir.join("latin1.txt"), lines(b"caf\xe9")).unwrap();
        std::fs::write(dir.join("BENCHMARKS.md"), "old\n").unwrap();
        git(&["add", "."]);
        git(&["commit", "-qm", "x"]);
        assert_eq!(diff_digest_in(&dir), None, "clean");
        std::fs::write(dir.join("BENCHMARKS.md"), "new\n").unwrap();
        assert_eq!(diff_digest_in(&dir), None, "the report itself left out");
        std::fs::write(dir.join("latin1.txt"), lines(b"na\xefve")).unwrap();
        let raw = git(&[
            "diff",
            "--no-ext-diff",
            "--no-textconv",
            "--no-color",
            "--src-prefix=a/",
            "--dst-prefix=b/",
            "HEAD",
            "--",
            "latin1.txt",
        ]);
        std::fs::write(dir.join("raw.diff"), &raw).unwrap();
        let want = String::from_utf8(git(&["hash-object", "raw.diff"])).unwrap();
        let got = diff_digest_in(&dir).unwrap();
        // The user's diff settings change nothing.
        for (k, v) in [
            ("diff.algorithm", "patience"),
            ("diff.context", "10"),
            ("diff.noprefix", "true"),
            ("diff.renames", "copies"),
        ] {
            git(&["config", k, v]);
        }
        assert_eq!(diff_digest_in(&dir).as_deref(), Some(got.as_str()));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(got, want.trim()[..12], "raw bytes hashed");

        let dirty = Tree {
            commit: "abc".into(),
            diff: Some(got.clone()),
            untracked: vec!["hb-user/src/new.rs".into()],
        };
        assert_eq!(
            dirty.describe(),
            format!(
                " (with uncommitted changes: `{DIFF_CMD} | git hash-object --stdin` (from the \
                 repository's root) = {got}; untracked: hb-user/src/new.rs)"
            )
        );
        assert!(
            DIFF_CMD
                .contains("--no-ext-diff --no-textconv --no-color --src-prefix=a/ --dst-prefix=b/")
        );
    }
}
