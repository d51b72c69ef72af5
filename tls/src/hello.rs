//! The SNI name of a ClientHello, read before any handshake: how the front end finds the
//! pool of a `tls = "passthrough"` connection the kernel did not steer (its ClientHello did
//! not fit in the first segment, or named its server after more extensions than the kernel
//! walks). Nothing is decrypted or answered here; a connection that is not for a
//! passthrough pool goes on to the front end's own handshake with every byte it sent.
//!
//! The name rule is the `Host` rule (`sluice_proto::host`), which the kernel program
//! (`ebpf/src/hello.rs`, which cannot link this crate) follows too: letters, digits, `-`,
//! `_` and `.`, no empty label, lower-cased, one trailing dot dropped; a name outside it is
//! no name (the front end's handshake then refuses it or uses its default certificate).

use crate::record::MAX_RECORD;

const RECORD_HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const NAME_HOST: u8 = 0;
/// Longest ClientHello read (a post-quantum one is about 1.6 KB): the TLS thread buffers
/// at most two records ahead.
pub const MAX_HELLO: usize = 2 * (MAX_RECORD - 5);
/// Longest host name (DNS).
const MAX_NAME: usize = 253;

/// What a client of a passthrough pool that cannot take it (stopped, removed, full) gets
/// before any handshake: a plaintext fatal `internal_error` alert. Without that pool's
/// certificate no HTTP answer can be sealed; this one ends the client's wait at once.
pub const UNAVAILABLE: [u8; 7] = [crate::record::CONTENT_ALERT, 3, 3, 0, 2, 2, 80];

/// What the bytes a connection sent so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// The ClientHello is not complete yet.
    Partial,
    /// A whole ClientHello and the host name it names, or `None`: no SNI, a name outside
    /// the rule, or bytes that are not a ClientHello at all.
    Done(Option<String>),
}

fn be16(b: &[u8], at: usize) -> Option<usize> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]) as usize)
}

/// Reads the ClientHello at the start of `buf`, which may span several records.
pub fn read(buf: &[u8]) -> Hello {
    let mut message: Vec<u8> = Vec::new();
    let mut at = 0;
    loop {
        let Some(header) = buf.get(at..at + 5) else {
            return Hello::Partial;
        };
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if header[0] != RECORD_HANDSHAKE || header[1] != 3 || len == 0 || len > MAX_RECORD - 5 {
            return Hello::Done(None);
        }
        let Some(body) = buf.get(at + 5..at + 5 + len) else {
            return Hello::Partial;
        };
        at += 5 + len;
        // The common case, a ClientHello in one record, is read in place.
        let whole: &[u8] = if message.is_empty() {
            body
        } else {
            message.extend_from_slice(body);
            &message
        };
        if whole.len() >= 4 {
            let size = u32::from_be_bytes([0, whole[1], whole[2], whole[3]]) as usize;
            if whole[0] != CLIENT_HELLO || size > MAX_HELLO {
                return Hello::Done(None);
            }
            if let Some(hello) = whole.get(4..4 + size) {
                return Hello::Done(server_name(hello));
            }
        }
        if message.is_empty() {
            message.extend_from_slice(body);
        }
    }
}

/// The host name of a ClientHello's body (after its handshake header).
fn server_name(b: &[u8]) -> Option<String> {
    // Version (2) and random (32), then the session id.
    let mut at = 34;
    at += 1 + *b.get(at)? as usize;
    at += 2 + be16(b, at)?;
    at += 1 + *b.get(at)? as usize;
    let end = at + 2 + be16(b, at)?;
    let extensions = b.get(at + 2..end)?;
    let mut i = 0;
    while i + 4 <= extensions.len() {
        let kind = be16(extensions, i)? as u16;
        let size = be16(extensions, i + 2)?;
        let data = extensions.get(i + 4..i + 4 + size)?;
        if kind == EXT_SERVER_NAME {
            let list = be16(data, 0)?;
            let n = be16(data, 3)?;
            if *data.get(2)? != NAME_HOST || n == 0 || 3 + n > list || 2 + list > data.len() {
                return None;
            }
            return normalize(data.get(5..5 + n)?);
        }
        i += 4 + size;
    }
    None
}

/// The name by the `Host` rule, normalized; None outside it (a port or an IP literal
/// included: SNI names neither).
fn normalize(name: &[u8]) -> Option<String> {
    if name.len() > MAX_NAME + 1 {
        return None;
    }
    let host = sluice_proto::host::parse(name).ok()?;
    if host.port.is_some() || host.name.len() != name.len() || host.name.starts_with('[') {
        return None;
    }
    Some(host.normalized().into_owned()).filter(|n| n.len() <= MAX_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello naming `name` after `before` other extensions of `pad` bytes each.
    pub(crate) fn client_hello(name: &[u8], before: usize, pad: usize) -> Vec<u8> {
        let mut ext = Vec::new();
        for k in 0..before {
            ext.extend_from_slice(&(0xff00 + k as u16).to_be_bytes());
            ext.extend_from_slice(&(pad as u16).to_be_bytes());
            ext.extend(std::iter::repeat_n(0xab, pad));
        }
        let mut sni = vec![NAME_HOST];
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name);
        ext.extend_from_slice(&EXT_SERVER_NAME.to_be_bytes());
        ext.extend_from_slice(&((sni.len() + 2) as u16).to_be_bytes());
        ext.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        ext.extend_from_slice(&sni);
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(32);
        body.extend([9u8; 32]);
        body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut msg = vec![CLIENT_HELLO, 0, 0, 0];
        msg[1..4].copy_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(&body);
        msg
    }

    fn records(msg: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in msg.chunks(size) {
            out.extend_from_slice(&[RECORD_HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    #[test]
    fn the_name_is_read_whole_or_partial_across_records() {
        let hello = records(&client_hello(b"Shop.Example.TEST.", 3, 20), 16 * 1024);
        assert_eq!(read(&hello), Hello::Done(Some("shop.example.test".into())));
        for cut in [0, 4, 5, 40, hello.len() - 1] {
            assert_eq!(read(&hello[..cut]), Hello::Partial, "cut at {cut}");
        }
        // A ClientHello split over records of 100 bytes, the name in the last.
        let split = records(&client_hello(b"a.test", 20, 60), 100);
        assert_eq!(read(&split), Hello::Done(Some("a.test".into())));
        assert_eq!(read(&split[..split.len() - 1]), Hello::Partial);
    }

    #[test]
    fn a_name_outside_the_kernel_rule_or_a_hello_without_one_is_no_name() {
        for bad in [&b".a"[..], b"a..b", b"a b", b"a\0b", b"", b"\xc3\xa9.test"] {
            let hello = records(&client_hello(bad, 0, 0), 16 * 1024);
            assert_eq!(read(&hello), Hello::Done(None), "{bad:?}");
        }
        let mut no_sni = client_hello(b"a.test", 2, 4);
        // Rename the server_name extension: no SNI left.
        let at = no_sni.len() - (b"a.test".len() + 9);
        no_sni[at + 1] = 0x99;
        assert_eq!(read(&records(&no_sni, 16 * 1024)), Hello::Done(None));
        assert_eq!(read(b"GET / HTTP/1.1\r\n\r\n"), Hello::Done(None));
        // A record header declaring more than TLS allows is not waited for.
        assert_eq!(read(&[22, 3, 1, 0xff, 0xff, 1]), Hello::Done(None));
    }
}
