//! Rebuild when the `bpf-linker` binary changes (it is an undeclared tool
//! dependency of this crate; `cargo xtask setup` installs it), and give it
//! two CPU features:
//! - `alu32`: 32-bit ALU ops and the 32-bit atomic compare-and-exchange the
//!   per-node seqlock needs (kernel 5.12+). (`--cpu v3` would be the usual
//!   way, but rustc already passes `--cpu`, and aya-build owns RUSTFLAGS.)
//! - `allows-misaligned-mem-access`: packet fields sit at odd offsets;
//!   x86-64 and the verifier (without strict alignment) allow misaligned
//!   packet loads, and without this LLVM splits them into byte loads.
use which::which;

fn main() {
    println!("cargo:rustc-link-arg=--cpu-features=+alu32,+allows-misaligned-mem-access");
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!("cargo:warning=bpf-linker not found: run `cargo xtask setup`"),
    }
}
