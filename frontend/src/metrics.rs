//! The Prometheus text endpoint: a small thread that answers `GET /metrics` with what the
//! controller gives on its admin socket (`metrics`), so it reads nothing the controller owns.
//! Each scrape gets a thread of its own (a few at once), so an idle connection delays nobody.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result};

/// Scrapes answered at once; more connections are closed.
const MAX_SCRAPES: usize = 8;

pub fn serve(addr: SocketAddr, admin: PathBuf) -> Result<()> {
    let listener =
        TcpListener::bind(addr).with_context(|| format!("binding the metrics address {addr}"))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let busy = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            for stream in listener.incoming().flatten() {
                use std::sync::atomic::Ordering::SeqCst;
                if busy.fetch_add(1, SeqCst) >= MAX_SCRAPES {
                    busy.fetch_sub(1, SeqCst);
                    continue;
                }
                let (admin, done) = (admin.clone(), busy.clone());
                let spawned = std::thread::Builder::new()
                    .name("metrics-scrape".into())
                    .spawn(move || {
                        if let Err(e) = answer(stream, &admin) {
                            log::debug!("metrics: {e}");
                        }
                        done.fetch_sub(1, SeqCst);
                    });
                if let Err(e) = spawned {
                    busy.fetch_sub(1, SeqCst);
                    log::warn!("metrics: {e}");
                }
            }
        })?;
    Ok(())
}

fn answer(mut stream: TcpStream, admin: &PathBuf) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let target = line.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = if target == "/metrics" {
        match crate::admin::ask(admin, "metrics") {
            Ok(text) => ("200 OK", text),
            Err(e) => ("503 Service Unavailable", format!("{e}\n")),
        }
    } else {
        ("404 Not Found", "try /metrics\n".to_owned())
    };
    stream.write_all(crate::answers::metrics(status, &body).as_bytes())
}
