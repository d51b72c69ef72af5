//! The state of a TLS session as it crosses the handoff channel: protocol, cipher suite, and
//! per direction the key, IV, next record sequence number and (TLS 1.3) traffic secret,
//! plus the ciphertext of a record that had only partly arrived. One binary encoding, read
//! back by the same code on the other side; a message a hostile sender made is refused with
//! a reason, never trusted for a length.

use crate::schedule;

/// Bytes of a partly received record the session carries at most (a whole record's room).
const MAX_PENDING: usize = crate::record::MAX_RECORD;
const FORMAT: u8 = 1;
/// The longest DNS name.
const MAX_NAME: usize = 253;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tls12,
    Tls13,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Suite {
    pub fn key_len(self) -> usize {
        match self {
            Suite::Aes128Gcm => 16,
            Suite::Aes256Gcm | Suite::Chacha20Poly1305 => 32,
        }
    }

    fn code(self) -> u8 {
        match self {
            Suite::Aes128Gcm => 1,
            Suite::Aes256Gcm => 2,
            Suite::Chacha20Poly1305 => 3,
        }
    }

    fn from_code(code: u8) -> Option<Suite> {
        match code {
            1 => Some(Suite::Aes128Gcm),
            2 => Some(Suite::Aes256Gcm),
            3 => Some(Suite::Chacha20Poly1305),
            _ => None,
        }
    }
}

