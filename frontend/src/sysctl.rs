//! The network-namespace sysctls first-segment mode depends on. sluice never changes them
//! silently: it refuses to start unless the config allows it, and then logs every change and
//! restores the old value on exit.

use std::{fs, io, path::PathBuf};

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

/// Sysctls changed by sluice, put back on drop.
#[derive(Default)]
pub struct Restore(Vec<(String, String)>);

impl Restore {
    /// Makes sure `name` is `want`: with `may_set` it is changed (and later restored),
    /// otherwise a mismatch is an error naming it.
    pub fn require(&mut self, name: &str, want: &str, may_set: bool) -> Result<(), SysctlError> {
        let have = read(name)?;
        if have == want {
            return Ok(());
        }
        if !may_set {
            return Err(SysctlError::NotSet {
                name: name.into(),
                want: want.into(),
                have,
            });
        }
        write(name, want)?;
        log::warn!("set {name} = {want} (was {have}); it is restored when sluice exits");
        self.0.push((name.to_owned(), have));
        Ok(())
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        for (name, old) in self.0.drain(..).rev() {
            match write(&name, &old) {
                Ok(()) => log::info!("restored {name} = {old}"),
                Err(e) => log::error!("{e}"),
            }
        }
    }
}
