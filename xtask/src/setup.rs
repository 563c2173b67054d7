//! `cargo xtask setup`: everything the build and the tests need on a fresh
//! machine of this kind, idempotently (a second run only checks).
//!
//! The eBPF crate builds with the nightly toolchain (`-Z build-std=core`
//! needs its `rust-src`) and links with `bpf-linker`. bpf-linker must use
//! the very LLVM that the nightly rustc emitted bitcode with, so it is built
//! against the nightly's own `libLLVM.so.<ver>-rust-<ver>-nightly` (found in
//! the nightly sysroot) through a prefix directory (one per libLLVM file
//! name) whose `lib/` links to it, in a fresh target directory, and
//! checked afterwards with `ldd`: the check, not the install step, decides
//! whether anything needs doing.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::util::{self, on_path, output};

/// The bpf-linker release the build is known to work with.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// The LLVM majors that release has a feature for (`llvm-21` ... `llvm-23`
/// in its Cargo.toml): a nightly on any other LLVM cannot be linked.
const BPF_LINKER_LLVM: std::ops::RangeInclusive<u32> = 21..=23;

/// Commands the tests and the demo run, and the Debian package of each.
const APT: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ping", "iputils-ping"),
    ("ethtool", "ethtool"),
    ("nsenter", "util-linux"),
    ("ldd", "libc-bin"),
    ("cc", "build-essential"),
];

/// How long apt-get waits for the dpkg lock (seconds).
const APT_LOCK_TIMEOUT: &str = "DPkg::Lock::Timeout=300";

/// One setup step: checks, and installs only if the check fails.
type Step = fn() -> anyhow::Result<Outcome>;

/// What one step did.
enum Outcome {
    Skipped(String),
    Done(String),
}

pub fn run() -> anyhow::Result<()> {
    let start = Instant::now();
    let steps: [(&str, Step); 4] = [
        ("system packages", apt_packages),
        ("nightly toolchain", nightly),
        ("rust-src for nightly", rust_src),
        ("bpf-linker", bpf_linker),
    ];
    for (name, step) in steps {
        let t = Instant::now();
        let outcome = step().with_context(|| format!("setup step `{name}` failed"))?;
        let secs = t.elapsed().as_secs_f64();
        match outcome {
            Outcome::Skipped(why) => eprintln!("xtask setup: {name}: skipped ({why}) [{secs:.1}s]"),
            Outcome::Done(what) => eprintln!("xtask setup: {name}: {what} [{secs:.1}s]"),
        }
    }
    eprintln!("xtask setup: done in {:.1}s", start.elapsed().as_secs_f64());
    Ok(())
}

/// Where a command is looked for after PATH: Debian installs some (ethtool)
/// in /usr/sbin only, which a non-root PATH lacks; judged by PATH alone,
/// ethtool was missing at every run, and setup ran apt-get every time.
const SBIN: [&str; 2] = ["/usr/sbin", "/sbin"];

/// The commands of [`APT`] found neither on `path` (a PATH value) nor in
/// `sbin`, with their packages.
fn missing_commands(
    path: Option<&std::ffi::OsStr>,
    sbin: &[&Path],
) -> Vec<(&'static str, &'static str)> {
    APT.iter()
        .filter(|(cmd, _)| util::find_in(cmd, path, sbin).is_none())
        .copied()
        .collect()
}

