//! `cargo xtask …`: sets up the eBPF toolchain, builds, runs the demo, the tests and the
//! benchmark. Every step installs what it needs when it is missing and is quick the second
//! time.

mod apps;
mod bench;
mod fuzz;
mod toolchain;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "sluice's build, demo, test and benchmark tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the eBPF build needs (nightly rust-src, bpf-linker in .tools/).
    Setup,
    /// Build the eBPF object (target/ebpf/…/sluice-ebpf).
    BuildEbpf,
    /// Build everything in release mode: the eBPF object, target/release/sluice and the
    /// example workers in target/release/examples/.
    Build,
    /// Build, then run the front end on 127.0.0.1:8080 with examples/demo.toml (needs root).
    Demo,
    /// Build, install the test tools (wrk), run every test: unit tests and the integration
    /// tests that run the real binaries as root in network namespaces; then fuzz the parsers
    /// briefly (SLUICE_FUZZ_SECONDS per target, default 10; 0 skips).
    Test {
        /// Passed to the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Benchmark sluice against the direct worker and nginx (see docs/benchmarks.md).
    Bench(bench::Args),
    /// Run each fuzz target in fuzz/ (installs cargo-fuzz; needs nightly); fails on a crash.
    Fuzz {
        /// Seconds of fuzzing per target.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => toolchain::setup(),
        Task::BuildEbpf => build_ebpf().map(drop),
        Task::Build => build(),
        Task::Demo => demo(),
        Task::Test { args } => test(&args),
        Task::Bench(args) => bench::run(args),
        Task::Fuzz { seconds } => fuzz::run_all(seconds),
    }
}

/// The checkout this task runs in: `cargo xtask` (cargo run) names the xtask package's folder
/// at run time; failing that, the nearest folder up from here with the workspace's Cargo.toml.
/// Never the folder it was compiled in, which may be another copy of the checkout.
pub fn root() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_MANIFEST_DIR") {
        if let Some(parent) = Path::new(&dir).parent() {
            return parent.to_path_buf();
        }
    }
    let mut dir = std::env::current_dir().unwrap_or_default();
    loop {
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap_or_default();
        if manifest.contains("[workspace]") && dir.join("xtask").is_dir() {
            return dir;
        }
        if !dir.pop() {
            return std::env::current_dir().unwrap_or_default();
        }
    }
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Builds the eBPF object; returns its path.
pub fn build_ebpf() -> Result<PathBuf> {
    let tools = toolchain::setup_quiet()?;
    let root = root();
    let mut path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![tools.join("bin")];
    paths.extend(std::env::split_paths(&path));
    path = std::env::join_paths(paths)?;
    run(Command::new("cargo")
        .current_dir(root.join("ebpf"))
        .env("PATH", path)
        // Built by the nightly toolchain in ebpf/.cargo/config.toml's target; the workspace's
        // stable settings must not leak in.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .args(["+nightly", "build", "--release", "--target-dir"])
        .arg(root.join("target/ebpf")))
    .context("building the eBPF object")?;
    let obj = root.join("target/ebpf/bpfel-unknown-none/release/sluice-ebpf");
    if !obj.exists() {
        bail!("the eBPF build left no object at {}", obj.display());
    }
    Ok(obj)
}

pub fn build() -> Result<()> {
    let obj = build_ebpf()?;
    run(cargo()
        .current_dir(root())
        .env("SLUICE_EBPF_OBJECT", &obj)
        .args([
            "build",
            "--release",
            "-p",
            "sluice",
            "-p",
            "sluice-worker",
            "--bins",
            "--examples",
        ]))
    .context("building the release binaries")
}

fn demo() -> Result<()> {
    build()?;
    let root = root();
    let sluice = root.join("target/release/sluice");
    let config = root.join("examples/demo.toml");
    eprintln!(
        "\nsluice demo: try `curl http://127.0.0.1:8080/api/hello` and `curl http://127.0.0.1:8080/`,"
    );
    eprintln!("`target/release/sluice status --config examples/demo.toml`; Ctrl-C stops it.\n");
    run(Command::new(sluice).arg("run").arg(config))
}

/// Where the tests find the binaries and worker scripts: the checkout's own, when every folder
/// above them lets other users through (workers of a pool without `user` run as a uid of
/// their own, which must be able to execute them); else copies in a fresh folder under /tmp.
fn reachable_binaries(root: &Path) -> Result<(PathBuf, PathBuf)> {
    use std::os::unix::fs::PermissionsExt;
    let release = root.join("target/release");
    let workers = root.join("tests/workers");
    let open = release
        .ancestors()
        .all(|dir| std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0));
    if open {
        return Ok((release, workers));
    }
    let copy = std::env::temp_dir().join(format!("sluice-test-bin-{}", std::process::id()));
    eprintln!(
        "{} is not reachable by other users; the tests use copies in {}",
        release.display(),
        copy.display()
    );
    std::fs::create_dir_all(copy.join("examples"))?;
    std::fs::create_dir_all(copy.join("workers"))?;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))?;
    std::fs::copy(release.join("sluice"), copy.join("sluice"))?;
    for dir in ["examples", "workers"] {
        let from = if dir == "workers" {
            workers.clone()
        } else {
            release.join(dir)
        };
        for entry in std::fs::read_dir(&from)? {
            let path = entry?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            if let Some(name) =
                name.filter(|n| path.is_file() && !n.contains('-') && !n.ends_with(".d"))
            {
                std::fs::copy(&path, copy.join(dir).join(name))?;
            }
        }
    }
    Ok((copy.clone(), copy.join("workers")))
}

fn test(args: &[String]) -> Result<()> {
    build()?;
    toolchain::ensure_packages(&[
        ("wrk", "wrk"),
        ("curl", "curl"),
        ("openssl", "openssl"),
        ("ip", "iproute2"),
        ("sysctl", "procps"),
    ])?;
    let root = root();
    let obj = root.join("target/ebpf/bpfel-unknown-none/release/sluice-ebpf");
    let (bins, workers) = reachable_binaries(&root)?;
    let apps = apps::ensure(&root, bins.starts_with(&root))?;
    let mut cmd = cargo();
    cmd.current_dir(&root)
        .env("SLUICE_EBPF_OBJECT", &obj)
        .env("SLUICE_BIN_DIR", &bins)
        .env("SLUICE_TEST_WORKERS", &workers)
        .env("SLUICE_TEST_APPS", &apps)
        .args([
            "test",
            "--release",
            "--workspace",
            "--exclude",
            "xtask",
            "--",
        ]);
    // The integration tests each make a network namespace; running them one at a time keeps
    // the 2-core machine's load, and their timing, predictable.
    cmd.arg("--test-threads=1");
    cmd.args(args);
    run(&mut cmd)?;
    // A short fuzzing round of the parsers (SLUICE_FUZZ_SECONDS per target; 0 skips it).
    let seconds = std::env::var("SLUICE_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    if args.is_empty() && seconds > 0 {
        fuzz::run_all(seconds)?;
    }
    Ok(())
}
