//! Certificates for the HTTPS tests, made with openssl at test time.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
};

pub const SHOP: &str = "shop.example.test";

pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    /// A test CA, and certificates it signs for shop.example.test with *.example.test, for
    /// other.test, and for own.test (a passthrough pool's server's own).
    pub fn make(dir: &Path) -> Certs {
        let run = |args: &[&str]| {
            let ok = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stderr(Stdio::null())
                .stdout(Stdio::null())
                .status()
                .expect("openssl")
                .success();
            assert!(ok, "openssl {args:?} failed");
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-days",
            "2",
            "-subj",
            "/CN=sluice test CA",
            "-keyout",
            "ca.key",
        ]);
        ca.extend(["-out", "ca.pem"]);
        run(&ca);
        for (name, san) in [
            (SHOP, "DNS:shop.example.test,DNS:*.example.test"),
            ("other.test", "DNS:other.test"),
            ("own.test", "DNS:own.test"),
        ] {
            let file = name.split('.').next().unwrap_or(name);
            let file = if name == SHOP { "shop" } else { file };
            std::fs::write(
                dir.join(format!("{file}.ext")),
                format!("subjectAltName={san}\nbasicConstraints=CA:FALSE\n"),
            )
            .unwrap();
            let (key, csr, pem, ext, subj) = (
                format!("{file}.key"),
                format!("{file}.csr"),
                format!("{file}.pem"),
                format!("{file}.ext"),
                format!("/CN={name}"),
            );
            let mut req = vec!["req"];
            req.extend(ec);
            req.extend(["-subj", &subj, "-keyout", &key, "-out", &csr]);
            run(&req);
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &pem,
                "-extfile",
                &ext,
            ]);
        }
        Certs {
            dir: dir.to_path_buf(),
        }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }

    /// `crate::two_pools` with a TLS listener on 127.0.0.1:8443 for shop.example.test.
    pub fn two_pools(&self, steering: &str) -> String {
        // The [server] table ends with its admin_socket line.
        let admin = "admin_socket = \"{admin}\"\n";
        let with_tls = format!(
            "listen_tls = [\"127.0.0.1:8443\"]\n{admin}\n{}",
            self.shop_table()
        );
        crate::two_pools(steering).replacen(admin, &with_tls, 1)
    }

    /// The `[[tls.certificate]]` table of shop.example.test's certificate (with
    /// `*.example.test`), for a config.
    pub fn shop_table(&self) -> String {
        format!(
            "[[tls.certificate]]\nhosts = [\"{SHOP}\", \"*.example.test\"]\ncert = \"{}\"\nkey = \"{}\"\n",
            self.cert("shop").display(),
            self.key("shop").display()
        )
    }
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-tls-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A rustls client that trusts the test certificate.
pub fn client_config(
    certs: &Certs,
    suite: Option<rustls::SupportedCipherSuite>,
) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(certs.ca()).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(s) = suite {
        provider.cipher_suites = vec![s];
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;
