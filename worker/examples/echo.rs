//! Answers every request with its own body.
use sluice_worker::{Context, Request, Response};

fn main() -> Result<(), sluice_worker::Error> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    sluice_worker::run(|req: &Request<'_>, ctx: &Context| {
        Response::new(200)
            .header("content-type", "application/octet-stream")
            .header("x-sluice-pool", ctx.pool().unwrap_or("standalone"))
            .body(req.body())
    })
}
