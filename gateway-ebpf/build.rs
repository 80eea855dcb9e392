//! Rebuild the eBPF object when the linker changes (a toolchain refresh rebuilds bpf-linker).
use which::which;

fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
