//! `cargo xtask fuzz`: runs every libFuzzer target in fuzz/ for a while and fails when one
//! finds a crash, a hang or a leak. cargo-fuzz needs nightly (sanitizer flags), so it is run
//! as `cargo +nightly fuzz`; it is installed on first use.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::{root, run};

const TARGETS: [&str; 6] = [
    "dispatcher_head",
    "canonicalize",
    "worker_http",
    "control",
    "tls_session",
    "pool_answer",
];
/// Seconds one input may run before libFuzzer calls it a hang (its default is 20 minutes).
const HANG_SECONDS: u64 = 10;

pub fn run_all(seconds: u64) -> Result<()> {
    ensure_cargo_fuzz()?;
    let root = root();
    let fuzz = root.join("fuzz");
    // The front end's build script needs the eBPF object; build it when it is missing.
    let mut obj = root.join("target/ebpf/bpfel-unknown-none/release/sluice-ebpf");
    if !obj.exists() {
        obj = crate::build_ebpf()?;
    }
    // One build for all targets, so the time limit below is all fuzzing.
    run(cargo_fuzz(&fuzz, &obj).arg("build")).context("building the fuzz targets")?;
    let mut failed = Vec::new();
    let mut summary = Vec::new();
    for target in TARGETS {
        let artifacts = fuzz.join("artifacts").join(target);
        let before = files(&artifacts);
        // New inputs go to target/fuzz-corpus (kept between runs, never committed); the
        // seeds in fuzz/corpus are only read, so they stay a handful of small files.
        let work = root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&work)?;
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        let (ok, stats) = fuzz_one(&fuzz, &obj, target, &work, seconds)?;
        let found: Vec<PathBuf> = files(&artifacts).difference(&before).cloned().collect();
        for f in &found {
            eprintln!("xtask: {target} found {}", f.display());
        }
        if !ok || !found.is_empty() {
            failed.push(target);
        }
        summary.push(format!("{target:16} {stats}"));
    }
    eprintln!("\nxtask: fuzz summary ({seconds} s each)");
    for line in &summary {
        eprintln!("  {line}");
    }
    if !failed.is_empty() {
        bail!(
            "fuzzing failed for {} (reproduce: cd fuzz && cargo +nightly fuzz run <target> <artifact>)",
            failed.join(", ")
        );
    }
    Ok(())
}

/// `cargo +nightly fuzz` in fuzz/, with the settings the main workspace's xtask run leaks
/// cleared (the `cargo` we were started by is stable's).
fn cargo_fuzz(fuzz: &Path, obj: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(fuzz)
        .env("SLUICE_EBPF_OBJECT", obj)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .args(["+nightly", "fuzz"]);
    cmd
}

/// Runs one target; returns whether libFuzzer exited cleanly and its final numbers.
fn fuzz_one(
    fuzz: &Path,
    obj: &Path,
    target: &str,
    work: &Path,
    seconds: u64,
) -> Result<(bool, String)> {
    let mut child = cargo_fuzz(fuzz, obj)
        .args(["run", target])
        .arg(work)
        .arg(fuzz.join("corpus").join(target))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={HANG_SECONDS}"))
        // Past the 16 KiB head and URL limits, so the 414/431 branches are reached too.
        .arg("-max_len=20000")
        .arg("-print_final_stats=1")
        .stderr(Stdio::piped())
        .spawn()
        .context("starting cargo fuzz run")?;
    // libFuzzer reports on stderr: pass it through and keep the last status line and the
    // final stats for the summary.
    let (mut status_line, mut execs, mut rate) = (String::new(), String::new(), String::new());
    for line in BufReader::new(child.stderr.take().context("no stderr")?).lines() {
        let line = line?;
        eprintln!("{line}");
        if line.starts_with('#') && line.contains("cov:") {
            status_line = line.clone();
        } else if let Some(v) = line.strip_prefix("stat::number_of_executed_units: ") {
            execs = v.trim().to_owned();
        } else if let Some(v) = line.strip_prefix("stat::average_exec_per_sec: ") {
            rate = v.trim().to_owned();
        }
    }
    let ok = child.wait()?.success();
    let stats = format!(
        "{execs} execs, {rate} exec/s, last: {}",
        status_line.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    Ok((ok, stats))
}

fn files(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

/// Installs cargo-fuzz when `cargo +nightly fuzz` does not run.
fn ensure_cargo_fuzz() -> Result<()> {
    let works = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz");
    // Built by stable like the other tools; the binary drives whichever toolchain it is run
    // with. 0.13.2 is the version this was checked with (nightly 1.97).
    run(Command::new("cargo").env_remove("RUSTUP_TOOLCHAIN").args([
        "+stable",
        "install",
        "cargo-fuzz",
        "--locked",
    ]))
    .context("installing cargo-fuzz")
}
