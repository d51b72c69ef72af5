//! The network-namespace sysctls first-segment mode depends on. sluice never changes them
//! silently: it refuses to start unless the config allows it, and then logs every change and
//! restores the old value on exit. The old value is also recorded under [`RECORDS`] (per
//! network namespace) until it is restored, so a front end that died without restoring it
//! (`kill -9`) leaves a record the next start adopts: that one restores it when it exits.

use std::{fs, io, os::unix::fs::MetadataExt, path::PathBuf};

/// Where the values to restore are recorded while sluice has changed them.
pub const RECORDS: &str = "/run/sluice/sysctl";

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("reading {name}: {cause}")]
    Read { name: String, cause: io::Error },
    #[error("setting {name} = {value}: {cause}")]
    Write {
        name: String,
        value: String,
        cause: io::Error,
    },
    #[error(
        "first-segment steering needs {name} = {want} in this network namespace, but it is {have}; \
         set it (`sysctl -w {name}={want}`) or let sluice set it with `[server] set_sysctls = true`"
    )]
    NotSet {
        name: String,
        want: String,
        have: String,
    },
}

fn path(name: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(name.replace('.', "/"))
}

pub fn read(name: &str) -> Result<String, SysctlError> {
    fs::read_to_string(path(name))
        .map(|s| s.trim().to_owned())
        .map_err(|cause| SysctlError::Read {
            name: name.to_owned(),
            cause,
        })
}

fn write(name: &str, value: &str) -> Result<(), SysctlError> {
    fs::write(path(name), value).map_err(|cause| SysctlError::Write {
        name: name.to_owned(),
        value: value.to_owned(),
        cause,
    })
}

/// The record of `name`'s value before sluice changed it, in this network namespace.
fn record(name: &str) -> Option<PathBuf> {
    let netns = fs::metadata("/proc/self/ns/net").ok()?.ino();
    Some(PathBuf::from(RECORDS).join(netns.to_string()).join(name))
}

fn write_record(name: &str, old: &str) {
    let Some(path) = record(name) else { return };
    let result = path
        .parent()
        .map_or(Ok(()), fs::create_dir_all)
        .and_then(|()| fs::write(&path, old));
    if let Err(e) = result {
        log::warn!(
            "recording {name} = {old} in {}: {e} (a crash would leave the change behind)",
            path.display()
        );
    }
}

/// Sysctls changed by sluice, put back on drop.
#[derive(Default)]
pub struct Restore(Vec<(String, String)>);

impl Restore {
    /// Makes sure `name` is `want`: with `may_set` it is changed (and later restored),
    /// otherwise a mismatch is an error naming it. A value a previous front end set and
    /// recorded, and did not restore, is restored by this one.
    pub fn require(&mut self, name: &str, want: &str, may_set: bool) -> Result<(), SysctlError> {
        let have = read(name)?;
        if have == want && self.0.iter().any(|(n, _)| n == name) {
            // Taken over from the program before an upgrade: restored by this one.
            return Ok(());
        }
        let recorded = record(name).and_then(|p| fs::read_to_string(p).ok());
        if have == want {
            if let Some(old) = recorded {
                let old = old.trim().to_owned();
                log::warn!(
                    "{name} = {want} was set by a sluice that did not exit cleanly (it was {old}); \
                     it is restored when this one exits"
                );
                self.0.push((name.to_owned(), old));
            }
            return Ok(());
        }
        if !may_set {
            return Err(SysctlError::NotSet {
                name: name.into(),
                want: want.into(),
                have,
            });
        }
        // Recorded first: a crash between the two leaves a record and the old value, which
        // the next start reads as nothing to adopt.
        write_record(name, &have);
        write(name, want)?;
        log::warn!("set {name} = {want} (was {have}); it is restored when sluice exits");
        self.0.push((name.to_owned(), have));
        Ok(())
    }

    /// What is to be restored, for the next program of this process (an upgrade).
    pub fn entries(&self) -> Vec<(String, String)> {
        self.0.clone()
    }

    /// Takes over what the program before an upgrade was to restore.
    pub fn adopt(&mut self, entries: Vec<(String, String)>) {
        self.0.extend(entries);
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        for (name, old) in self.0.drain(..).rev() {
            match write(&name, &old) {
                Ok(()) => {
                    log::info!("restored {name} = {old}");
                    if let Some(path) = record(&name) {
                        let _ = fs::remove_file(path);
                    }
                }
                Err(e) => log::error!("{e}"),
            }
        }
    }
}
