//! `[server] listen_tls` and `[[tls.certificate]]`: where HTTPS is served and with which
//! certificates. Every certificate is read and matched with its key here, so `sluice check`
//! (and a reload) names a file that does not parse, or a key that is not the certificate's.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use sluice_proto::site::Site;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    #[serde(default)]
    certificate: Vec<RawCertificate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    hosts: Vec<String>,
    cert: PathBuf,
    key: PathBuf,
}

/// A certificate chain and its key, for the SNI names in `hosts` (lower case; `*.suffix`
/// for one more label).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    pub hosts: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    pub listen: Vec<SocketAddr>,
    /// The first also answers ClientHellos without SNI (or naming nothing listed).
    pub certificates: Vec<Certificate>,
    /// `[server] redirect_https`: plain-listener requests get 308 to the https URL.
    pub redirect_https: bool,
}

impl TlsConfig {
    /// The port an https URL names for this front end: the first TLS listener's.
    pub fn https_port(&self) -> Option<u16> {
        self.listen.first().map(|a| a.port())
    }

    /// The port plain requests are redirected to, when `redirect_https` is on.
    pub fn redirect_port(&self) -> Option<u16> {
        self.https_port().filter(|_| self.redirect_https)
    }
}

pub(super) fn check(
    listen_tls: &[String],
    redirect_https: bool,
    plain: &[SocketAddr],
    raw: &RawTls,
    base: &Path,
    bad: &mut dyn FnMut(String, String),
) -> TlsConfig {
    let mut listen = Vec::new();
    for (i, a) in listen_tls.iter().enumerate() {
        let key = format!("server.listen_tls[{i}]");
        match a.parse::<SocketAddr>() {
            Ok(addr) if addr.port() == 0 => bad(key, format!("`{a}` needs a port other than 0")),
            Ok(addr) if listen.contains(&addr) || plain.contains(&addr) => bad(
                key,
                format!("`{a}` is listed twice (in listen or listen_tls)"),
            ),
            Ok(addr) => listen.push(addr),
            Err(_) => bad(
                key,
                format!("`{a}` is not an address:port (IPv6 as \"[::1]:8443\")"),
            ),
        }
    }
    let resolve = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    let mut certificates = Vec::new();
    let provider = crate::tls::certs::provider();
    for (i, c) in raw.certificate.iter().enumerate() {
        let key = |k: &str| format!("tls.certificate[{i}].{k}");
        let mut hosts = Vec::new();
        if c.hosts.is_empty() {
            bad(
                key("hosts"),
                "needs at least one host name the certificate serves".into(),
            );
        }
        for h in &c.hosts {
            match Site::parse(Some(h)) {
                Ok(Site::Exact(name)) => hosts.push(name),
                Ok(Site::Wildcard(suffix)) => hosts.push(format!("*.{suffix}")),
                Ok(_) => bad(
                    key("hosts"),
                    format!("`{h}` is not a host name (or `*.suffix`) a ClientHello can name"),
                ),
                Err(reason) => bad(key("hosts"), format!("`{h}` {reason}")),
            }
        }
        let certificate = Certificate {
            hosts,
            cert: resolve(&c.cert),
            key: resolve(&c.key),
        };
        if let Err((which, reason)) = crate::tls::certs::load(&certificate, &provider) {
            bad(key(which), reason);
        }
        certificates.push(certificate);
    }
    if !listen.is_empty() && certificates.is_empty() {
        bad(
            "tls.certificate".into(),
            "server.listen_tls needs at least one [[tls.certificate]]".into(),
        );
    }
    if redirect_https && listen_tls.is_empty() {
        bad(
            "server.redirect_https".into(),
            "redirects to https need server.listen_tls".into(),
        );
    }
    TlsConfig {
        listen,
        certificates,
        redirect_https,
    }
}
