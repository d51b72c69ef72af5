//! The access log: one line per request, in `combined` or `json` form, written by one thread
//! of the front end. Entries come from the dispatcher (what the front end answered itself)
//! and from the workers' control channels; the pool and the worker pid of a line are the
//! channel's, never what a worker says. A full queue drops lines (counted) rather than
//! slowing the requests down.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use sluice_proto::access::Entry;

use crate::config::{AccessLogConfig, LogFormat};
use crate::dates::civil;

/// Lines waiting for the writer; past it they are dropped.
const QUEUE: usize = 64 * 1024;
/// The writer flushes when it has waited this long for a line.
const FLUSH_AFTER: Duration = Duration::from_millis(200);

/// One line: an entry and who answered it.
#[derive(Debug, Clone)]
pub struct Record {
    pub entry: Entry,
    /// The pool the request went to (None: the front end answered it without one).
    pub pool: Option<Arc<str>>,
    /// The worker that answered (None: the front end).
    pub pid: Option<u32>,
}

enum Message {
    Lines(Vec<Record>),
    Reopen,
}

/// A handle to the writer thread; clones share it.
#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<Message>,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// Opens the log (appending) and starts its writer.
    pub fn start(config: &AccessLogConfig) -> io::Result<AccessLog> {
        let out = Output::open(config.file.clone())?;
        let (tx, rx) = sync_channel(QUEUE);
        let format = config.format;
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(rx, out, format))?;
        Ok(AccessLog {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn record(&self, records: Vec<Record>) {
        if records.is_empty() {
            return;
        }
        let n = records.len() as u64;
        match self.tx.try_send(Message::Lines(records)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                if self.dropped.fetch_add(n, Ordering::Relaxed) == 0 {
                    log::warn!("access log: the writer is behind; lines are dropped (counted)");
                }
            }
        }
    }

    /// Reopens the file (after logrotate moved it; SIGUSR1).
    pub fn reopen(&self) {
        let _ = self.tx.try_send(Message::Reopen);
    }

    /// Lines dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

enum Output {
    Stderr(io::Stderr),
    File(PathBuf, BufWriter<File>),
}

impl Output {
    fn open(file: Option<PathBuf>) -> io::Result<Output> {
        match file {
            None => Ok(Output::Stderr(io::stderr())),
            Some(path) => {
                let f = OpenOptions::new().create(true).append(true).open(&path)?;
                Ok(Output::File(path, BufWriter::with_capacity(64 * 1024, f)))
            }
        }
    }

    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Output::Stderr(e) => e,
            Output::File(_, w) => w,
        }
    }
}

