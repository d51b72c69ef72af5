//! The record layer against rustls itself: a rustls client and a rustls server finish a
//! handshake in memory, the server's keys are taken out as the front end takes them, and the
//! client then talks to `RecordLayer` as it would to the rustls server, in TLS 1.2 and 1.3
//! with each of the three AEAD suites, through key updates and alerts.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use rustls::crypto::CryptoProvider;
use rustls::crypto::ring::{cipher_suite, default_provider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConnection, ConnectionTrafficSecrets, ServerConnection, SupportedCipherSuite};
use sluice_tls::{Direction, Opened, Protocol, RecordLayer, Session, Suite};

const SHOP: &str = "shop.example.test";

#[derive(Debug, Default)]
struct Secrets(Mutex<Vec<(String, Vec<u8>)>>);

impl rustls::KeyLog for Secrets {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        self.0
            .lock()
            .unwrap()
            .push((label.to_owned(), secret.to_vec()));
    }
}

impl Secrets {
    fn get(&self, label: &str) -> Vec<u8> {
        let all = self.0.lock().unwrap();
        all.iter()
            .find(|(l, _)| l == label)
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    }
}

fn provider(suite: SupportedCipherSuite) -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: vec![suite],
        ..default_provider()
    })
}

/// A client and a server that finished their handshake, every byte delivered.
fn handshake(suite: SupportedCipherSuite) -> (ClientConnection, ServerConnection, Arc<Secrets>) {
    let made = rcgen::generate_simple_self_signed(vec!["shop.example.test".to_owned()]).unwrap();
    let cert = CertificateDer::from(made.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()));
    let versions: &[&rustls::SupportedProtocolVersion] = match suite {
        SupportedCipherSuite::Tls13(_) => &[&rustls::version::TLS13],
        SupportedCipherSuite::Tls12(_) => &[&rustls::version::TLS12],
    };
    let secrets = Arc::new(Secrets::default());
    let mut server_config = rustls::ServerConfig::builder_with_provider(provider(suite))
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    server_config.enable_secret_extraction = true;
    server_config.key_log = secrets.clone();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client_config = rustls::ClientConfig::builder_with_provider(provider(suite))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("shop.example.test").unwrap();
    let mut client = ClientConnection::new(Arc::new(client_config), name).unwrap();
    let mut server = ServerConnection::new(Arc::new(server_config)).unwrap();
    for _ in 0..20 {
        let mut wire = Vec::new();
        client.write_tls(&mut wire).unwrap();
        server.read_tls(&mut &wire[..]).unwrap();
        server.process_new_packets().unwrap();
        wire.clear();
        server.write_tls(&mut wire).unwrap();
        client.read_tls(&mut &wire[..]).unwrap();
        client.process_new_packets().unwrap();
        if !client.is_handshaking()
            && !server.is_handshaking()
            && !client.wants_write()
            && !server.wants_write()
        {
            break;
        }
    }
    assert!(!server.is_handshaking());
    (client, server, secrets)
}

fn direction(
    (seq, secrets): (u64, ConnectionTrafficSecrets),
    secret: Vec<u8>,
) -> (Suite, Direction) {
    let (suite, key, iv) = match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Suite::Aes128Gcm, key, iv),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Suite::Aes256Gcm, key, iv),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (Suite::Chacha20Poly1305, key, iv)
        }
        _ => panic!("an unexpected suite"),
    };
    let mut iv12 = [0u8; 12];
    iv12.copy_from_slice(iv.as_ref());
    let d = Direction {
        key: key.as_ref().to_vec(),
        iv: iv12,
        seq,
        secret,
    };
    if !d.secret.is_empty() {
        // The key schedule from the secret gives what rustls derived.
        let derived = Direction::from_secret(suite, &d.secret, seq);
        assert_eq!(derived, d, "keys derived from the traffic secret");
    }
    (suite, d)
}

/// The server's side of the session, as the front end hands it to a worker.
fn take_session(server: ServerConnection, secrets: &Secrets) -> Session {
    let tls13 = server.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
    let (tx_secret, rx_secret) = if tls13 {
        (
            secrets.get("SERVER_TRAFFIC_SECRET_0"),
            secrets.get("CLIENT_TRAFFIC_SECRET_0"),
        )
    } else {
        (Vec::new(), Vec::new())
    };
    let extracted = server.dangerous_extract_secrets().unwrap();
    let (suite, tx) = direction(extracted.tx, tx_secret);
    let (_, rx) = direction(extracted.rx, rx_secret);
    Session {
        protocol: if tls13 {
            Protocol::Tls13
        } else {
            Protocol::Tls12
        },
        suite,
        tx,
        rx,
        server_name: SHOP.into(),
        pending: Vec::new(),
    }
}

/// Everything the client sent, opened: (application data, other records).
fn open_all(layer: &mut RecordLayer, wire: &mut Vec<u8>) -> (Vec<u8>, Vec<Opened>) {
    let (mut data, mut other) = (Vec::new(), Vec::new());
    let mut at = 0;
    while let Some((n, opened)) = layer.open(&mut wire[at..]).unwrap() {
        match opened {
            Opened::Data(r) => data.extend_from_slice(&wire[at + r.start..at + r.end]),
            o => other.push(o),
        }
        at += n;
    }
    assert_eq!(at, wire.len(), "every record complete");
    wire.clear();
    (data, other)
}

