//! Helpers for the tests of `sluice upgrade`: the front end runs from a copy of the binary,
//! and a new one (or a broken one) is put at that path.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use crate::{Sluice, sluice_bin};

/// A copy of the sluice binary in a folder of the test's own.
pub fn binary_copy(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-upgrade-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("sluice");
    std::fs::copy(sluice_bin(), &path).expect("copy sluice");
    path
}

/// Puts a new file at `path` (a new inode, as an install does), from `from` or the text of a
/// script.
pub fn install(path: &Path, content: Result<&Path, &str>) {
    let new = path.with_extension("new");
    match content {
        Ok(from) => {
            std::fs::copy(from, &new).expect("copy");
        }
        Err(script) => std::fs::write(&new, script).expect("script"),
    }
    std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::rename(&new, path).expect("rename");
}

pub fn upgrade(s: &Sluice) -> Output {
    Command::new(sluice_bin())
        .args(["upgrade", "--admin"])
        .arg(&s.admin)
        .output()
        .expect("sluice upgrade")
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Puts at `path` a program that passes `check` but cannot start (it runs with a config
/// that does not exist), so the upgrade goes back to the earlier program.
pub fn install_unstartable(path: &Path) {
    install(
        path,
        Err(&format!(
            "#!/bin/sh\nif [ \"$1\" = check ]; then exec {0} \"$@\"; fi\nexec {0} run /nonexistent/sluice.toml\n",
            sluice_bin().display()
        )),
    );
}

/// `sluice upgrade` failed, naming why the new program could not start.
pub fn assert_went_back(out: &Output) {
    assert!(!out.status.success(), "{}", text(out));
    assert!(
        text(out).contains("/nonexistent/sluice.toml"),
        "{}",
        text(out)
    );
}

/// The program the process runs is the file now at `path` (not an earlier, replaced one).
pub fn runs_current_file(pid: u32, path: &Path) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|l| l == path)
}
