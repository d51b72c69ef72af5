//! Serves the files under a directory, by the request's canonical path, with a
//! `Cache-Control` header so that the front end can cache them (see the worker's `publish.rs`).
//!
//! usage: files --root DIR [--cache-control VALUE] [--listen ADDR]...
//! (`SLUICE_FILES_ROOT` when --root is not given; VALUE defaults to `public, max-age=60`.)
//!
//! Files over 1 MiB are streamed from disk in bounded chunks (`Response::file`); smaller ones
//! are read whole and may be cached. GET and HEAD only (405 otherwise); `/` or a directory serves its `index.html`; 404 for what
//! is missing. Nothing outside DIR is served: canonical paths cannot climb above `/`, segments
//! starting with `.` are refused, and the resolved file (after symlinks) must be under DIR.

use std::path::{Path, PathBuf};

use sluice_worker::{Context, Options, Request, Response};

const DEFAULT_CACHE_CONTROL: &str = "public, max-age=60";
/// Files larger than this are streamed, not read whole.
const STREAM_ABOVE: u64 = 1 << 20;

struct Args {
    root: PathBuf,
    cache_control: String,
    /// Arguments for the worker library (`--listen`).
    rest: Vec<String>,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut root = None;
    let mut cache_control = DEFAULT_CACHE_CONTROL.to_string();
    let mut rest = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => {
                (name.to_string(), Some(value.to_string()))
            }
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{what} needs a value"))
        };
        match name.as_str() {
            "--root" => root = Some(PathBuf::from(value("--root")?)),
            "--cache-control" => cache_control = value("--cache-control")?,
            _ => rest.push(arg),
        }
    }
    let root = root
        .or_else(|| std::env::var_os("SLUICE_FILES_ROOT").map(PathBuf::from))
        .ok_or("--root DIR (or SLUICE_FILES_ROOT) is required")?;
    Ok(Args {
        root,
        cache_control,
        rest,
    })
}

fn content_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("json") => "application/json",
        Some("txt") => "text/plain; charset=utf-8",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("svg") => "image/svg+xml",
        _ => "application/octet-stream",
    }
}

/// The file for a canonical path under `root` (which is itself canonicalized), or None when
/// the path is refused or nothing is there.
fn resolve(root: &Path, canonical: &str) -> Option<PathBuf> {
    let mut path = root.to_path_buf();
    for segment in canonical.split('/').filter(|s| !s.is_empty()) {
        // `%` stays escaped as `%25` in canonical paths.
        let segment = segment.replace("%25", "%");
        if segment.starts_with('.') || segment.contains('/') || segment.contains('\0') {
            return None;
        }
        path.push(segment);
    }
    let mut path = std::fs::canonicalize(&path).ok()?;
    if path.is_dir() {
        path = std::fs::canonicalize(path.join("index.html")).ok()?;
    }
    (path.starts_with(root) && path.is_file()).then_some(path)
}

fn serve(root: &Path, cache_control: &str, req: &Request<'_>, ctx: &Context) -> Response {
    let pool = ctx.pool().unwrap_or("standalone");
    if req.method() != "GET" && req.method() != "HEAD" {
        return Response::text(405, "method not allowed\n")
            .header("allow", "GET, HEAD")
            .header("x-sluice-pool", pool);
    }
    let Some(file) = resolve(root, req.canonical_path()) else {
        return Response::not_found().header("x-sluice-pool", pool);
    };
    let opened = std::fs::File::open(&file).and_then(|f| Ok((f.metadata()?.len(), f)));
    match opened {
        // A large file is streamed in bounded chunks (and never cached); a small one is read
        // whole, so the front end may cache it.
        Ok((len, f)) if len > STREAM_ABOVE => Response::new(200)
            .header("content-type", content_type(&file))
            .header("x-sluice-pool", pool)
            .file(f),
        Ok(_) => match std::fs::read(&file) {
            Ok(body) => Response::new(200)
                .header("content-type", content_type(&file))
                .header("cache-control", cache_control)
                .header("x-sluice-pool", pool)
                .body(body),
            Err(e) => {
                log::warn!("reading {}: {e}", file.display());
                Response::not_found().header("x-sluice-pool", pool)
            }
        },
        Err(e) => {
            log::warn!("reading {}: {e}", file.display());
            Response::not_found().header("x-sluice-pool", pool)
        }
    }
}

fn main() -> Result<(), sluice_worker::Error> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = parse_args(std::env::args().skip(1)).map_err(sluice_worker::Error::Usage)?;
    let root = std::fs::canonicalize(&args.root).map_err(|source| sluice_worker::Error::Os {
        what: "the --root directory",
        source,
    })?;
    log::info!(
        "serving files under {} with Cache-Control: {}",
        root.display(),
        args.cache_control
    );
    let options = Options::from_env()?.with_args(args.rest)?;
    let cache_control = args.cache_control;
    sluice_worker::run_with(options, move |req: &Request<'_>, ctx: &Context| {
        serve(&root, &cache_control, req, ctx)
    })
}
