//! A TLS connection the front end handed over with its session: the worker runs the record
//! layer (`sluice_tls`), so the HTTP machine sees plaintext in and writes plaintext out as on
//! any connection. Ciphertext has buffers of its own; records are opened in place.

use sluice_tls::{Received, RecordLayer, Session};

/// What the records received so far said, beside their data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Input {
    Open,
    /// The client sent close_notify (or an alert): answer with ours and close.
    Closed,
    /// Broken or hostile input: the alert is sealed; close once it is sent.
    Failed,
}

pub(crate) struct TlsConn {
    layer: RecordLayer,
    /// Ciphertext received, not yet opened.
    pub input: Vec<u8>,
    /// Ciphertext sealed, and how much of it is sent.
    pub out: Vec<u8>,
    pub out_sent: usize,
    /// The SNI name the session was made for (empty without one).
    pub sni: String,
    /// close_notify is sealed: nothing more is.
    notified: bool,
}

impl TlsConn {
    /// The session at the start of a handoff's bytes, and the plaintext after it.
    pub fn from_handoff(bytes: &[u8]) -> Result<(TlsConn, Vec<u8>), String> {
        let (session, plain) = Session::decode(bytes).map_err(|e| e.to_string())?;
        let layer = RecordLayer::new(&session).map_err(|e| e.to_string())?;
        let mut input = session.pending;
        input.reserve(sluice_tls::MAX_RECORD);
        Ok((
            TlsConn {
                layer,
                input,
                out: Vec::new(),
                out_sent: 0,
                sni: session.server_name,
                notified: false,
            },
            plain.to_vec(),
        ))
    }

    /// Opens the complete records received, appending their data to `plain`.
    pub fn open(&mut self, plain: &mut Vec<u8>) -> Input {
        match self.layer.open_all(&mut self.input, &mut self.out, |d| {
            plain.extend_from_slice(d)
        }) {
            Received::Open => Input::Open,
            Received::Closed => Input::Closed,
            Received::Failed(e) => {
                log::debug!("a TLS connection: {e}");
                // Its alert is sealed: nothing more is.
                self.notified = true;
                Input::Failed
            }
        }
    }

    /// Seals `plain` (the HTTP machine's output) onto `out`; `last`: close_notify after it.
    pub fn seal(&mut self, plain: &[u8], last: bool) {
        if self.notified {
            return;
        }
        if let Err(e) = self.layer.seal(plain, &mut self.out) {
            log::debug!("a TLS connection: {e}");
            self.notified = true;
            let _ = self.layer.seal_alert(e.alert(), &mut self.out);
            return;
        }
        if last {
            self.notified = true;
            let _ = self.layer.seal_alert(0, &mut self.out);
        }
    }

    /// Seals close_notify (once).
    pub fn close_notify(&mut self) {
        if !self.notified {
            self.notified = true;
            let _ = self.layer.seal_alert(0, &mut self.out);
        }
    }

    /// The handoff payload that gives the connection back: the session as it stands and the
    /// plaintext not served; none while half a handshake message is received.
    pub fn hand_back_payload(&self, plain: &[u8]) -> Result<Vec<u8>, sluice_tls::RecordError> {
        self.layer.payload(&self.input, &self.sni, plain)
    }
}
