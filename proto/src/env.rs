//! What a worker process is started with: its fds in the systemd socket-activation convention
//! (fds 3.. named by `LISTEN_FDNAMES`) and its settings in `SLUICE_*` variables. The front end
//! writes them with [`WorkerSettings::vars`]; a worker reads them with
//! [`WorkerSettings::read`].

use std::time::Duration;

pub const LISTEN_FDS: &str = "LISTEN_FDS";
pub const LISTEN_PID: &str = "LISTEN_PID";
pub const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// First inherited fd.
pub const LISTEN_FDS_START: i32 = 3;

/// fd name of a pool's listening socket (one per listen address and socket).
pub const FD_POOL: &str = "pool";
/// fd name of the workers' end of the pool's handoff channel.
pub const FD_HANDOFF: &str = "handoff";
/// fd name of the worker's own control channel.
pub const FD_CONTROL: &str = "control";

pub const POOL: &str = "SLUICE_POOL";
pub const THREADS: &str = "SLUICE_THREADS";
pub const IDLE_TIMEOUT: &str = "SLUICE_IDLE_TIMEOUT";
pub const HEADER_TIMEOUT: &str = "SLUICE_HEADER_TIMEOUT";
pub const MAX_REQUEST_HEAD: &str = "SLUICE_MAX_REQUEST_HEAD";
pub const MAX_URL: &str = "SLUICE_MAX_URL";
pub const MAX_REQUEST_BODY: &str = "SLUICE_MAX_REQUEST_BODY";
pub const MIN_SEND_RATE: &str = "SLUICE_MIN_SEND_RATE";
pub const CACHE_MAX_ENTRY: &str = "SLUICE_CACHE_MAX_ENTRY";
pub const SHUTDOWN_TIME_LIMIT: &str = "SLUICE_SHUTDOWN_TIME_LIMIT";
/// `1`: send an access-log entry per request on the control channel (`access`).
pub const ACCESS_LOG: &str = "SLUICE_ACCESS_LOG";
/// Standalone only: addresses a worker binds itself.
pub const LISTEN: &str = "SLUICE_LISTEN";

/// Every `SLUICE_*` setting the front end gives a worker. Durations travel as whole seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSettings {
    pub pool: String,
    pub threads: Option<u32>,
    pub idle_timeout: Duration,
    pub header_timeout: Duration,
    pub max_request_head: usize,
    pub max_url: usize,
    pub max_request_body: u64,
    pub min_send_rate: u64,
    pub cache_max_entry: usize,
    pub shutdown_time_limit: Duration,
    pub access_log: bool,
}

/// A variable that does not hold what its name says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {name}={value:?}: {reason}")]
pub struct BadVar {
    pub name: &'static str,
    pub value: String,
    pub reason: String,
}

impl WorkerSettings {
    /// The variables, as (name, value).
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        let secs = |d: Duration| d.as_secs().max(1).to_string();
        let mut v = vec![
            (POOL, self.pool.clone()),
            (IDLE_TIMEOUT, secs(self.idle_timeout)),
            (HEADER_TIMEOUT, secs(self.header_timeout)),
            (MAX_REQUEST_HEAD, self.max_request_head.to_string()),
            (MAX_URL, self.max_url.to_string()),
            (MAX_REQUEST_BODY, self.max_request_body.to_string()),
            (MIN_SEND_RATE, self.min_send_rate.to_string()),
            (CACHE_MAX_ENTRY, self.cache_max_entry.to_string()),
            (SHUTDOWN_TIME_LIMIT, secs(self.shutdown_time_limit)),
            (ACCESS_LOG, u8::from(self.access_log).to_string()),
        ];
        if let Some(t) = self.threads {
            v.push((THREADS, t.to_string()));
        }
        v
    }
}

/// Reads the settings present through `lookup` (a variable's value by name), each into its
/// field of `into`; absent ones leave the field as it is.
pub struct Reader<F: Fn(&str) -> Option<String>>(pub F);

impl<F: Fn(&str) -> Option<String>> Reader<F> {
    fn get<T: std::str::FromStr>(&self, name: &'static str) -> Result<Option<T>, BadVar>
    where
        T::Err: std::fmt::Display,
    {
        let Some(value) = (self.0)(name) else {
            return Ok(None);
        };
        value.trim().parse().map(Some).map_err(|e: T::Err| BadVar {
            name,
            value: value.clone(),
            reason: e.to_string(),
        })
    }

    pub fn number<T: std::str::FromStr>(
        &self,
        name: &'static str,
        into: &mut T,
    ) -> Result<(), BadVar>
    where
        T::Err: std::fmt::Display,
    {
        if let Some(v) = self.get(name)? {
            *into = v;
        }
        Ok(())
    }

    pub fn seconds(&self, name: &'static str, into: &mut Duration) -> Result<(), BadVar> {
        if let Some(v) = self.get::<u64>(name)? {
            *into = Duration::from_secs(v);
        }
        Ok(())
    }

    pub fn text(&self, name: &'static str) -> Option<String> {
        (self.0)(name).filter(|v| !v.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The worker's `Options::from_lookup` test reads back everything `vars` writes.
    #[test]
    fn every_setting_has_one_variable_and_bad_numbers_are_named() {
        let s = WorkerSettings {
            pool: "api".into(),
            threads: Some(3),
            idle_timeout: Duration::from_millis(10),
            header_timeout: Duration::from_secs(9),
            max_request_head: 4000,
            max_url: 300,
            max_request_body: 5,
            min_send_rate: 0,
            cache_max_entry: 1,
            shutdown_time_limit: Duration::from_secs(11),
            access_log: true,
        };
        let vars = s.vars();
        let mut names: Vec<&str> = vars.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 11);
        // A duration under a second still travels as at least one.
        assert!(vars.contains(&(IDLE_TIMEOUT, "1".into())));
        let bad = Reader(|_: &str| Some("x".to_owned()));
        let e = bad.number(MAX_URL, &mut 0usize).unwrap_err();
        assert_eq!(e.name, MAX_URL);
    }
}
