//! Takes uploads as they arrive: the body of every request goes to a sink that counts its
//! bytes and hashes them (FNV-1a, 64 bit), and the answer says `received N bytes fnv HEX`.
//! The worker never holds more than one read of a body, whatever its size.

use sluice_worker::{BodySink, Context, Handler, Request, Response};

const FNV_OFFSET: u64 = 0xcbf29ce484222325;
const FNV_PRIME: u64 = 0x100000001b3;

struct Count {
    bytes: u64,
    hash: u64,
}

impl Count {
    fn new() -> Count {
        Count {
            bytes: 0,
            hash: FNV_OFFSET,
        }
    }

    fn add(&mut self, chunk: &[u8]) {
        self.bytes += chunk.len() as u64;
        for &b in chunk {
            self.hash = (self.hash ^ u64::from(b)).wrapping_mul(FNV_PRIME);
        }
    }

    fn answer(&self) -> Response {
        Response::text(
            200,
            format!("received {} bytes fnv {:016x}\n", self.bytes, self.hash),
        )
    }
}

impl BodySink for Count {
    fn data(&mut self, chunk: &[u8]) {
        self.add(chunk);
    }

    fn finish(self: Box<Self>, _req: &Request<'_>) -> Response {
        self.answer()
    }
}

struct Upload;

impl Handler for Upload {
    /// A body that arrived with its head (a small one) is counted here.
    fn handle(&self, req: &Request<'_>, _ctx: &Context<'_>) -> Response {
        let mut c = Count::new();
        c.add(req.body());
        c.answer()
    }

    fn stream_body(&self, _req: &Request<'_>, _ctx: &Context<'_>) -> Option<Box<dyn BodySink>> {
        Some(Box::new(Count::new()))
    }
}

fn main() -> Result<(), sluice_worker::Error> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    sluice_worker::run(Upload)
}
