//! The TLS record layer of a session after its handshake (RFC 8446 §5, RFC 5246 §6.2,
//! RFC 5288, RFC 7905): records are opened in the caller's buffer and sealed onto the end of
//! the caller's output, so a connection's buffers are the only memory it uses.

use std::ops::Range;

use ring::aead;

use crate::schedule;
use crate::session::{Direction, Protocol, Session, Suite};

pub const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
pub const CONTENT_ALERT: u8 = 21;
pub const CONTENT_HANDSHAKE: u8 = 22;
pub const CONTENT_APPLICATION_DATA: u8 = 23;
/// Most plaintext in one record.
pub const MAX_PLAINTEXT: usize = 16 * 1024;
/// The largest record a peer may send (TLS 1.2 allows 2048 bytes of expansion).
pub const MAX_RECORD: usize = HEADER + MAX_PLAINTEXT + 2048;
const HEADER: usize = 5;
const TAG: usize = 16;
const EXPLICIT_NONCE: usize = 8;
const HANDSHAKE_KEY_UPDATE: u8 = 24;
/// Records sealed under one AES-GCM key before TLS 1.3 moves to the next (rustls's limit).
const AES_GCM_RECORDS: u64 = 1 << 24;

/// What a record held.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Application data: its place in the buffer the record was opened in.
    Data(Range<usize>),
    /// An alert (close_notify is description 0).
    Alert { level: u8, description: u8 },
    /// The peer moved to its next keys (TLS 1.3); `requested`: it asks us to move ours too,
    /// which `seal_key_update` does.
    KeyUpdate { requested: bool },
    /// A handshake message the record layer does not take (its type).
    Handshake(u8),
}

/// What the records `RecordLayer::open_all` opened said, beside their data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    Open,
    /// The peer sent close_notify (or another alert): answer with ours and close.
    Closed,
    /// Broken or unexpected input: its alert is sealed; close once it is sent.
    Failed(RecordError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("a TLS record did not decrypt (bad_record_mac)")]
    BadRecordMac,
    #[error("a TLS record is larger than allowed (record_overflow)")]
    Overflow,
    #[error("a TLS record of content type {0} was not expected here")]
    Unexpected(u8),
    #[error("a TLS record's content is malformed")]
    Malformed,
    #[error("the session has sealed as many records as its keys allow")]
    Exhausted,
    #[error("the session's keys are not usable")]
    Keys,
}

impl RecordError {
    /// The alert that tells the peer why the connection ends.
    pub fn alert(self) -> u8 {
        match self {
            RecordError::BadRecordMac => 20,
            RecordError::Overflow => 22,
            RecordError::Unexpected(_) => 10,
            RecordError::Malformed => 50,
            RecordError::Exhausted | RecordError::Keys => 80,
        }
    }
}

struct Keys {
    aead: aead::LessSafeKey,
    direction: Direction,
}

impl Keys {
    fn new(suite: Suite, direction: Direction) -> Result<Keys, RecordError> {
        let algorithm = match suite {
            Suite::Aes128Gcm => &aead::AES_128_GCM,
            Suite::Aes256Gcm => &aead::AES_256_GCM,
            Suite::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        };
        let key =
            aead::UnboundKey::new(algorithm, &direction.key).map_err(|_| RecordError::Keys)?;
        Ok(Keys {
            aead: aead::LessSafeKey::new(key),
            direction,
        })
    }

    /// This record's nonce (IV xor sequence number), and the sequence number moved on.
    fn next_nonce(&mut self) -> Result<([u8; 12], u64), RecordError> {
        let seq = self.direction.seq;
        self.direction.seq = seq.checked_add(1).ok_or(RecordError::Exhausted)?;
        let mut nonce = self.direction.iv;
        for (n, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
            *n ^= s;
        }
        Ok((nonce, seq))
    }

    /// TLS 1.3: on to the next traffic secret, at sequence number 0.
    fn update(&mut self, suite: Suite) -> Result<(), RecordError> {
        let next = schedule::next_secret(suite, &self.direction.secret);
        *self = Keys::new(suite, Direction::from_secret(suite, &next, 0))?;
        Ok(())
    }
}

/// One session's record layer: what it sends and what it receives.
pub struct RecordLayer {
    protocol: Protocol,
    suite: Suite,
    tx: Keys,
    rx: Keys,
}

impl RecordLayer {
    pub fn new(session: &Session) -> Result<RecordLayer, RecordError> {
        if session.protocol == Protocol::Tls13
            && (session.tx.secret.is_empty() || session.rx.secret.is_empty())
        {
            return Err(RecordError::Keys);
        }
        Ok(RecordLayer {
            protocol: session.protocol,
            suite: session.suite,
            tx: Keys::new(session.suite, session.tx.clone())?,
            rx: Keys::new(session.suite, session.rx.clone())?,
        })
    }

