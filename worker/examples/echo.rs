//! Answers every request with its own body, and says in headers who the client is and how
//! its connection got here (`x-sluice-client`, `x-sluice-arrival`).
use sluice_worker::{Context, Request, Response};

fn main() -> Result<(), sluice_worker::Error> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    sluice_worker::run(|req: &Request<'_>, ctx: &Context| {
        Response::new(200)
            .header("content-type", "application/octet-stream")
            .header("x-sluice-pool", ctx.pool().unwrap_or("standalone"))
            .header(
                "x-sluice-client",
                ctx.peer().map_or("unknown".into(), |a| a.to_string()),
            )
            .header(
                "x-sluice-arrival",
                ctx.arrival().map_or("unknown", |a| a.as_str()),
            )
            .body(req.body())
    })
}
