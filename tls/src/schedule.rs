//! TLS 1.3's key schedule after the handshake (RFC 8446 §7.1–7.3): a direction's key and
//! IV from its traffic secret, and the next secret when the peer updates its keys.

use ring::hkdf;

use crate::session::Suite;

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn algorithm(suite: Suite) -> hkdf::Algorithm {
    match suite {
        Suite::Aes256Gcm => hkdf::HKDF_SHA384,
        Suite::Aes128Gcm | Suite::Chacha20Poly1305 => hkdf::HKDF_SHA256,
    }
}

/// The hash length of the suite: the length of its traffic secrets.
pub fn secret_len(suite: Suite) -> usize {
    match suite {
        Suite::Aes256Gcm => 48,
        Suite::Aes128Gcm | Suite::Chacha20Poly1305 => 32,
    }
}

/// HKDF-Expand-Label(secret, label, "", out.len()).
fn expand_label(suite: Suite, secret: &[u8], label: &[u8], out: &mut [u8]) {
    let len = (out.len() as u16).to_be_bytes();
    let label_len = [6 + label.len() as u8];
    let context_len = [0u8];
    let info: [&[u8]; 5] = [&len, &label_len, b"tls13 ", label, &context_len];
    let prk = hkdf::Prk::new_less_safe(algorithm(suite), secret);
    // Lengths here are at most 48 bytes, far below HKDF's 255 × hash limit.
    if let Ok(okm) = prk.expand(&info, Len(out.len())) {
        let _ = okm.fill(out);
    }
}

/// The key and IV of a direction whose traffic secret is `secret`.
pub fn key_and_iv(suite: Suite, secret: &[u8]) -> (Vec<u8>, [u8; 12]) {
    let mut key = vec![0u8; suite.key_len()];
    expand_label(suite, secret, b"key", &mut key);
    let mut iv = [0u8; 12];
    expand_label(suite, secret, b"iv", &mut iv);
    (key, iv)
}

/// application_traffic_secret_N+1 from application_traffic_secret_N.
pub fn next_secret(suite: Suite, secret: &[u8]) -> Vec<u8> {
    let mut next = vec![0u8; secret_len(suite)];
    expand_label(suite, secret, b"traffic upd", &mut next);
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len() / 2)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn key_and_iv_match_rfc_8448s_server_application_keys() {
        // RFC 8448 §3 (Simple 1-RTT Handshake), server application_traffic_secret_0 and the
        // key and IV derived from it (TLS_AES_128_GCM_SHA256).
        let secret = hex("a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643");
        let (key, iv) = key_and_iv(Suite::Aes128Gcm, &secret);
        assert_eq!(key, hex("9f02283b6c9c07efc26bb9f2ac92e356"));
        assert_eq!(iv.to_vec(), hex("cf782b88dd83549aadf1e984"));
    }
}