    /// The session as it stands now, to hand on (`pending`: a partly received record).
    pub fn session(&self, pending: &[u8], server_name: &str) -> Session {
        Session {
            protocol: self.protocol,
            suite: self.suite,
            tx: self.tx.direction.clone(),
            rx: self.rx.direction.clone(),
            server_name: server_name.to_owned(),
            pending: pending.to_vec(),
        }
    }

    /// What a TLS connection crosses the handoff channel with: the session as it stands,
    /// then the plaintext not yet served.
    pub fn payload(&self, pending: &[u8], server_name: &str, plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + pending.len() + plain.len());
        self.session(pending, server_name).encode(&mut out);
        out.extend_from_slice(plain);
        out
    }

    /// Opens the record at the start of `buf` in place. None: the record is not complete yet.
    /// Some((consumed, what)): the record took `consumed` bytes; application data is left in
    /// `buf` where `Opened::Data` says.
    pub fn open(&mut self, buf: &mut [u8]) -> Result<Option<(usize, Opened)>, RecordError> {
        if buf.len() < HEADER {
            return Ok(None);
        }
        let outer = buf[0];
        let len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
        let limit = match self.protocol {
            Protocol::Tls13 => MAX_PLAINTEXT + 256,
            Protocol::Tls12 => MAX_PLAINTEXT + 2048,
        };
        if len > limit {
            return Err(RecordError::Overflow);
        }
        if buf.len() < HEADER + len {
            return Ok(None);
        }
        let consumed = HEADER + len;
        let header: [u8; HEADER] = [buf[0], buf[1], buf[2], buf[3], buf[4]];
        let body = &mut buf[HEADER..consumed];
        let (kind, plain) = match self.protocol {
            Protocol::Tls13 => {
                // After the handshake every record is protected application_data outside.
                if outer != CONTENT_APPLICATION_DATA {
                    return Err(RecordError::Unexpected(outer));
                }
                let (nonce, _) = self.rx.next_nonce()?;
                let nonce = aead::Nonce::assume_unique_for_key(nonce);
                let plain = self
                    .rx
                    .aead
                    .open_in_place(nonce, aead::Aad::from(header), body)
                    .map_err(|_| RecordError::BadRecordMac)?;
                // The inner content type is the last byte that is not zero padding.
                let end = plain
                    .iter()
                    .rposition(|&b| b != 0)
                    .ok_or(RecordError::Unexpected(0))?;
                (plain[end], HEADER..HEADER + end)
            }
            Protocol::Tls12 => {
                if !matches!(
                    outer,
                    CONTENT_APPLICATION_DATA | CONTENT_ALERT | CONTENT_HANDSHAKE
                ) {
                    return Err(RecordError::Unexpected(outer));
                }
                let explicit = match self.suite {
                    Suite::Chacha20Poly1305 => 0,
                    Suite::Aes128Gcm | Suite::Aes256Gcm => EXPLICIT_NONCE,
                };
                if len < explicit + TAG {
                    return Err(RecordError::BadRecordMac);
                }
                let (mut nonce, seq) = self.rx.next_nonce()?;
                if explicit > 0 {
                    nonce[4..].copy_from_slice(&body[..EXPLICIT_NONCE]);
                }
                let plain_len = (len - explicit - TAG) as u16;
                let aad = tls12_aad(seq, outer, plain_len);
                let nonce = aead::Nonce::assume_unique_for_key(nonce);
                self.rx
                    .aead
                    .open_in_place(nonce, aead::Aad::from(aad), &mut body[explicit..])
                    .map_err(|_| RecordError::BadRecordMac)?;
                let start = HEADER + explicit;
                (outer, start..start + plain_len as usize)
            }
        };
        let opened = match kind {
            CONTENT_APPLICATION_DATA => Opened::Data(plain),
            CONTENT_ALERT => match &buf[plain] {
                [level, description] => Opened::Alert {
                    level: *level,
                    description: *description,
                },
                _ => return Err(RecordError::Malformed),
            },
            CONTENT_HANDSHAKE => {
                let message = &buf[plain];
                match (self.protocol, message) {
                    (Protocol::Tls13, [HANDSHAKE_KEY_UPDATE, 0, 0, 1, request])
                        if *request <= 1 =>
                    {
                        self.rx.update(self.suite)?;
                        Opened::KeyUpdate {
                            requested: *request == 1,
                        }
                    }
                    (_, [kind, ..]) => Opened::Handshake(*kind),
                    _ => return Err(RecordError::Malformed),
                }
            }
            CONTENT_CHANGE_CIPHER_SPEC => return Err(RecordError::Unexpected(kind)),
            other => return Err(RecordError::Unexpected(other)),
        };
        Ok(Some((consumed, opened)))
    }

    /// Opens every complete record at the start of `input` (drained as they are opened),
    /// giving their data to `data`. A KeyUpdate that asks for one is answered onto `out`;
    /// broken or unexpected input gets its alert sealed onto `out`. The one reading of
    /// records after the handshake, for the front end and the workers alike.
    pub fn open_all(
        &mut self,
        input: &mut Vec<u8>,
        out: &mut Vec<u8>,
        mut data: impl FnMut(&[u8]),
    ) -> Received {
        let mut at = 0;
        let mut said = Received::Open;
        while said == Received::Open {
            let step = match self.open(&mut input[at..]) {
                Ok(None) => break,
                Ok(Some((n, opened))) => {
                    at += n;
                    match opened {
                        Opened::Data(r) => {
                            data(&input[at - n + r.start..at - n + r.end]);
                            Ok(())
                        }
                        Opened::Alert { .. } => {
                            said = Received::Closed;
                            Ok(())
                        }
                        Opened::KeyUpdate { requested: true } => self.seal_key_update(out),
                        Opened::KeyUpdate { requested: false } => Ok(()),
                        // Nothing else comes after a handshake that asked for nothing more.
                        Opened::Handshake(_) => Err(RecordError::Unexpected(CONTENT_HANDSHAKE)),
                    }
                }
                Err(e) => Err(e),
            };
            if let Err(e) = step {
                let _ = self.seal_alert(e.alert(), out);
                said = Received::Failed(e);
            }
        }
        input.drain(..at);
        said
    }

    /// Appends `plaintext` to `out` as application-data records.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        for chunk in plaintext.chunks(MAX_PLAINTEXT) {
            self.seal_record(CONTENT_APPLICATION_DATA, chunk, out)?;
        }
        Ok(())
    }

    /// Appends a close_notify alert to `out` (or, with another description, a fatal alert).
    pub fn seal_alert(&mut self, description: u8, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let level = if description == 0 { 1 } else { 2 };
        self.seal_record(CONTENT_ALERT, &[level, description], out)
    }

    /// TLS 1.3: appends a KeyUpdate (not asking the peer for one) under the current keys and
    /// moves what this side sends to the next keys.
    pub fn seal_key_update(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        if self.protocol != Protocol::Tls13 {
            return Err(RecordError::Unexpected(CONTENT_HANDSHAKE));
        }
        self.seal_record(CONTENT_HANDSHAKE, &[HANDSHAKE_KEY_UPDATE, 0, 0, 1, 0], out)?;
        self.tx.update(self.suite)
    }

    fn seal_record(
        &mut self,
        kind: u8,
        plain: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        let aes = matches!(self.suite, Suite::Aes128Gcm | Suite::Aes256Gcm);
        if aes && self.tx.direction.seq >= AES_GCM_RECORDS {
            if self.protocol == Protocol::Tls13 && kind != CONTENT_HANDSHAKE {
                self.seal_key_update(out)?;
            } else {
                return Err(RecordError::Exhausted);
            }
        }
        match self.protocol {
            Protocol::Tls13 => {
                let len = (plain.len() + 1 + TAG) as u16;
                let header = header(CONTENT_APPLICATION_DATA, len);
                out.extend_from_slice(&header);
                let start = out.len();
                out.extend_from_slice(plain);
                out.push(kind);
                let (nonce, _) = self.tx.next_nonce()?;
                let tag = self
                    .tx
                    .aead
                    .seal_in_place_separate_tag(
                        aead::Nonce::assume_unique_for_key(nonce),
                        aead::Aad::from(header),
                        &mut out[start..],
                    )
                    .map_err(|_| RecordError::Keys)?;
                out.extend_from_slice(tag.as_ref());
            }
            Protocol::Tls12 => {
                let explicit = if aes { EXPLICIT_NONCE } else { 0 };
                let len = (explicit + plain.len() + TAG) as u16;
                out.extend_from_slice(&header(kind, len));
                let (nonce, seq) = self.tx.next_nonce()?;
                // The explicit part of a GCM nonce is ours to choose, once per key: the
                // nonce's last 8 bytes, which differ for every sequence number.
                out.extend_from_slice(&nonce[12 - explicit..]);
                let start = out.len();
                out.extend_from_slice(plain);
                let aad = tls12_aad(seq, kind, plain.len() as u16);
                let tag = self
                    .tx
                    .aead
                    .seal_in_place_separate_tag(
                        aead::Nonce::assume_unique_for_key(nonce),
                        aead::Aad::from(aad),
                        &mut out[start..],
                    )
                    .map_err(|_| RecordError::Keys)?;
                out.extend_from_slice(tag.as_ref());
            }
        }
        Ok(())
    }
}

fn header(kind: u8, len: u16) -> [u8; HEADER] {
    let [hi, lo] = len.to_be_bytes();
    [kind, 3, 3, hi, lo]
}

fn tls12_aad(seq: u64, kind: u8, len: u16) -> [u8; 13] {
    let mut aad = [0u8; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8] = kind;
    aad[9] = 3;
    aad[10] = 3;
    aad[11..].copy_from_slice(&len.to_be_bytes());
    aad
}
