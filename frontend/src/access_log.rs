//! The access log: one line per request, in `combined` or `json` form, written by one thread
//! of the front end. Entries come from the dispatcher (what the front end answered itself)
//! and from the workers' control channels; the pool and the worker pid of a line are the
//! channel's, never what a worker says. A full queue drops lines (counted) rather than
//! slowing the requests down.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::time::Duration;

use sluice_proto::access::Entry;

use crate::config::{AccessLogConfig, LogFormat};
use crate::dates::civil;

/// Records waiting for the writer; past it they are dropped.
const QUEUE: usize = 64 * 1024;
/// Bytes of lines waiting for the writer; past it they are dropped (a worker flooding lines
/// while the disk is slow must not grow the front end).
const QUEUED_BYTES: usize = 64 << 20;
/// The writer flushes when it has waited this long for a line.
const FLUSH_AFTER: Duration = Duration::from_millis(200);

/// Lines of one answerer: entries as `access::Report::encode_into` wrote them (checked here,
/// by `access::Entry::decode`), and who answered them.
#[derive(Debug, Clone)]
pub struct Record {
    pub lines: String,
    /// The pool the requests went to (None: the front end answered without one).
    pub pool: Option<Arc<str>>,
    /// The worker that answered (None: the front end).
    pub pid: Option<u32>,
}

/// An answer the front end gave itself (a cache hit, a refusal, a redirect), on the
/// dispatcher's connections or over TLS.
pub struct Answered<'a> {
    pub fd: std::os::fd::RawFd,
    /// The request's bytes, from its first one (the head is read for the line).
    pub head: &'a [u8],
    pub status: u16,
    /// Bytes of the body sent.
    pub bytes: u64,
    /// How long it took from the request to the answer.
    pub duration: Duration,
    pub arrival: sluice_proto::access::Arrival,
    /// The pool the request routed to, if any.
    pub pool: Option<Arc<str>>,
}

/// Bytes of the body of a complete answer (what follows its head).
pub fn body_len(answer: &[u8]) -> u64 {
    answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(0, |end| (answer.len() - end - 4) as u64)
}

enum Message {
    Lines(Record),
    Reopen,
}

/// A handle to the writer thread; clones share it.
#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<Message>,
    dropped: Arc<AtomicU64>,
    malformed: Arc<AtomicU64>,
    /// Bytes of lines sent to the writer and not written yet, and their limit.
    queued: Arc<AtomicUsize>,
    max_queued: usize,
}