fn client_sends(client: &mut ClientConnection, bytes: &[u8]) -> Vec<u8> {
    client.writer().write_all(bytes).unwrap();
    let mut wire = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut wire).unwrap();
    }
    wire
}

fn client_reads(client: &mut ClientConnection, wire: &[u8]) -> Vec<u8> {
    let mut rd = wire;
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        if !rd.is_empty() {
            client.read_tls(&mut rd).unwrap();
            client.process_new_packets().unwrap();
        }
        // Drained as it comes: rustls holds only so much plaintext.
        loop {
            match client.reader().read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        if rd.is_empty() {
            return got;
        }
    }
}

fn converse(suite: SupportedCipherSuite) {
    let (mut client, server, secrets) = handshake(suite);
    let session = take_session(server, &secrets);
    // The session crosses the handoff channel as bytes.
    let mut encoded = Vec::new();
    session.encode(&mut encoded);
    let (session, rest) = Session::decode(&encoded).unwrap();
    assert!(rest.is_empty());
    let mut layer = RecordLayer::new(&session).unwrap();

    let mut wire = client_sends(
        &mut client,
        b"GET / HTTP/1.1\r\nHost: shop.example.test\r\n\r\n",
    );
    let (data, other) = open_all(&mut layer, &mut wire);
    assert_eq!(data, b"GET / HTTP/1.1\r\nHost: shop.example.test\r\n\r\n");
    assert!(other.is_empty());

    // An answer larger than one record, split in records the client reassembles.
    let body: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
    let mut out = Vec::new();
    layer.seal(&body, &mut out).unwrap();
    assert_eq!(client_reads(&mut client, &out), body);

    if session.protocol == Protocol::Tls13 {
        // The client moves to new keys and asks us to move too.
        client.refresh_traffic_keys().unwrap();
        let mut wire = client_sends(&mut client, b"after the update");
        let (data, other) = open_all(&mut layer, &mut wire);
        assert_eq!(other, vec![Opened::KeyUpdate { requested: true }]);
        assert_eq!(data, b"after the update");
        let mut out = Vec::new();
        layer.seal_key_update(&mut out).unwrap();
        layer.seal(b"answered under new keys", &mut out).unwrap();
        assert_eq!(client_reads(&mut client, &out), b"answered under new keys");
        // And the session taken out again (a hand-back) carries the new keys on.
        let again = layer.session(&[], SHOP);
        let mut layer = RecordLayer::new(&again).unwrap();
        let mut wire = client_sends(&mut client, b"third");
        assert_eq!(open_all(&mut layer, &mut wire).0, b"third");
        let mut out = Vec::new();
        layer.seal(b"fourth", &mut out).unwrap();
        assert_eq!(client_reads(&mut client, &out), b"fourth");
        finish(&mut client, &mut layer);
    } else {
        finish(&mut client, &mut layer);
    }
}

/// close_notify both ways.
fn finish(client: &mut ClientConnection, layer: &mut RecordLayer) {
    client.send_close_notify();
    let mut wire = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut wire).unwrap();
    }
    let (data, other) = open_all(layer, &mut wire);
    assert!(data.is_empty());
    assert_eq!(
        other,
        vec![Opened::Alert {
            level: 1,
            description: 0
        }]
    );
    let mut out = Vec::new();
    layer.seal_alert(0, &mut out).unwrap();
    let mut rd = &out[..];
    client.read_tls(&mut rd).unwrap();
    let state = client.process_new_packets().unwrap();
    assert!(state.peer_has_closed());
}

#[test]
fn tls13_aes_128_gcm_talks_to_a_rustls_client() {
    converse(cipher_suite::TLS13_AES_128_GCM_SHA256);
}

#[test]
fn tls13_aes_256_gcm_talks_to_a_rustls_client() {
    converse(cipher_suite::TLS13_AES_256_GCM_SHA384);
}

#[test]
fn tls13_chacha20_poly1305_talks_to_a_rustls_client() {
    converse(cipher_suite::TLS13_CHACHA20_POLY1305_SHA256);
}

#[test]
fn tls12_aes_128_gcm_talks_to_a_rustls_client() {
    converse(cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256);
}

#[test]
fn tls12_aes_256_gcm_talks_to_a_rustls_client() {
    converse(cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384);
}

#[test]
fn tls12_chacha20_poly1305_talks_to_a_rustls_client() {
    converse(cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256);
}

#[test]
fn a_tampered_record_is_refused_and_a_partial_one_waits() {
    let (mut client, server, secrets) = handshake(cipher_suite::TLS13_AES_128_GCM_SHA256);
    let mut layer = RecordLayer::new(&take_session(server, &secrets)).unwrap();
    let mut wire = client_sends(&mut client, b"hello");
    let cut = wire.len() - 1;
    assert_eq!(layer.open(&mut wire[..cut]).unwrap(), None);
    let last = wire.len() - 3;
    wire[last] ^= 1;
    assert_eq!(
        layer.open(&mut wire).unwrap_err(),
        sluice_tls::RecordError::BadRecordMac
    );
    // A record longer than TLS allows is refused from its header alone.
    let mut huge = vec![23, 3, 3, 0xff, 0xff];
    assert_eq!(
        layer.open(&mut huge).unwrap_err(),
        sluice_tls::RecordError::Overflow
    );
}