/// `ethtool (package ethtool), ping (package iputils-ping)`.
fn describe_missing(missing: &[(&str, &str)]) -> String {
    missing
        .iter()
        .map(|(cmd, pkg)| format!("{cmd} (package {pkg})"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn apt_packages() -> anyhow::Result<Outcome> {
    let sbin = SBIN.map(Path::new);
    let missing = missing_commands(std::env::var_os("PATH").as_deref(), &sbin);
    if missing.is_empty() {
        return Ok(Outcome::Skipped(format!(
            "{} present",
            APT.iter().map(|(c, _)| *c).collect::<Vec<_>>().join(", ")
        )));
    }
    let mut packages: Vec<&str> = missing.iter().map(|(_, pkg)| *pkg).collect();
    packages.dedup();
    let missing = describe_missing(&missing);
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "missing {missing}: install them as root (`apt-get install {}`) or run \
             `cargo xtask setup` as root",
            packages.join(" ")
        );
    }
    if on_path("apt-get").is_none() {
        bail!(
            "missing {missing}, and no apt-get to install {}",
            packages.join(" ")
        );
    }
    // Never a prompt (CI has no stdin), and a bounded wait for a dpkg lock
    // that another apt (unattended-upgrades at boot) holds, instead of
    // failing at once.
    let apt = || {
        let mut c = Command::new("apt-get");
        c.args(["-o", APT_LOCK_TIMEOUT, "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(std::process::Stdio::null());
        c
    };
    util::run(apt().arg("update"))?;
    util::run(
        apt()
            .args(["install", "-y", "--no-install-recommends"])
            .args(&packages),
    )?;
    Ok(Outcome::Done(format!("installed {}", packages.join(" "))))
}

fn rustup() -> Command {
    let mut c = Command::new("rustup");
    // A rustup that auto-installs toolchains would hide what we do here.
    c.env("RUSTUP_AUTO_INSTALL", "0");
    c
}

fn nightly() -> anyhow::Result<Outcome> {
    // Whether `nightly` itself resolves (a dated `nightly-YYYY-MM-DD` in
    // `rustup toolchain list` is not it, and the build asks for `nightly`).
    if rustup()
        .args(["run", "nightly", "rustc", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        return Ok(Outcome::Skipped("installed".into()));
    }
    util::run(rustup().args([
        "toolchain",
        "install",
        "nightly",
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))?;
    Ok(Outcome::Done(
        "installed nightly (minimal) with rust-src".into(),
    ))
}

fn rust_src() -> anyhow::Result<Outcome> {
    let installed =
        output(rustup().args(["component", "list", "--installed", "--toolchain", "nightly"]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(Outcome::Skipped("installed".into()));
    }
    util::run(rustup().args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    Ok(Outcome::Done("added rust-src".into()))
}

/// The nightly's libLLVM: its file name (the soname bpf-linker must need)
/// and full path.
fn nightly_llvm() -> anyhow::Result<(String, PathBuf)> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let mut found = Vec::new();
    for e in std::fs::read_dir(&lib).with_context(|| format!("cannot list {}", lib.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name.starts_with("libLLVM.so.") && name.contains("-rust-") {
            found.push(name);
        }
    }
    match found.as_slice() {
        [one] => Ok((one.clone(), lib.join(one))),
        [] => bail!(
            "no libLLVM.so.*-rust-* in {}: is the nightly toolchain complete?",
            lib.display()
        ),
        many => bail!(
            "several libLLVM candidates in {}: {}",
            lib.display(),
            many.join(" ")
        ),
    }
}

/// `libLLVM.so.22.1-rust-1.97.0-nightly` -> 22.
fn llvm_major(soname: &str) -> anyhow::Result<u32> {
    soname
        .strip_prefix("libLLVM.so.")
        .and_then(|v| v.split(['.', '-']).next())
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("cannot read the LLVM major version from {soname}"))
}

/// Refuses, before a two-minute build that would fail inside llvm-sys, a
/// nightly whose LLVM bpf-linker has no feature for.
fn supported_llvm(major: u32, soname: &str) -> anyhow::Result<()> {
    if BPF_LINKER_LLVM.contains(&major) {
        return Ok(());
    }
    bail!(
        "the nightly toolchain uses LLVM {major} ({soname}), and bpf-linker \
         {BPF_LINKER_VERSION} links LLVM {}-{} only: the build needs a `nightly` \
         toolchain on one of those (it is tested with rustc 1.97.0-nightly, LLVM 22)",
        BPF_LINKER_LLVM.start(),
        BPF_LINKER_LLVM.end()
    )
}

/// Where `cargo install` puts binaries.
fn install_bin_dir() -> Option<PathBuf> {
    if let Some(r) = std::env::var_os("CARGO_INSTALL_ROOT") {
        return Some(PathBuf::from(r).join("bin"));
    }
    if let Some(h) = std::env::var_os("CARGO_HOME") {
        return Some(PathBuf::from(h).join("bin"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin"))
}

/// Why `bin` is not a usable bpf-linker for `soname`/`llvm`, or `None` if
/// it is.
fn bpf_linker_problem(bin: &Path, soname: &str, llvm: &Path) -> Option<String> {
    let version = match output(Command::new(bin).arg("--version")) {
        Ok(v) => v,
        Err(e) => return Some(format!("{} does not run: {e:#}", bin.display())),
    };
    let want = format!(
        "bpf-linker {}",
        BPF_LINKER_VERSION.rsplit_once('.').unwrap().0
    );
    if !version.trim().starts_with(&want) {
        return Some(format!(
            "{} is `{}`, want {want}",
            bin.display(),
            version.trim()
        ));
    }
    let ldd = match output(Command::new("ldd").arg(bin)) {
        Ok(l) => l,
        Err(e) => return Some(format!("ldd {}: {e:#}", bin.display())),
    };
    // `libLLVM.so.22.1-rust-1.97.0-nightly => /path/to/it (0x...)`
    let Some(line) = ldd.lines().find(|l| l.trim_start().starts_with("libLLVM")) else {
        return Some(format!(
            "{} is not linked against a shared libLLVM",
            bin.display()
        ));
    };
    let mut parts = line.split_whitespace();
    let needed = parts.next().unwrap_or("");
    let resolved = parts.nth(1).unwrap_or("not");
    if needed != soname {
        return Some(format!(
            "{} needs {needed}, the nightly has {soname}",
            bin.display()
        ));
    }
    if resolved == "not" {
        return Some(format!("{} cannot find {needed}", bin.display()));
    }
    let same = std::fs::canonicalize(resolved)
        .ok()
        .zip(std::fs::canonicalize(llvm).ok())
        .is_some_and(|(a, b)| a == b);
    if !same {
        return Some(format!(
            "{} loads {resolved}, not the nightly's {}",
            bin.display(),
            llvm.display()
        ));
    }
    None
}

fn bpf_linker() -> anyhow::Result<Outcome> {
    let (soname, llvm) = nightly_llvm()?;
    let major = llvm_major(&soname)?;
    supported_llvm(major, &soname)?;
    let dir =
        install_bin_dir().context("neither CARGO_INSTALL_ROOT, CARGO_HOME nor HOME is set")?;
    let installed = dir.join("bpf-linker");
    // The binary the build runs is the first `bpf-linker` on PATH
    // (hb-ebpf/bpf-linker-v3 execs it): that one is checked, and the one
    // in the install directory is what `cargo install` would replace.
    let running = on_path("bpf-linker");
    let problem = match &running {
        Some(bin) => match bpf_linker_problem(bin, &soname, &llvm) {
            None => {
                return Ok(Outcome::Skipped(format!(
                    "{} is {BPF_LINKER_VERSION} linked against {soname}",
                    bin.display()
                )));
            }
            Some(problem) => problem,
        },
        None => "not on PATH".into(),
    };
    if let Some(bin) = running.as_ref().filter(|b| !same_file(b, &installed)) {
        // Installing would not change what the build runs.
        bail!(
            "the build runs {} (the first bpf-linker on PATH), which is not usable: {problem}; \
             remove it, or put {} before it on PATH",
            bin.display(),
            dir.display()
        );
    }
    if running.is_none() && bpf_linker_problem(&installed, &soname, &llvm).is_none() {
        bail!(
            "{} is usable but not on PATH, and the build runs `bpf-linker` from PATH: add {} to PATH",
            installed.display(),
            dir.display()
        );
    }
    eprintln!("xtask setup: bpf-linker: {problem}; building it (about 2 minutes)");

    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let prefix = llvm_prefix(Path::new(&home), &soname);
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;
    for name in ["libLLVM.so", soname.as_str()] {
        let link = lib.join(name);
        // Replace whatever was there (a link to a removed nightly's file).
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link)
            .with_context(|| format!("cannot link {} -> {}", link.display(), llvm.display()))?;
    }
    let target = std::env::temp_dir().join(format!("hb-bpf-linker-build-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&target);
    let built = util::run(&mut bpf_linker_install(&prefix, major, &target));
    // A gigabyte of build products nobody reuses (on purpose).
    let _ = std::fs::remove_dir_all(&target);
    built?;
    if let Some(problem) = bpf_linker_problem(&installed, &soname, &llvm) {
        bail!("bpf-linker was built but is not usable: {problem}");
    }
    match on_path("bpf-linker") {
        Some(p) if same_file(&p, &installed) => {}
        Some(p) => bail!(
            "installed {}, but PATH runs {} first: put {} before it on PATH",
            installed.display(),
            p.display(),
            dir.display()
        ),
        None => bail!(
            "installed {}, which is not on PATH: add {} to PATH",
            installed.display(),
            dir.display()
        ),
    }
    Ok(Outcome::Done(format!(
        "installed {} {BPF_LINKER_VERSION} against {} (prefix {})",
        installed.display(),
        llvm.display(),
        prefix.display()
    )))
}

/// The prefix directory bpf-linker is built against for the nightly's
/// libLLVM `soname`: its `lib/` links to that file, and the binary built
/// keeps the directory as its RUNPATH. One per soname, so that a nightly
/// with another libLLVM changes `LLVM_PREFIX`, which the build scripts of
/// bpf-linker and llvm-sys rerun on.
fn llvm_prefix(home: &Path, soname: &str) -> PathBuf {
    home.join(".cache/hb/llvm").join(soname)
}

/// `cargo install bpf-linker` against the LLVM of `prefix` (major
/// `major`), built in `target_dir`, a fresh directory: with the developer's
/// shared target directory (`CARGO_TARGET_DIR`, `build.target-dir`), which
/// `cargo install` uses when set, cargo found the bpf-linker built against
/// the previous nightly's libLLVM fresh (nothing it fingerprints names the
/// file the prefix links to) and installed it again, and setup failed on
/// every run after a nightly update within one LLVM major.
fn bpf_linker_install(prefix: &Path, major: u32, target_dir: &Path) -> Command {
    let mut c = util::cargo();
    c.args([
        "install",
        "bpf-linker",
        "--locked",
        "--force",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
        &format!("llvm-{major}"),
        "--target-dir",
    ])
    .arg(target_dir)
    .env("LLVM_PREFIX", prefix)
    // `--target-dir` overrides them; gone all the same, for a reader.
    .env_remove("CARGO_TARGET_DIR")
    .env_remove("CARGO_BUILD_TARGET_DIR");
    c
}

/// Whether `a` and `b` name one existing file.
fn same_file(a: &Path, b: &Path) -> bool {
    std::fs::canonicalize(a)
        .ok()
        .zip(std::fs::canonicalize(b).ok())
        .is_some_and(|(a, b)| a == b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_from_soname() {
        assert_eq!(
            llvm_major("libLLVM.so.22.1-rust-1.97.0-nightly").unwrap(),
            22
        );
        assert_eq!(llvm_major("libLLVM.so.21-rust-1.90.0-nightly").unwrap(), 21);
        assert!(llvm_major("libfoo.so").is_err());
    }

    /// bpf-linker is built in the directory given, never the developer's
    /// target directory, against a prefix of the nightly's very libLLVM.
    #[test]
    fn bpf_linker_builds_afresh_against_a_prefix_per_libllvm() {
        let home = Path::new("/home/dev");
        let old = llvm_prefix(home, "libLLVM.so.22.1-rust-1.97.0-nightly");
        let new = llvm_prefix(home, "libLLVM.so.22.1-rust-1.98.0-nightly");
        assert_ne!(old, new, "a new libLLVM changes LLVM_PREFIX");
        assert!(new.starts_with("/home/dev/.cache/hb"), "{}", new.display());
        let cmd = bpf_linker_install(&new, 22, Path::new("/tmp/fresh"));
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
        let after = |opt: &str| {
            let i = args
                .iter()
                .position(|a| a == opt)
                .unwrap_or_else(|| panic!("{opt} in {args:?}"));
            args.get(i + 1).map(|v| v.to_string())
        };
        assert_eq!(args[0], "install");
        assert_eq!(after("--target-dir").as_deref(), Some("/tmp/fresh"));
        assert_eq!(after("--version").as_deref(), Some(BPF_LINKER_VERSION));
        assert_eq!(after("--features").as_deref(), Some("llvm-22"));
        let env = |k: &str| {
            cmd.get_envs()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.map(|v| v.to_string_lossy().into_owned()))
        };
        assert_eq!(env("LLVM_PREFIX"), Some(Some(new.display().to_string())));
        assert_eq!(env("CARGO_TARGET_DIR"), Some(None));
        assert_eq!(env("CARGO_BUILD_TARGET_DIR"), Some(None));
    }

    /// A command Debian installs in /usr/sbin (ethtool) is present though
    /// a non-root PATH lacks /usr/sbin; one found nowhere is named with
    /// its package.
    #[test]
    fn system_commands_are_found_outside_path_too() {
        let dir = std::env::temp_dir().join(format!("hb-xtask-apt-{}", std::process::id()));
        let (bin, sbin) = (dir.join("bin"), dir.join("sbin"));
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&sbin).unwrap();
        let exe = |d: &Path, name: &str| {
            use std::os::unix::fs::PermissionsExt as _;
            let p = d.join(name);
            std::fs::write(&p, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        for (cmd, _) in APT {
            exe(if *cmd == "ethtool" { &sbin } else { &bin }, cmd);
        }
        let path = std::env::join_paths([&bin]).unwrap();
        let all = missing_commands(Some(&path), &[&sbin]);
        std::fs::remove_file(bin.join("ping")).unwrap();
        let no_ping = missing_commands(Some(&path), &[&sbin]);
        let no_path = missing_commands(None, &[&sbin]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(all, [], "ethtool in sbin, the others on PATH");
        assert_eq!(no_ping, [("ping", "iputils-ping")]);
        assert_eq!(describe_missing(&no_ping), "ping (package iputils-ping)");
        assert_eq!(no_path.len(), APT.len() - 1, "{no_path:?}");
    }

    #[test]
    fn only_the_llvm_bpf_linker_links_is_accepted() {
        assert!(supported_llvm(22, "libLLVM.so.22.1-rust-1.97.0-nightly").is_ok());
        let err = supported_llvm(24, "libLLVM.so.24.1-rust-1.99.0-nightly")
            .unwrap_err()
            .to_string();
        assert!(err.contains("LLVM 24") && err.contains("21-23"), "{err}");
    }
}