impl AccessLog {
    /// Opens the log (appending) and starts its writer.
    pub fn start(config: &AccessLogConfig) -> io::Result<AccessLog> {
        let out = Output::open(config.file.clone())?;
        let (log, rx) = AccessLog::channel(QUEUED_BYTES);
        let format = config.format;
        let (bad, queued) = (log.malformed.clone(), log.queued.clone());
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(rx, out, format, &bad, &queued))?;
        Ok(log)
    }

    /// The handle and the writer's end of its queue.
    fn channel(max_queued: usize) -> (AccessLog, Receiver<Message>) {
        let (tx, rx) = sync_channel(QUEUE);
        let log = AccessLog {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
            malformed: Arc::new(AtomicU64::new(0)),
            queued: Arc::new(AtomicUsize::new(0)),
            max_queued,
        };
        (log, rx)
    }

    pub fn record(&self, record: Record) {
        if record.lines.is_empty() {
            return;
        }
        let n = record.lines.lines().count() as u64;
        let bytes = record.lines.len();
        let full = self.queued.fetch_add(bytes, Ordering::Relaxed) + bytes > self.max_queued;
        if full || self.tx.try_send(Message::Lines(record)).is_err() {
            self.queued.fetch_sub(bytes, Ordering::Relaxed);
            if self.dropped.fetch_add(n, Ordering::Relaxed) == 0 {
                log::warn!("access log: the writer is behind; lines are dropped (counted)");
            }
        }
    }

    /// Logs what the front end answered itself.
    pub fn answered(&self, a: Answered<'_>) {
        let d = sluice_proto::access::describe(a.head);
        let mut lines = String::new();
        sluice_proto::access::Report {
            time_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |t| t.as_millis() as u64),
            client: sluice_proto::sockaddr::peer(a.fd),
            bytes: if d.method == b"HEAD" { 0 } else { a.bytes },
            method: d.method,
            target: d.target,
            protocol: d.protocol,
            host: &d.host,
            status: a.status,
            duration_us: a.duration.as_micros() as u64,
            arrival: a.arrival,
            referer: d.referer,
            user_agent: d.user_agent,
        }
        .encode_into(&mut lines);
        self.record(Record {
            lines,
            pool: a.pool,
            pid: None,
        });
    }

    /// Reopens the file (after logrotate moved it; SIGUSR1).
    pub fn reopen(&self) {
        let _ = self.tx.try_send(Message::Reopen);
    }

    /// Lines dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Lines from workers that were not entries (dropped).
    pub fn malformed(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
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

fn write_loop(
    rx: Receiver<Message>,
    mut out: Output,
    format: LogFormat,
    malformed: &AtomicU64,
    queued: &AtomicUsize,
) {
    let mut line = String::with_capacity(512);
    let mut dates = Dates::default();
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
            Message::Lines(r) => {
                queued.fetch_sub(r.lines.len(), Ordering::Relaxed);
                for text in r.lines.lines() {
                    let Some(entry) = Entry::decode(text) else {
                        if malformed.fetch_add(1, Ordering::Relaxed) == 0 {
                            log::warn!(
                                "access log: dropped a line that is not an entry (pool {}, pid {:?}); \
                                 later ones are only counted",
                                r.pool.as_deref().unwrap_or("-"),
                                r.pid
                            );
                        }
                        continue;
                    };
                    line.clear();
                    format_line(
                        &mut line,
                        &mut dates,
                        &entry,
                        r.pool.as_deref(),
                        r.pid,
                        format,
                    );
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

fn push_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend(digits[i..].iter().map(|&d| d as char));
}

/// `n` (below 1000) as three digits.
fn push_3(out: &mut String, n: u64) {
    for d in [n / 100 % 10, n / 10 % 10, n % 10] {
        out.push((b'0' + d as u8) as char);
    }
}

/// Microseconds as milliseconds, `m.uuu` (the log's duration).
fn push_millis(out: &mut String, us: u64) {
    push_u64(out, us / 1000);
    out.push('.');
    push_3(out, us % 1000);
}

/// A JSON string of clean text (only its backslashes need escaping).
fn push_json(out: &mut String, s: &str) {
    out.push('"');
    for part in s.split_inclusive('\\') {
        out.push_str(part);
        if part.ends_with('\\') {
            out.push('\\');
        }
    }
    out.push('"');
}

/// The date part of a line, made once a second.
#[derive(Default)]
pub struct Dates {
    second: Option<u64>,
    combined: String,
    iso: String,
}

impl Dates {
    fn at(&mut self, secs: u64) -> (&str, &str) {
        if self.second != Some(secs) {
            let c = civil(secs);
            self.combined = format!(
                "[{:02}/{}/{}:{:02}:{:02}:{:02} +0000]",
                c.day,
                c.month_name(),
                c.year,
                c.hour,
                c.minute,
                c.second
            );
            self.iso = format!(
                "{}-{:02}-{:02}T{:02}:{:02}:{:02}",
                c.year, c.month, c.day, c.hour, c.minute, c.second
            );
            self.second = Some(secs);
        }
        (&self.combined, &self.iso)
    }
}

/// The client's IP address in an entry's `address:port` text (brackets dropped).
fn client_ip(addr: &str) -> &str {
    let ip = addr.rsplit_once(':').map_or(addr, |(ip, _)| ip);
    ip.trim_start_matches('[').trim_end_matches(']')
}

/// Appends `e` as one line (with its newline). Entry text is `access::clean`, so it holds no
/// quote and no control byte; JSON still escapes its backslashes.
pub fn format_line(
    out: &mut String,
    dates: &mut Dates,
    e: &Entry<'_>,
    pool: Option<&str>,
    pid: Option<u32>,
    format: LogFormat,
) {
    let (combined, iso) = dates.at(e.time_ms / 1000);
    match format {
        LogFormat::Combined => {
            out.push_str(e.client.map_or("-", client_ip));
            out.push_str(" - - ");
            out.push_str(combined);
            out.push_str(" \"");
            out.push_str(dash(e.method));
            out.push(' ');
            out.push_str(dash(e.target));
            if !e.protocol.is_empty() {
                out.push(' ');
                out.push_str(e.protocol);
            }
            out.push_str("\" ");
            push_u64(out, u64::from(e.status));
            out.push(' ');
            push_u64(out, e.bytes);
            out.push_str(" \"");
            out.push_str(dash(e.referer));
            out.push_str("\" \"");
            out.push_str(dash(e.user_agent));
            out.push_str("\" ");
            // Unquoted: a space in a (refused, raw) host must not shift the fields after it.
            for part in dash(e.host).split(' ').enumerate() {
                if part.0 > 0 {
                    out.push_str("\\x20");
                }
                out.push_str(part.1);
            }
            out.push(' ');
            push_millis(out, e.duration_us);
            out.push(' ');
            out.push_str(pool.unwrap_or("-"));
            out.push(' ');
            match pid {
                Some(p) => push_u64(out, u64::from(p)),
                None => out.push('-'),
            }
            out.push(' ');
            out.push_str(e.arrival.as_str());
            out.push('\n');
        }
        LogFormat::Json => {
            out.push_str("{\"time\":\"");
            out.push_str(iso);
            out.push('.');
            push_3(out, e.time_ms % 1000);
            out.push_str("Z\",\"client\":");
            match e.client {
                Some(c) => push_json(out, c),
                None => out.push_str("null"),
            }
            for (name, value) in [
                ("method", e.method),
                ("target", e.target),
                ("protocol", e.protocol),
                ("host", e.host),
            ] {
                out.push_str(",\"");
                out.push_str(name);
                out.push_str("\":");
                push_json(out, value);
            }
            out.push_str(",\"status\":");
            push_u64(out, u64::from(e.status));
            out.push_str(",\"bytes\":");
            push_u64(out, e.bytes);
            out.push_str(",\"duration_ms\":");
            push_millis(out, e.duration_us);
            out.push_str(",\"pool\":");
            match pool {
                Some(p) => push_json(out, p),
                None => out.push_str("null"),
            }
            out.push_str(",\"pid\":");
            match pid {
                Some(p) => push_u64(out, u64::from(p)),
                None => out.push_str("null"),
            }
            out.push_str(",\"arrival\":\"");
            out.push_str(e.arrival.as_str());
            out.push_str("\",\"referer\":");
            push_json(out, e.referer);
            out.push_str(",\"user_agent\":");
            push_json(out, e.user_agent);
            out.push_str("}\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_proto::access::{Arrival, Report};

    fn line() -> String {
        let mut s = String::new();
        Report {
            time_ms: 784_111_777_042,
            client: Some("10.0.0.1:5000".parse().unwrap()),
            method: b"GET",
            target: b"/a\"b\\c",
            protocol: b"HTTP/1.1",
            host: b"shop.test",
            status: 200,
            bytes: 5,
            duration_us: 1500,
            arrival: Arrival::Kernel,
            referer: b"",
            user_agent: b"curl/8",
        }
        .encode_into(&mut s);
        s
    }

    /// `text` (one encoded line) as the writer writes it.
    fn formatted(text: &str, pool: Option<&str>, pid: Option<u32>, format: LogFormat) -> String {
        let e = Entry::decode(text.trim_end()).unwrap();
        let mut s = String::new();
        format_line(&mut s, &mut Dates::default(), &e, pool, pid, format);
        s
    }

    #[test]
    fn combined_lines_are_apaches_then_sluices_fields() {
        let text = line();
        let s = formatted(&text, Some("shop"), Some(42), LogFormat::Combined);
        assert_eq!(
            s,
            "10.0.0.1 - - [06/Nov/1994:08:49:37 +0000] \"GET /a\\x22b\\x5cc HTTP/1.1\" 200 5 \"-\" \"curl/8\" shop.test 1.500 shop 42 kernel\n"
        );
    }

    #[test]
    fn a_host_with_spaces_cannot_shift_the_pool_and_pid_fields() {
        let text = line().replace("shop.test", "x 0.001 otherpool 1 kernel");
        let s = formatted(&text, Some("shop"), Some(42), LogFormat::Combined);
        let tail: Vec<&str> = s.rsplit('"').next().unwrap().split_whitespace().collect();
        assert_eq!(
            tail,
            [
                "x\\x200.001\\x20otherpool\\x201\\x20kernel",
                "1.500",
                "shop",
                "42",
                "kernel"
            ]
        );
    }

    #[test]
    fn lines_past_the_queued_bytes_are_dropped_and_counted() {
        let (log, rx) = AccessLog::channel(1000);
        let record = |n: usize| Record {
            lines: line().repeat(n),
            pool: None,
            pid: None,
        };
        log.record(record(3));
        assert_eq!(log.dropped(), 0);
        log.record(record(20));
        assert_eq!(
            log.dropped(),
            20,
            "over the limit while the writer is behind"
        );
        drop(rx);
        log.record(record(1));
        assert_eq!(log.dropped(), 21, "no writer");
    }

    #[test]
    fn json_lines_parse_and_hold_every_field() {
        let text = line();
        let s = formatted(&text, Some("shop"), None, LogFormat::Json);
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
