//! The certificates the front end serves, chosen by the name a ClientHello asks for (SNI),
//! and the rustls configuration its handshakes use. Private keys are read here and stay in
//! the front end's memory: workers only ever get a session's traffic keys.

use std::{path::Path, sync::Arc};

use rustls::{
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

use crate::config::Certificate;

/// The one crypto provider of the front end's handshakes: ring, AEAD suites only (rustls
/// offers no other).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a certificate chain and its key. The error names the config key at fault (`cert`
/// or `key`) and a reason that names the file.
pub fn load(
    c: &Certificate,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, (&'static str, String)> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&c.cert)
        .map_err(|e| ("cert", reason(&c.cert, &e.to_string())))?
        .collect::<Result<_, _>>()
        .map_err(|e| ("cert", reason(&c.cert, &e.to_string())))?;
    if chain.is_empty() {
        return Err(("cert", reason(&c.cert, "holds no PEM certificate")));
    }
    let key = PrivateKeyDer::from_pem_file(&c.key).map_err(|e| {
        let why = format!("holds no PKCS#8, SEC1 or PKCS#1 PEM key ({e})");
        ("key", reason(&c.key, &why))
    })?;
    CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| {
            let why = format!(
                "`{}` and `{}` do not make a certificate with its key: {e}",
                c.cert.display(),
                c.key.display()
            );
            ("key", why)
        })
        .map(Arc::new)
}

fn reason(path: &Path, why: &str) -> String {
    format!("`{}` {why}", path.display())
}

/// Certificates by the SNI names they serve: an exact name first, then `*.suffix` for one
/// more label; a ClientHello without SNI (or naming nothing served) gets the first.
#[derive(Debug)]
pub struct Resolver {
    served: Vec<(Vec<String>, Arc<CertifiedKey>)>,
}

impl Resolver {
    pub fn new(served: Vec<(Vec<String>, Arc<CertifiedKey>)>) -> Resolver {
        Resolver { served }
    }

    pub fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let first = self.served.first().map(|(_, k)| k.clone());
        let Some(name) = sni.map(|s| sluice_proto::host::normalize(s).into_owned()) else {
            return first;
        };
        let exact = self.served.iter().find(|(hosts, _)| hosts.contains(&name));
        let wildcard = || {
            let (_, parent) = name.split_once('.')?;
            self.served.iter().find(|(hosts, _)| {
                hosts
                    .iter()
                    .any(|h| h.strip_prefix("*.").is_some_and(|s| s == parent))
            })
        };
        exact.or_else(wildcard).map(|(_, k)| k.clone()).or(first)
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
    }
}

/// The handshakes' configuration: TLS 1.3 and 1.2, ALPN `http/1.1` only, resumption by
/// tickets and by session id, and the session's secrets extractable (they go to the pool).
pub fn server_config(
    served: Vec<(Vec<String>, Arc<CertifiedKey>)>,
    secrets: Arc<dyn rustls::KeyLog>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver::new(served)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.enable_secret_extraction = true;
    config.key_log = secrets;
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    // The front end writes the tickets before the session leaves it.
    config.send_tls13_tickets = 2;
    Ok(Arc::new(config))
}
