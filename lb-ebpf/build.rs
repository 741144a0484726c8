//! Rebuild the programs when bpf-linker changes (aya-template habit).
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
