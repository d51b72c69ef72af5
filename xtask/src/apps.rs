//! The application servers the tests run as socket-pool workers: gunicorn, uvicorn and the
//! `websockets` client from PyPI, in a virtual environment made from the system Python (so
//! a pool's own uid can run it), and Node.js from Debian's packages.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::{run, toolchain};

/// Makes the environment if it is missing or its requirements changed; returns its `bin`.
pub fn ensure(root: &Path, reachable: bool) -> Result<PathBuf> {
    toolchain::ensure_packages(&[("node", "nodejs"), ("python3", "python3-venv")])?;
    let requirements = root.join("tests/workers/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    // Pool workers run as uids of their own: the environment must be where they can reach.
    let venv = if reachable {
        root.join(".tools/apps")
    } else {
        std::env::temp_dir().join("sluice-test-apps")
    };
    let stamp = venv.join("requirements.installed");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(venv.join("bin"));
    }
    eprintln!(
        "xtask: installing the test application servers into {}",
        venv.display()
    );
    let python = if Path::new("/usr/bin/python3").is_file() {
        PathBuf::from("/usr/bin/python3")
    } else {
        PathBuf::from("python3")
    };
    let _ = std::fs::remove_dir_all(&venv);
    run(Command::new(&python).arg("-m").arg("venv").arg(&venv))
        .context("making the virtual environment (Debian: python3-venv)")?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "--disable-pip-version-check", "-r"])
        .arg(&requirements))
    .context("installing the test application servers from PyPI")?;
    std::fs::write(&stamp, wanted)?;
    Ok(venv.join("bin"))
}
