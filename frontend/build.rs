//! Points the front end at the eBPF object built by `cargo xtask build-ebpf`.
use std::path::PathBuf;

fn main() {
    let obj = match std::env::var_os("SLUICE_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/ebpf/bpfel-unknown-none/release/sluice-ebpf"),
    };
    println!("cargo:rerun-if-env-changed=SLUICE_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", obj.display());
    if !obj.exists() {
        panic!(
            "the eBPF object {} is missing: build with `cargo xtask build` (it sets up the eBPF \
             toolchain and builds the object first)",
            obj.display()
        );
    }
    println!("cargo:rustc-env=SLUICE_EBPF_OBJECT={}", obj.display());
}
