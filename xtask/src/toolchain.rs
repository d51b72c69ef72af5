//! What the eBPF build needs, installed on demand (see ../shared/reference/ebpf-toolchain.md):
//! the nightly toolchain's `rust-src`, and `bpf-linker` built against that nightly's own
//! libLLVM into `.tools/` of the project. Also the distribution packages tests and benchmarks
//! run (wrk, nginx).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{root, run};

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn setup() -> Result<()> {
    let tools = setup_quiet()?;
    println!(
        "eBPF toolchain ready: nightly with rust-src, {}",
        tools.join("bin/bpf-linker").display()
    );
    Ok(())
}

/// Makes sure the toolchain is there; returns the tools folder.
pub fn setup_quiet() -> Result<PathBuf> {
    let tools = root().join(".tools");
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("the nightly toolchain is needed for the eBPF build (`rustup toolchain list`)")?;
    let sysroot = PathBuf::from(sysroot.trim());
    if !sysroot
        .join("lib/rustlib/src/rust/library/Cargo.lock")
        .exists()
    {
        eprintln!("xtask: adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let linker = tools.join("bin/bpf-linker");
    let llvm_major = llvm_major()?;
    let stamp = tools.join(format!(
        "bpf-linker-{BPF_LINKER_VERSION}-llvm-{llvm_major}.stamp"
    ));
    if !linker.exists() || !stamp.exists() {
        eprintln!(
            "xtask: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {llvm_major} (about a minute, once)"
        );
        let llvm = tools.join("llvm/lib");
        std::fs::create_dir_all(&llvm)?;
        let mut found = false;
        for entry in std::fs::read_dir(sysroot.join("lib"))? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_owned();
            if name.starts_with("libLLVM") && name.contains(".so") {
                for link in [llvm.join("libLLVM.so"), llvm.join(&name)] {
                    let _ = std::fs::remove_file(&link);
                    std::os::unix::fs::symlink(&path, &link)?;
                }
                found = true;
            }
        }
        if !found {
            bail!(
                "no libLLVM in {}/lib: cannot build bpf-linker against the nightly's LLVM",
                sysroot.display()
            );
        }
        run(Command::new("cargo")
            .env("LLVM_PREFIX", tools.join("llvm"))
            .env_remove("RUSTUP_TOOLCHAIN")
            .args([
                "+stable",
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--no-default-features",
            ])
            .args(["--features", &format!("llvm-{llvm_major}"), "--root"])
            .arg(&tools))
        .context("building bpf-linker")?;
        std::fs::write(&stamp, "")?;
    }
    Ok(tools)
}

fn llvm_major() -> Result<String> {
    let v = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    v.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|s| s.split('.').next())
        .map(str::to_owned)
        .context("rustc +nightly -vV names no LLVM version")
}

fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn on_path(binary: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| Path::new(&d).join(binary).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(binary).is_file()
}

/// Installs the Debian packages whose binaries are missing: (binary, package).
pub fn ensure_packages(wanted: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(b, _)| !on_path(b))
        .map(|(_, p)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("installing {}", missing.join(" ")))
}