/// One direction's keys. For TLS 1.2 AES-GCM the IV is the 4-byte salt followed by the 8
/// bytes the key block gave (rustls's `Iv`), and the nonce is always IV xor sequence number.
#[derive(Clone, PartialEq, Eq)]
pub struct Direction {
    pub key: Vec<u8>,
    pub iv: [u8; 12],
    /// The sequence number of the next record.
    pub seq: u64,
    /// TLS 1.3's current traffic secret (empty for TLS 1.2): the next keys derive from it.
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys are never logged.
        f.debug_struct("Direction")
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl Direction {
    /// A TLS 1.3 direction from its traffic secret, at sequence number `seq`.
    pub fn from_secret(suite: Suite, secret: &[u8], seq: u64) -> Direction {
        let (key, iv) = schedule::key_and_iv(suite, secret);
        Direction {
            key,
            iv,
            seq,
            secret: secret.to_vec(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub protocol: Protocol,
    pub suite: Suite,
    /// What this side sends.
    pub tx: Direction,
    /// What this side receives.
    pub rx: Direction,
    /// The name the client's ClientHello asked for (SNI; empty without one), lower case: a
    /// request whose `Host` names another gets 421 whichever side reads it.
    pub server_name: String,
    /// The start of a record not yet complete.
    pub pending: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("the TLS session message ends early")]
    Truncated,
    #[error("the TLS session message has an unknown format {0}")]
    Format(u8),
    #[error("the TLS session names an unknown protocol or cipher suite")]
    Unknown,
    #[error("the TLS session's key or secret has the wrong length for its suite")]
    KeyLength,
    #[error("the TLS session carries more than a record of pending bytes")]
    Pending,
    #[error("the TLS session's server name is not a host name")]
    Name,
}

/// A byte of a normalized SNI name.
fn sni_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_')
}

impl Session {
    /// Appends the session's encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(FORMAT);
        out.push(match self.protocol {
            Protocol::Tls12 => 12,
            Protocol::Tls13 => 13,
        });
        out.push(self.suite.code());
        for d in [&self.tx, &self.rx] {
            out.extend_from_slice(&d.seq.to_be_bytes());
            out.push(d.key.len() as u8);
            out.extend_from_slice(&d.key);
            out.extend_from_slice(&d.iv);
            out.push(d.secret.len() as u8);
            out.extend_from_slice(&d.secret);
        }
        let name = &self.server_name.as_bytes()[..self.server_name.len().min(MAX_NAME)];
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out.extend_from_slice(&(self.pending.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.pending);
    }

    /// Reads a session from the start of `bytes`; returns it and the bytes after it.
    pub fn decode(bytes: &[u8]) -> Result<(Session, &[u8]), SessionError> {
        let mut r = Reader(bytes);
        let format = r.u8()?;
        if format != FORMAT {
            return Err(SessionError::Format(format));
        }
        let protocol = match r.u8()? {
            12 => Protocol::Tls12,
            13 => Protocol::Tls13,
            _ => return Err(SessionError::Unknown),
        };
        let suite = Suite::from_code(r.u8()?).ok_or(SessionError::Unknown)?;
        let mut direction = || -> Result<Direction, SessionError> {
            let seq = u64::from_be_bytes(r.array()?);
            let key_len = r.u8()? as usize;
            let key = r.take(key_len)?.to_vec();
            let iv = r.array()?;
            let secret_len = r.u8()? as usize;
            let secret = r.take(secret_len)?.to_vec();
            let want_secret = match protocol {
                Protocol::Tls12 => 0,
                Protocol::Tls13 => schedule::secret_len(suite),
            };
            if key.len() != suite.key_len() || secret.len() != want_secret {
                return Err(SessionError::KeyLength);
            }
            Ok(Direction {
                key,
                iv,
                seq,
                secret,
            })
        };
        let tx = direction()?;
        let rx = direction()?;
        let name_len = r.u8()? as usize;
        let name = r.take(name_len)?;
        // What the front end writes: a normalized SNI name (`host::normalize` of what rustls
        // accepted) or none. Anything else is a lie (a worker naming a session as it likes)
        // or would not encode back to itself.
        if name.len() > MAX_NAME || !name.iter().all(|&b| sni_byte(b)) {
            return Err(SessionError::Name);
        }
        let server_name = std::str::from_utf8(name)
            .map_err(|_| SessionError::Name)?
            .to_owned();
        let pending_len = u16::from_be_bytes(r.array()?) as usize;
        if pending_len > MAX_PENDING {
            return Err(SessionError::Pending);
        }
        let pending = r.take(pending_len)?.to_vec();
        Ok((
            Session {
                protocol,
                suite,
                tx,
                rx,
                server_name,
                pending,
            },
            r.0,
        ))
    }

    /// The session as the other end of the connection sees it (its tx is our rx).
    pub fn reversed(&self) -> Session {
        Session {
            tx: self.rx.clone(),
            rx: self.tx.clone(),
            pending: Vec::new(),
            ..self.clone()
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SessionError> {
        if self.0.len() < n {
            return Err(SessionError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, SessionError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], SessionError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session {
            protocol: Protocol::Tls13,
            suite: Suite::Aes256Gcm,
            tx: Direction::from_secret(Suite::Aes256Gcm, &[7; 48], 3),
            rx: Direction::from_secret(Suite::Aes256Gcm, &[9; 48], 1),
            server_name: "shop.example.test".into(),
            pending: vec![23, 3, 3, 0, 40, 1, 2],
        }
    }

    #[test]
    fn a_session_reads_back_as_it_was_written_with_what_follows_it() {
        let mut out = Vec::new();
        session().encode(&mut out);
        out.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let (back, rest) = Session::decode(&out).unwrap();
        assert_eq!(back, session());
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn every_cut_and_every_wrong_length_is_refused() {
        let mut out = Vec::new();
        session().encode(&mut out);
        for n in 0..out.len() {
            assert!(Session::decode(&out[..n]).is_err(), "cut at {n}");
        }
        let mut wrong = out.clone();
        wrong[0] = 9;
        assert_eq!(Session::decode(&wrong), Err(SessionError::Format(9)));
        let mut wrong = out.clone();
        wrong[2] = 1; // AES-128 with 32-byte keys
        assert_eq!(Session::decode(&wrong), Err(SessionError::KeyLength));
        let mut wrong = out.clone();
        wrong[1] = 14;
        assert_eq!(Session::decode(&wrong), Err(SessionError::Unknown));
        let mut long = Vec::new();
        Session {
            pending: vec![0; MAX_PENDING + 1],
            ..session()
        }
        .encode(&mut long);
        assert_eq!(Session::decode(&long), Err(SessionError::Pending));
    }

    /// Found by fuzzing: a 254- or 255-byte name decoded, then encoded cut to 253 bytes, so
    /// the session did not read back as itself; and a worker could name a session with any
    /// text (NUL, upper case, spaces), which no handshake gives.
    #[test]
    fn a_name_no_handshake_gives_is_refused() {
        let name_at = |s: &Session| {
            let mut out = Vec::new();
            s.encode(&mut out);
            out.len() - 2 - s.pending.len() - s.server_name.len() - 1
        };
        for bad in [
            &[b'a'; 254][..],
            &[b'a'; 255],
            b"a\0b",
            b"Shop.test",
            b"a b",
            b"\xc3\xa9",
        ] {
            let mut out = Vec::new();
            let s = session();
            s.encode(&mut out);
            let at = name_at(&s);
            let mut wrong = out[..at].to_vec();
            wrong.push(bad.len() as u8);
            wrong.extend_from_slice(bad);
            wrong.extend_from_slice(&out[at + 1 + s.server_name.len()..]);
            assert_eq!(
                Session::decode(&wrong),
                Err(SessionError::Name),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let none = Session {
            server_name: String::new(),
            ..session()
        };
        let mut out = Vec::new();
        none.encode(&mut out);
        assert_eq!(Session::decode(&out).map(|(s, _)| s), Ok(none));
    }
}
