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
    /// Part of a handshake message (RFC 8446 §5.1 lets one span records); the rest comes
    /// in the next records.
    HandshakePart,
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
    #[error("a TLS handshake message holds a value it may not (illegal_parameter)")]
    IllegalParameter,
    #[error("a handshake message is half received: the session cannot move now")]
    MidMessage,
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
            RecordError::IllegalParameter => 47,
            RecordError::Exhausted | RecordError::Keys | RecordError::MidMessage => 80,
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
    /// The start of a handshake message whose rest is in records still to come (at most
    /// a KeyUpdate's first 4 bytes: anything else is refused once its header is read).
    handshake: Vec<u8>,
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
            handshake: Vec::new(),
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
    /// then the plaintext not yet served. Not while a handshake message is half received
    /// (a session carries no plaintext of one): `MidMessage`.
    pub fn payload(
        &self,
        pending: &[u8],
        server_name: &str,
        plain: &[u8],
    ) -> Result<Vec<u8>, RecordError> {
        if !self.handshake.is_empty() {
            return Err(RecordError::MidMessage);
        }
        let mut out = Vec::with_capacity(256 + pending.len() + plain.len());
        self.session(pending, server_name).encode(&mut out);
        out.extend_from_slice(plain);
        Ok(out)
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
                // The whole TLSInnerPlaintext (content, type, padding): at most 2^14 + 1.
                if plain.len() > MAX_PLAINTEXT + 1 {
                    return Err(RecordError::Overflow);
                }
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
                if plain_len as usize > MAX_PLAINTEXT {
                    return Err(RecordError::Overflow);
                }
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
        // A handshake message spanning records may not be interleaved with other records.
        if !self.handshake.is_empty() && kind != CONTENT_HANDSHAKE {
            return Err(RecordError::Unexpected(kind));
        }
        let opened = match kind {
            CONTENT_APPLICATION_DATA => Opened::Data(plain),
            CONTENT_ALERT => match &buf[plain] {
                [level, description] => Opened::Alert {
                    level: *level,
                    description: *description,
                },
                _ => return Err(RecordError::Malformed),
            },
            CONTENT_HANDSHAKE if plain.is_empty() => return Err(RecordError::Malformed),
            CONTENT_HANDSHAKE => self.handshake_bytes(plain, buf)?,
            CONTENT_CHANGE_CIPHER_SPEC => return Err(RecordError::Unexpected(kind)),
            other => return Err(RecordError::Unexpected(other)),
        };
        Ok(Some((consumed, opened)))
    }

    /// A record's handshake bytes, `buf[plain]`, after those of earlier records: the only
    /// message taken is a TLS 1.3 KeyUpdate (RFC 8446 §4.6.3), which must end its record
    /// (§5.1: the keys change after it).
    fn handshake_bytes(&mut self, plain: Range<usize>, buf: &[u8]) -> Result<Opened, RecordError> {
        const KEY_UPDATE_LEN: usize = 5;
        let mut message = std::mem::take(&mut self.handshake);
        message.extend_from_slice(&buf[plain]);
        let kind = message[0];
        if self.protocol != Protocol::Tls13 || kind != HANDSHAKE_KEY_UPDATE {
            return Ok(Opened::Handshake(kind));
        }
        if message.len() >= 4 && message[1..4] != [0, 0, 1] {
            return Err(RecordError::Malformed);
        }
        if message.len() < KEY_UPDATE_LEN {
            self.handshake = message;
            return Ok(Opened::HandshakePart);
        }
        if message.len() > KEY_UPDATE_LEN {
            return Err(RecordError::Unexpected(CONTENT_HANDSHAKE));
        }
        let request = message[4];
        if request > 1 {
            return Err(RecordError::IllegalParameter);
        }
        self.rx.update(self.suite)?;
        Ok(Opened::KeyUpdate {
            requested: request == 1,
        })
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
                        Opened::KeyUpdate { requested: false } | Opened::HandshakePart => Ok(()),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A session's two ends: `server` opens what `client` seals (its directions swapped).
    fn pair(protocol: Protocol) -> (RecordLayer, RecordLayer) {
        let suite = Suite::Aes128Gcm;
        let (a, b) = match protocol {
            Protocol::Tls13 => (
                Direction::from_secret(suite, &[7; 32], 0),
                Direction::from_secret(suite, &[9; 32], 0),
            ),
            Protocol::Tls12 => {
                let d = |k: u8| Direction {
                    key: vec![k; 16],
                    iv: [k; 12],
                    seq: 0,
                    secret: Vec::new(),
                };
                (d(7), d(9))
            }
        };
        let session = |tx: &Direction, rx: &Direction| Session {
            protocol,
            suite,
            tx: tx.clone(),
            rx: rx.clone(),
            server_name: String::new(),
            pending: Vec::new(),
        };
        let server = RecordLayer::new(&session(&a, &b)).unwrap();
        let client = RecordLayer::new(&session(&b, &a)).unwrap();
        (server, client)
    }

    /// What the server makes of `wire`: the data it got, and how it ended.
    fn receive(server: &mut RecordLayer, wire: &[u8]) -> (Vec<u8>, Received, Vec<u8>) {
        let (mut input, mut out, mut data) = (wire.to_vec(), Vec::new(), Vec::new());
        let said = server.open_all(&mut input, &mut out, |d| data.extend_from_slice(d));
        (data, said, out)
    }

    fn sealed(client: &mut RecordLayer, kind: u8, plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        client.seal_record(kind, plain, &mut out).unwrap();
        out
    }

    #[test]
    fn a_record_with_more_than_2_14_bytes_of_plaintext_is_record_overflow() {
        for protocol in [Protocol::Tls13, Protocol::Tls12] {
            let (mut server, mut client) = pair(protocol);
            let wire = sealed(
                &mut client,
                CONTENT_APPLICATION_DATA,
                &[b'a'; MAX_PLAINTEXT],
            );
            assert_eq!(receive(&mut server, &wire).0.len(), MAX_PLAINTEXT);
            let wire = sealed(
                &mut client,
                CONTENT_APPLICATION_DATA,
                &[b'a'; MAX_PLAINTEXT + 1],
            );
            let (data, said, _) = receive(&mut server, &wire);
            assert!(data.is_empty());
            assert_eq!(
                said,
                Received::Failed(RecordError::Overflow),
                "{protocol:?}"
            );
        }
    }

    #[test]
    fn a_key_update_split_across_records_moves_the_keys_once_it_is_whole() {
        let (mut server, mut client) = pair(Protocol::Tls13);
        let mut wire = sealed(&mut client, CONTENT_HANDSHAKE, &[HANDSHAKE_KEY_UPDATE, 0]);
        wire.extend(sealed(&mut client, CONTENT_HANDSHAKE, &[0, 1, 1]));
        client.tx.update(client.suite).unwrap();
        wire.extend(sealed(&mut client, CONTENT_APPLICATION_DATA, b"after"));
        let (data, said, out) = receive(&mut server, &wire);
        assert_eq!((data.as_slice(), said), (&b"after"[..], Received::Open));
        // It asked for ours: our KeyUpdate went out, and what we seal next is under new keys.
        assert!(!out.is_empty());
        let mut echo = out;
        server.seal(b"reply", &mut echo).unwrap();
        let mut back = Vec::new();
        let said = client.open_all(&mut echo, &mut Vec::new(), |d| back.extend_from_slice(d));
        assert_eq!((back.as_slice(), said), (&b"reply"[..], Received::Open));
    }

    #[test]
    fn a_bad_key_update_gets_the_alert_rfc_8446_names() {
        let cases: [(&[u8], RecordError, u8); 4] = [
            (
                &[HANDSHAKE_KEY_UPDATE, 0, 0, 1, 2],
                RecordError::IllegalParameter,
                47,
            ),
            (
                &[HANDSHAKE_KEY_UPDATE, 0, 0, 2, 0, 0],
                RecordError::Malformed,
                50,
            ),
            // Something after it in the same record: the keys change at a record's end only.
            (
                &[HANDSHAKE_KEY_UPDATE, 0, 0, 1, 0, 24],
                RecordError::Unexpected(22),
                10,
            ),
            // A message the session does not take after its handshake.
            (&[1, 0, 0, 1, 0], RecordError::Unexpected(22), 10),
        ];
        for (message, error, alert) in cases {
            let (mut server, mut client) = pair(Protocol::Tls13);
            let wire = sealed(&mut client, CONTENT_HANDSHAKE, message);
            let (_, said, out) = receive(&mut server, &wire);
            assert_eq!(said, Received::Failed(error), "{message:?}");
            assert_eq!(error.alert(), alert);
            // The peer reads the alert, under the keys it has.
            let mut out = out;
            let said = client.open_all(&mut out, &mut Vec::new(), |_| {});
            assert_eq!(said, Received::Closed);
        }
    }

    #[test]
    fn application_data_inside_a_split_handshake_message_is_unexpected() {
        let (mut server, mut client) = pair(Protocol::Tls13);
        let mut wire = sealed(
            &mut client,
            CONTENT_HANDSHAKE,
            &[HANDSHAKE_KEY_UPDATE, 0, 0],
        );
        assert!(server.payload(&[], "", b"").is_ok());
        let (_, said, _) = receive(&mut server, &wire);
        assert_eq!(said, Received::Open);
        // Half a message received: the session cannot be handed on.
        assert_eq!(server.payload(&[], "", b""), Err(RecordError::MidMessage));
        wire = sealed(&mut client, CONTENT_APPLICATION_DATA, b"x");
        let (data, said, _) = receive(&mut server, &wire);
        assert!(data.is_empty());
        assert_eq!(said, Received::Failed(RecordError::Unexpected(23)));
    }
}
