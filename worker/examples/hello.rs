//! Answers every request with `200` and the pool and pid that served it.
use sluice_worker::{Context, Request, Response};

fn main() -> Result<(), sluice_worker::Error> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    sluice_worker::run(|_req: &Request<'_>, ctx: &Context| {
        let pool = ctx.pool().unwrap_or("standalone");
        Response::text(200, format!("hello from pool {pool} pid {}\n", ctx.pid()))
            .header("x-sluice-pool", pool)
    })
}
