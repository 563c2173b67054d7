//! Rebuild when the `bpf-linker` binary changes (it is an undeclared tool
//! dependency of this crate; `cargo xtask setup` installs it), and give it
//! two CPU features:
//! - `alu32`: 32-bit ALU ops and the 32-bit atomic compare-and-exchange the
//!   per-node seqlock needs (kernel 5.12+). Redundant with ISA v3, which
//!   `bpf-linker-v3` (the linker hb-user's build.rs gives cargo) selects
//!   instead of the `generic` CPU rustc passes (aya-build owns RUSTFLAGS):
//!   v3's 32-bit jumps spare the `w = 1; if ..; w = 0; w &= 1; if w != 0`
//!   sequences LLVM emits for every comparison without them. Kept so that
//!   a build with plain bpf-linker still verifies.
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
