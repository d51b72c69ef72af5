//! A socket worker's stdout and stderr, read from its pipe and logged line by line under
//! its pool and pid (`log` target `worker`). Lines are cut at `MAX_LINE` bytes, so a worker
//! that never ends a line costs no more than that.

use std::{io::Read, os::fd::OwnedFd};

const MAX_LINE: usize = 8 * 1024;

/// Reads `pipe` until every writer is gone (the worker and the children it started).
pub fn forward(pool: String, pid: libc::pid_t, pipe: OwnedFd) {
    let name = pool.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("sluice-out-{pid}"))
        .spawn(move || {
            let mut file = std::fs::File::from(pipe);
            let mut line: Vec<u8> = Vec::with_capacity(256);
            let mut buf = [0u8; 4096];
            loop {
                let n = match file.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                for &b in &buf[..n] {
                    if b == b'\n' || line.len() >= MAX_LINE {
                        emit(&pool, pid, &line);
                        line.clear();
                        if b == b'\n' {
                            continue;
                        }
                    }
                    line.push(b);
                }
            }
            if !line.is_empty() {
                emit(&pool, pid, &line);
            }
        });
    if let Err(e) = spawned {
        log::warn!("pool {name}: cannot read worker {pid}'s output: {e}");
    }
}

fn emit(pool: &str, pid: libc::pid_t, line: &[u8]) {
    let line = String::from_utf8_lossy(line);
    let line = line.trim_end_matches('\r');
    log::info!(target: "worker", "pool {pool}[{pid}]: {line}");
}
