//! Rebuild when the `bpf-linker` binary changes (it is an undeclared tool
//! dependency of this crate; `cargo xtask setup` installs it).
use which::which;

fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!("cargo:warning=bpf-linker not found: run `cargo xtask setup`"),
    }
}
