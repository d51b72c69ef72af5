//! TLS after the handshake, for a connection the sluice front end handed to a pool.
//!
//! The front end does the handshake (rustls; the certificate's private key never leaves it)
//! and hands the socket over with the session's traffic keys and record sequence numbers
//! ([`Session`], one schema both sides compile against). The pool's worker then runs the
//! record layer itself ([`RecordLayer`]): it decrypts and encrypts records in place with the
//! handed keys, and for TLS 1.3 it follows the peer's key updates from the traffic secrets
//! (HKDF-Expand-Label, RFC 8446 §7.2). Those secrets protect this session only, which the
//! pool reads in plaintext anyway; nothing of the certificate's key is in them.

pub mod hello;
mod record;
mod schedule;
mod session;

pub use record::{
    CONTENT_ALERT, CONTENT_APPLICATION_DATA, CONTENT_HANDSHAKE, MAX_PLAINTEXT, MAX_RECORD, Opened,
    Received, RecordError, RecordLayer,
};
pub use session::{Direction, Protocol, Session, SessionError, Suite};