fn write_loop(rx: Receiver<Message>, mut out: Output, format: LogFormat) {
    let mut line = String::with_capacity(512);
    loop {
        let msg = match rx.recv_timeout(FLUSH_AFTER) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => {
                let _ = out.writer().flush();
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        match msg {
            Message::Lines(records) => {
                for r in &records {
                    line.clear();
                    format_line(&mut line, r, format);
                    if let Err(e) = out.writer().write_all(line.as_bytes()) {
                        log::warn!("access log: {e}");
                    }
                }
            }
            Message::Reopen => {
                let _ = out.writer().flush();
                if let Output::File(path, _) = &out {
                    match Output::open(Some(path.clone())) {
                        Ok(o) => {
                            log::info!("access log: reopened {}", path.display());
                            out = o;
                        }
                        Err(e) => log::warn!("access log: reopening {}: {e}", path.display()),
                    }
                }
            }
        }
    }
    let _ = out.writer().flush();
}

fn dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

/// Appends `r` as one line (with its newline). Entry text is `access::clean`, so it holds no
/// quote and no control byte; JSON still escapes its backslashes.
pub fn format_line(out: &mut String, r: &Record, format: LogFormat) {
    use std::fmt::Write as _;
    let e = &r.entry;
    let secs = e.time_ms / 1000;
    let c = civil(secs);
    let pool = r.pool.as_deref().unwrap_or("-");
    let pid = r.pid.map_or("-".to_owned(), |p| p.to_string());
    let duration_ms = e.duration_us as f64 / 1000.0;
    match format {
        LogFormat::Combined => {
            let client = e.client.map_or("-".to_owned(), |a| a.ip().to_string());
            let request = if e.protocol.is_empty() {
                format!("{} {}", dash(&e.method), dash(&e.target))
            } else {
                format!("{} {} {}", dash(&e.method), dash(&e.target), e.protocol)
            };
            let _ = writeln!(
                out,
                "{client} - - [{:02}/{}/{}:{:02}:{:02}:{:02} +0000] \"{request}\" {} {} \"{}\" \"{}\" {} {duration_ms:.3} {pool} {pid} {}",
                c.day,
                c.month_name(),
                c.year,
                c.hour,
                c.minute,
                c.second,
                e.status,
                e.bytes,
                dash(&e.referer),
                dash(&e.user_agent),
                dash(&e.host),
                e.arrival,
            );
        }
        LogFormat::Json => {
            let text = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\"));
            let opt = |s: Option<String>| s.unwrap_or_else(|| "null".to_owned());
            let _ = writeln!(
                out,
                "{{\"time\":\"{}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z\",\"client\":{},\"method\":{},\"target\":{},\"protocol\":{},\"host\":{},\"status\":{},\"bytes\":{},\"duration_ms\":{duration_ms:.3},\"pool\":{},\"pid\":{},\"arrival\":\"{}\",\"referer\":{},\"user_agent\":{}}}",
                c.year,
                c.month,
                c.day,
                c.hour,
                c.minute,
                c.second,
                e.time_ms % 1000,
                opt(e.client.map(|a| text(&a.to_string()))),
                text(&e.method),
                text(&e.target),
                text(&e.protocol),
                text(&e.host),
                e.status,
                e.bytes,
                opt(r.pool.as_deref().map(text)),
                opt(r.pid.map(|p| p.to_string())),
                e.arrival,
                text(&e.referer),
                text(&e.user_agent),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_proto::access::{Arrival, clean};

    fn record() -> Record {
        Record {
            entry: Entry {
                time_ms: 784_111_777_042,
                client: Some("10.0.0.1:5000".parse().unwrap()),
                method: "GET".into(),
                target: clean(b"/a\"b\\c"),
                protocol: "HTTP/1.1".into(),
                host: "shop.test".into(),
                status: 200,
                bytes: 5,
                duration_us: 1500,
                arrival: Arrival::Kernel,
                referer: String::new(),
                user_agent: "curl/8".into(),
            },
            pool: Some("shop".into()),
            pid: Some(42),
        }
    }

    #[test]
    fn combined_lines_are_apaches_then_sluices_fields() {
        let mut s = String::new();
        format_line(&mut s, &record(), LogFormat::Combined);
        assert_eq!(
            s,
            "10.0.0.1 - - [06/Nov/1994:08:49:37 +0000] \"GET /a\\x22b\\x5cc HTTP/1.1\" 200 5 \"-\" \"curl/8\" shop.test 1.500 shop 42 kernel\n"
        );
    }

    #[test]
    fn json_lines_parse_and_hold_every_field() {
        let mut s = String::new();
        let mut r = record();
        r.pid = None;
        format_line(&mut s, &r, LogFormat::Json);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["time"], "1994-11-06T08:49:37.042Z");
        assert_eq!(v["target"], "/a\\x22b\\x5cc");
        assert_eq!(v["client"], "10.0.0.1:5000");
        assert_eq!(
            (v["status"].as_u64(), v["bytes"].as_u64()),
            (Some(200), Some(5))
        );
        assert_eq!(v["pid"], serde_json::Value::Null);
        assert_eq!(
            (v["pool"].as_str(), v["arrival"].as_str()),
            (Some("shop"), Some("kernel"))
        );
    }
}
