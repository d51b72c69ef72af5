//! One connection's handshake, done by rustls, and the session taken out of it when it ends.
//!
//! rustls is fed whole records only, one at a time, and none after the handshake: so when
//! it ends, rustls holds no part of a record that is not ours to hand on, and every byte the
//! client sent after its Finished is still in our buffer for the record layer. The tickets
//! rustls writes after the handshake go out before anything sealed later.

use std::{
    io::Read,
    sync::{Arc, Mutex},
};

use rustls::{ConnectionTrafficSecrets, ProtocolVersion, ServerConnection};
use sluice_tls::{Direction, Protocol, Session, Suite};

/// The TLS 1.3 traffic secrets rustls logs while a TLS loop drives one connection's
/// handshake. rustls logs from the thread that drives the handshake, and each loop drives one
/// connection at a time, so what a thread logged during its calls is that connection's: each
/// entry is kept under its thread, and a loop takes only its own. The worker derives its
/// next keys from them on a KeyUpdate.
#[derive(Debug, Default)]
pub struct Secrets(Mutex<Vec<(std::thread::ThreadId, bool, Vec<u8>)>>);

const CLIENT: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER: &str = "SERVER_TRAFFIC_SECRET_0";

impl rustls::KeyLog for Secrets {
    fn will_log(&self, label: &str) -> bool {
        label == CLIENT || label == SERVER
    }

    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        if let Ok(mut v) = self.0.lock() {
            let me = std::thread::current().id();
            v.push((me, label == CLIENT, secret.to_vec()));
        }
    }
}

impl Secrets {
    /// What this thread's handshake logged.
    fn drain(&self) -> Vec<(bool, Vec<u8>)> {
        let me = std::thread::current().id();
        let Ok(mut v) = self.0.lock() else {
            return Vec::new();
        };
        let (mine, others) = std::mem::take(&mut *v)
            .into_iter()
            .partition::<Vec<_>, _>(|(t, _, _)| *t == me);
        *v = others;
        mine.into_iter().map(|(_, c, s)| (c, s)).collect()
    }
}

pub struct Handshake {
    conn: ServerConnection,
    client_secret: Vec<u8>,
    server_secret: Vec<u8>,
    /// A record was fed: from here on the handshake lives in rustls, which cannot hand it on.
    begun: bool,
}

/// Where a handshake stands after the bytes so far.
pub enum Step {
    /// Needs more of the client's records.
    More,
    /// Failed: the alert for the client is in the output; the reason is for the log.
    Failed(String),
    /// Over: `finish` takes the session out.
    Ready,
}

pub struct Done {
    pub session: Session,
    /// Application data rustls decrypted before the handshake was seen to end.
    pub plaintext: Vec<u8>,
}

/// The length of the whole record at the start of `buf`, once it is all there.
pub fn record_len(buf: &[u8]) -> Option<usize> {
    let len = declared_len(buf)?;
    (buf.len() >= len).then_some(len)
}

/// Whether the bytes at the start of `buf` can begin a TLS record: a content type TLS has
/// (change_cipher_spec, alert, handshake, application_data) and major version 3.
fn starts_a_record(buf: &[u8]) -> bool {
    buf.first().is_none_or(|t| (20..=23).contains(t)) && buf.get(1).is_none_or(|&v| v == 3)
}

/// The length, header included, that the record at the start of `buf` says it has.
fn declared_len(buf: &[u8]) -> Option<usize> {
    let header = buf.get(..5)?;
    Some(5 + u16::from_be_bytes([header[3], header[4]]) as usize)
}

impl Handshake {
    pub fn new(config: Arc<rustls::ServerConfig>) -> Result<Handshake, rustls::Error> {
        Ok(Handshake {
            conn: ServerConnection::new(config)?,
            client_secret: Vec::new(),
            server_secret: Vec::new(),
            begun: false,
        })
    }

    /// Whether rustls has been fed a record yet. A handshake that has not begun is nothing
    /// but the bytes received: another handshake can start from them.
    pub fn begun(&self) -> bool {
        self.begun
    }

