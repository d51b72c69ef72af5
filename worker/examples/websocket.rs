//! A WebSocket echo server on `/ws` and under `/ws/` (every text or binary message comes back as it was), and
//! `200` with the pool's name on every other path. The HTTP side is sluice-worker's; after the
//! `101` the connection is the handler's own (`Response::upgrade`), and tungstenite speaks
//! the WebSocket protocol on it.

use sluice_worker::{Context, Request, Response, Upgraded};
use tungstenite::{Message, protocol::Role};

fn echo(conn: Upgraded) {
    let (stream, read_ahead) = conn.into_parts();
    let mut ws =
        tungstenite::WebSocket::from_partially_read(stream, read_ahead, Role::Server, None);
    loop {
        match ws.read() {
            Ok(msg @ (Message::Text(_) | Message::Binary(_))) => {
                if ws.send(msg).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return;
            }
            Err(e) => {
                log::debug!("websocket: {e}");
                return;
            }
        }
    }
}

fn main() -> Result<(), sluice_worker::Error> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    sluice_worker::run(|req: &Request<'_>, ctx: &Context| {
        let pool = ctx.pool().unwrap_or("standalone");
        let key = req.header("sec-websocket-key");
        let websocket = req
            .header("upgrade")
            .is_some_and(|u| u.eq_ignore_ascii_case(b"websocket"));
        let ws_path = req.path() == "/ws" || req.path().starts_with("/ws/");
        match (ws_path, websocket, key) {
            (true, true, Some(key)) => Response::upgrade(echo)
                .header("upgrade", "websocket")
                .header(
                    "sec-websocket-accept",
                    tungstenite::handshake::derive_accept_key(key),
                )
                .header("x-sluice-pool", pool),
            (true, _, _) => Response::text(426, "a WebSocket upgrade is needed\n")
                .header("upgrade", "websocket"),
            _ => Response::text(200, format!("websocket pool {pool}\n"))
                .header("x-sluice-pool", pool),
        }
    })
}