    /// Feeds the whole records at the start of `input` (drained as they are taken) and puts
    /// what rustls has to send on `out`.
    pub fn advance(&mut self, input: &mut Vec<u8>, out: &mut Vec<u8>, secrets: &Secrets) -> Step {
        let mut taken = 0;
        let result = loop {
            if !self.conn.is_handshaking() {
                break Ok(());
            }
            if !starts_a_record(&input[taken..]) {
                // An SSLv2-format ClientHello, or no TLS at all: nothing to wait for.
                break Err(rustls::Error::General("not a TLS record".into()));
            }
            if declared_len(&input[taken..]).is_some_and(|n| n > sluice_tls::MAX_RECORD) {
                // Never completes within the input the loop keeps: refused now, not at the
                // header timeout.
                break Err(rustls::Error::General(
                    "a record larger than TLS allows".into(),
                ));
            }
            let Some(len) = record_len(&input[taken..]) else {
                break Ok(());
            };
            let mut record = &input[taken..taken + len];
            taken += len;
            self.begun = true;
            let fed = (|| {
                while !record.is_empty() {
                    self.conn
                        .read_tls(&mut record)
                        .map_err(|e| rustls::Error::General(e.to_string()))?;
                    self.conn.process_new_packets()?;
                }
                Ok::<(), rustls::Error>(())
            })();
            for (client, secret) in secrets.drain() {
                if client {
                    self.client_secret = secret;
                } else {
                    self.server_secret = secret;
                }
            }
            if let Err(e) = fed {
                break Err(e);
            }
        };
        input.drain(..taken);
        while self.conn.wants_write() {
            if self.conn.write_tls(out).is_err() {
                break;
            }
        }
        match result {
            Err(e) => Step::Failed(e.to_string()),
            Ok(()) if self.conn.is_handshaking() => Step::More,
            Ok(()) => Step::Ready,
        }
    }

    /// The session of a handshake that is over (`Step::Ready`).
    pub fn finish(self) -> Result<Done, String> {
        let Handshake {
            mut conn,
            client_secret,
            server_secret,
            ..
        } = self;
        let mut plaintext = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match conn.reader().read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => plaintext.extend_from_slice(&chunk[..n]),
                Err(_) => break,
            }
        }
        let sni = conn
            .server_name()
            .map(|s| sluice_proto::host::normalize(s).into_owned());
        let tls13 = conn.protocol_version() == Some(ProtocolVersion::TLSv1_3);
        let secrets = conn
            .dangerous_extract_secrets()
            .map_err(|e| e.to_string())?;
        let (suite, tx) = direction(secrets.tx, if tls13 { server_secret } else { Vec::new() })?;
        let (_, rx) = direction(secrets.rx, if tls13 { client_secret } else { Vec::new() })?;
        if tls13 && (tx.secret.is_empty() || rx.secret.is_empty()) {
            return Err("the TLS 1.3 traffic secrets were not logged".into());
        }
        Ok(Done {
            session: Session {
                protocol: if tls13 {
                    Protocol::Tls13
                } else {
                    Protocol::Tls12
                },
                suite,
                tx,
                rx,
                server_name: sni.unwrap_or_default(),
                pending: Vec::new(),
            },
            plaintext,
        })
    }
}

fn direction(
    (seq, secrets): (u64, ConnectionTrafficSecrets),
    secret: Vec<u8>,
) -> Result<(Suite, Direction), String> {
    let (suite, key, iv) = match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Suite::Aes128Gcm, key, iv),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Suite::Aes256Gcm, key, iv),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (Suite::Chacha20Poly1305, key, iv)
        }
        _ => return Err("a cipher suite the record layer does not run".into()),
    };
    let mut iv12 = [0u8; 12];
    if iv.as_ref().len() != 12 {
        return Err("an IV that is not 12 bytes".into());
    }
    iv12.copy_from_slice(iv.as_ref());
    Ok((
        suite,
        Direction {
            key: key.as_ref().to_vec(),
            iv: iv12,
            seq,
            secret,
        },
    ))
}
